#!/usr/bin/env bash
# Set up (./.venv), make sure PostgreSQL is installed (the suite starts a throwaway server from it), run the static
# checks (infra/scripts/check.sh: ruff and mypy on the product packages; a finding fails before any test), then run
#   1. the default suite (pytest -m "not benchmark_only and not gpu and not cluster"; under 20 minutes on 2 cores),
#   2. the cluster suite (pytest -m cluster: a multi-node Ray cluster, moto's S3 server and an MLflow server on
#      PostgreSQL + S3, all on 127.0.0.1; node failures included),
#   3. the README suite (pytest -m readme: the README's first command verbatim on a fresh copy of the committed tree,
#      then every other command block of README.md, inference/README.md and docs/CLUSTER.md; tests/readme).
# Extra arguments go to both pytest runs. pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/scripts/setup.sh
bash infra/scripts/ensure_postgres.sh
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
bash infra/scripts/check.sh
status=0
for marks in "not benchmark_only and not gpu and not cluster and not readme" "cluster" "readme"; do
  echo "== pytest -m \"$marks\""
  set +e
  python -m pytest -q -m "$marks" "$@"
  rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then
    echo "error: pytest -m \"$marks\" collected no tests" >&2
    rc=1
  fi
  [[ $rc -eq 0 ]] || status=$rc
done
exit $status
