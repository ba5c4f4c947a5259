#!/usr/bin/env bash
# Set-up step (run by setup.sh): NIQE's pristine-model parameters, from BasicSR 1.4.2's source distribution on PyPI.
# Downloads the sdist with pip (no install: basicsr itself pins its own torch stack), checks its sha256, and extracts
# only basicsr/metrics/niqe_pris_params.npz into <venv>/share/varsr/eval/ (infra/core/metrics.py reads it there,
# checks its sha256 again, and never downloads at run time). The sdist stays beside it: the NIQE fidelity test runs
# BasicSR's own NIQE from it as the reference (tests/inference/test_eval_metrics.py). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
read -r DEST SDIST_SHA NPZ_SHA < <("$PY" -c "import infra.core.metrics as m; \
print(m.eval_cache_dir(), m.BASICSR_SDIST_SHA256, m.NIQE_PARAMS_SHA256)")
mkdir -p "$DEST"
TAR="$DEST/basicsr-1.4.2.tar.gz"
NPZ="$DEST/niqe_pris_params.npz"
if [[ -f "$NPZ" && -f "$TAR" ]] && echo "$NPZ_SHA  $NPZ" | sha256sum -c --status; then
  exit 0
fi
if [[ ! -f "$TAR" ]] || ! echo "$SDIST_SHA  $TAR" | sha256sum -c --status; then
  tmp=$(mktemp -d)
  # --no-build-isolation: pip reads the sdist's metadata with the venv's setuptools/torch instead of resolving
  # basicsr's build requirements (which conflict with the pinned torch); nothing is built or installed
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
    basicsr==1.4.2 -d "$tmp" >/dev/null 2>&1 || { echo "fetch_niqe_params: pip download basicsr==1.4.2 failed" >&2; exit 1; }
  mv "$tmp/basicsr-1.4.2.tar.gz" "$TAR"
  rm -rf "$tmp"
fi
echo "$SDIST_SHA  $TAR" | sha256sum -c --status || { echo "fetch_niqe_params: $TAR has an unexpected sha256" >&2; exit 1; }
tar -xzf "$TAR" -O basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz >"$NPZ.tmp"
echo "$NPZ_SHA  $NPZ.tmp" | sha256sum -c --status || { echo "fetch_niqe_params: npz sha256 mismatch" >&2; exit 1; }
mv "$NPZ.tmp" "$NPZ"
