#!/usr/bin/env bash
# Set up (./.venv), make sure PostgreSQL is installed (the suite starts a throwaway server from it), and run the
# default test suite. pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/scripts/setup.sh
bash infra/scripts/ensure_postgres.sh
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
set +e
python -m pytest -q -m "not benchmark_only and not gpu" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
