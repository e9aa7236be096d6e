#!/usr/bin/env bash
# Everything issue 5 asks to run on an NVIDIA GPU, in one go (needs a CUDA build of torch and nvcc):
#   1. build the extension with the CUDA kernels, 2. the GPU tests, 3. compute-sanitizer
#   (memcheck, racecheck, initcheck) on the CUDA C++ kernels through their GPU tests,
#   4. the GPU benchmarks in fp32 and bf16, written to benchmarks/results/ (file names carry the GPU).
# Usage: bash scripts/gpu_checks.sh [--no-sanitizer] [--no-bench]
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
SANITIZE=1; BENCH=1
for a in "$@"; do
  case "$a" in
    --no-sanitizer) SANITIZE=0 ;;
    --no-bench) BENCH=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"

echo "[gpu] build (CUDA sources join when torch has CUDA and nvcc is on the PATH)"
"$PY" setup.py build_ext --inplace >build-gpu.log 2>&1 || { tail -50 build-gpu.log; exit 1; }
"$PY" -c "import sparsekern as s; b = s.backends(); print('backends:', b); assert 'cuda' in b, b"

echo "[gpu] GPU tests"
gpu_tests=(tests/test_gpu_kernels.py)
[ -f tests/test_triton_gpu.py ] && gpu_tests+=(tests/test_triton_gpu.py)
"$PY" -m pytest "${gpu_tests[@]}" -q -p no:cacheprovider -rs || status=$?

if [ "$SANITIZE" = 1 ]; then
  # only the CUDA C++ backend's tests (Triton/cuBLAS kernels are not ours to sanitize), small subset
  sel="cuda and (sparse_decode or feature_topk)"
  for tool in memcheck racecheck initcheck; do
    echo "[gpu] compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest tests/test_gpu_kernels.py -q -p no:cacheprovider -x -k "$sel" || status=$?
  done
fi

if [ "$BENCH" = 1 ]; then
  echo "[gpu] benchmarks (fp32, bf16)"
  "$PY" -m sparsekern.cli bench --device cuda --no-progress
  "$PY" -m sparsekern.cli bench --device cuda --dtype bfloat16 --no-progress
fi
exit "${status:-0}"
