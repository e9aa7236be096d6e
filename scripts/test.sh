#!/usr/bin/env bash
# Set everything up, run the C++ unit tests (ctest) and then the whole pytest suite.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
bash scripts/setup.sh

mkdir -p build
if command -v cmake >/dev/null; then
  echo "[test] C++ unit tests (cmake + ctest)"
  prefix=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython_EXECUTABLE="$(command -v "$PY")" >build/cmake-configure.log 2>&1 \
    || { cat build/cmake-configure.log; exit 1; }
  cmake --build build/cmake -j"$(nproc)" >build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
  ctest --test-dir build/cmake --output-on-failure
else
  echo "[test] cmake not found: skipping the C++ unit tests"
fi

echo "[test] pytest"
exec "$PY" -m pytest tests/ -q -p no:cacheprovider "$@"
