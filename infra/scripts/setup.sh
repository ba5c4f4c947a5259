#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies and the project installed (editable), with the `cluster` extra
# (s3fs, gcsfs, boto3, psycopg, Ray's dashboard) and the `test` extra (pytest, moto's S3 server). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export DS_BUILD_OPS=0
log=$(mktemp)
if ! python -m pip install -q --disable-pip-version-check -e ".[cluster,test]" >"$log" 2>&1; then
  grep -v "is ignored" "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
python -m pip check >/dev/null || { python -m pip check; exit 1; }
python -c "import model, data_pipeline, training, inference, infra"
bash infra/scripts/fetch_niqe_params.sh  # NIQE pristine-model parameters (docs/EVALUATION.md), no run-time download
# byte-compile once: heavy imports (deepspeed, ray.data, mlflow) start ~2x faster (measured on these machines)
python -m compileall -q -j 2 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
