#!/usr/bin/env bash
# Set up the current Python environment for sparsekern: reuse an installed torch (install the CPU
# build only when none is present), install the test/bench dependencies without touching torch, and
# build the extension against that torch (--no-build-isolation). Idempotent: skips the build when
# the compiled extension is newer than every native source.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! "$PY" -c "import torch" 2>/dev/null; then
  # No torch yet. On a CPU machine never resolve plain `torch` (that pulls the CUDA build):
  # pin the CPU release this project is tested with (a local wheel on the project's machines).
  echo "[setup] installing torch==${SPARSEKERN_TORCH:-2.13.0}"
  "$PY" -m pip install -q "torch==${SPARSEKERN_TORCH:-2.13.0}"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
echo "[setup] using torch $TORCH_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"  # dependencies may not replace the installed torch

"$PY" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja -c "$constraints"
"$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt -c "$constraints"

if "$PY" scripts/ext_is_current.py; then
  echo "[setup] sparsekern is installed and its extension is up to date"
else
  echo "[setup] building sparsekern (C++ extension; about 2 minutes on 2 cores)"
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . -c "$constraints"
fi
"$PY" -c "import sparsekern; print('[setup] sparsekern backends:', sparsekern.backends())"
