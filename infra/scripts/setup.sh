#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies and the project installed (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export DS_BUILD_OPS=0
log=$(mktemp)
if ! python -m pip install -q --disable-pip-version-check -e ".[test]" >"$log" 2>&1; then
  grep -v "is ignored" "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
python -m pip check >/dev/null || { python -m pip check; exit 1; }
python -c "import model, data_pipeline, training, inference, infra" 
# byte-compile once: heavy imports (deepspeed, ray.data, mlflow) start ~2x faster (see STACK.md)
python -m compileall -q -j 2 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
