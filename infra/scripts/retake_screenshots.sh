#!/usr/bin/env bash
# Retake every picture in docs/screenshots/ from a demo of this checkout, in one command:
#   bash infra/scripts/retake_screenshots.sh [WORKDIR]
# 1. runs the README's first command's demo (`varsr demo`) in WORKDIR (default: a new temporary folder);
# 2. copies its outputs/comparison.png (LR | VARSR | bicubic | HR) to docs/screenshots/comparison.png;
# 3. takes the MLflow UI screenshots with infra/scripts/ui_screenshots.py (headless Debian chromium through
#    Playwright; both are installed here when missing);
# 4. writes the commit and the demo's PSNR-Y / high-frequency figures into the README's caption.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-$(mktemp -d)/varsr-demo}
bash infra/scripts/setup.sh
.venv/bin/varsr demo --workdir "$WORK"
cp "$WORK/outputs/comparison.png" docs/screenshots/comparison.png
if ! command -v chromium >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -c "import playwright" 2>/dev/null || .venv/bin/python -m pip install -q playwright
.venv/bin/python infra/scripts/ui_screenshots.py --workdir "$WORK" --out docs/screenshots
.venv/bin/python infra/scripts/readme_caption.py "$WORK" "$(git rev-parse --short HEAD)"
