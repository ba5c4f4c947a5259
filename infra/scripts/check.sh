#!/usr/bin/env bash
# Static checks of the product packages, configured in pyproject.toml: ruff (pyflakes, pycodestyle at 120 columns,
# import order, bugbear, blind excepts, stale `# noqa`) and mypy. Exits non-zero on any finding. Run by
# infra/scripts/test.sh before the test suite; needs the `test` extra (infra/scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
packages=(data_pipeline training model inference infra)
status=0
echo "== ruff check ${packages[*]}"
"$PY" -m ruff check "${packages[@]}" || status=1
echo "== mypy (packages: pyproject.toml [tool.mypy])"
"$PY" -m mypy || status=1
exit $status
