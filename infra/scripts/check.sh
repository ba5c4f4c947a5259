#!/usr/bin/env bash
# Static checks, configured in pyproject.toml: ruff's linter (pyflakes, pycodestyle at 120 columns, import order,
# bugbear, blind excepts, stale `# noqa`) and ruff's formatter (`ruff format --check`) on the product packages, the
# tests and the benchmarks, then mypy on the product packages. Exits non-zero on any finding. Run by
# infra/scripts/test.sh before the test suite; needs the `test` extra (infra/scripts/setup.sh installs it).
# To fix formatting locally: `.venv/bin/python -m ruff format`; lint autofixes: `.venv/bin/python -m ruff check --fix`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
paths=(data_pipeline training model inference infra tests benchmarks)
status=0
echo "== ruff check ${paths[*]}"
"$PY" -m ruff check "${paths[@]}" || status=1
echo "== ruff format --check ${paths[*]}"
"$PY" -m ruff format --check "${paths[@]}" || status=1
echo "== mypy (packages: pyproject.toml [tool.mypy])"
"$PY" -m mypy || status=1
exit $status
