#!/usr/bin/env bash
# Everything issues 5 and 10 ask to run on an NVIDIA GPU, in one go (needs a CUDA build of torch and nvcc):
#   1. build the extension with the CUDA kernels, 2. the GPU tests, 3. compute-sanitizer
#   (memcheck, racecheck, initcheck) on the CUDA C++ kernels through their GPU tests,
#   4. the GPU benchmarks in fp32 and bf16, written to benchmarks/results/ (file names carry the GPU),
#   5. the encoder target table (issue 10) of those two runs: python -m sparsekern.bench.targets FILES,
#      and the strategy `auto` should take per op/dtype on this GPU (python -m sparsekern.bench.choose_strategy).
# Usage: bash scripts/gpu_checks.sh [--no-sanitizer] [--no-bench] [--encoders-only] [--features]
#                                   [--training] [--training-step-only]
#   --features: also `sparsekern bench features --device cuda` (issue 11's table on the GPU).
#   --training: also issue 12's training table in fp32 and bf16: `sparsekern bench training --device cuda`
#     (the bare TopK encode + decode fwd+bwd step at 768 x 24576, N 16384, k 32 against the dense torch
#     step, targets >= 3.5x fp32 / >= 2.5x bf16, then the trainer against SAELens's: throughput, quality,
#     d_sae 2^20 scale; the trainer rows need sparsekern.training).
#   --training-step-only: build, tests/test_triton_gpu.py -k encode_grad, then only the step case in fp32
#     and bf16 (a few minutes: sized for a 15-minute GPU budget).
#   --encoders-only: build, tests/test_triton_gpu.py, then only topk_encode/threshold_encode benchmarked
#   (fp32 and bf16) and their target table; sized for a 15-minute GPU budget.
#
# sae_lens / transformer_lens on a GPU machine that lacks them (and has no network): without them the
# SAELens peers are "skipped" rows. On a machine with pip access, in the repo root (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl sae-lens==VER transformer-lens==VER
# plus each of their dependencies the GPU machine lacks (`unzip -p .whl/NAME-*.whl '*/METADATA' |
# grep ^Requires-Dist` lists them; keep one version of each). Copy .whl/ along with the tree (for the
# device tool: carry ".whl"). When `import sae_lens` fails and .whl/ holds wheels, this script runs
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# and exports PYTHONPATH=/tmp/site before anything else.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
SANITIZE=1; BENCH=1; ENC_ONLY=0; FEATURES=0; TRAINING=0; STEP_ONLY=0
for a in "$@"; do
  case "$a" in
    --no-sanitizer) SANITIZE=0 ;;
    --no-bench) BENCH=0 ;;
    --encoders-only) ENC_ONLY=1; SANITIZE=0 ;;
    --features) FEATURES=1 ;;
    --training) TRAINING=1 ;;
    --training-step-only) TRAINING=1; STEP_ONLY=1; SANITIZE=0; BENCH=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"

if ! "$PY" -c "import sae_lens" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu] installing the carried wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import sae_lens" 2>/dev/null || echo "[gpu] warning: sae_lens does not import; its peers will be skipped"

echo "[gpu] build (CUDA sources join when torch has CUDA and nvcc is on the PATH)"
"$PY" setup.py build_ext --inplace >build-gpu.log 2>&1 || { tail -50 build-gpu.log; exit 1; }
"$PY" -c "import sparsekern as s; b = s.backends(); print('backends:', b); assert 'cuda' in b, b"

echo "[gpu] GPU tests"
gpu_tests=()
[ "$ENC_ONLY" = 1 ] || [ "$STEP_ONLY" = 1 ] || gpu_tests+=(tests/test_gpu_kernels.py)
[ -f tests/test_triton_gpu.py ] && gpu_tests+=(tests/test_triton_gpu.py)
ksel=(); [ "$STEP_ONLY" = 1 ] && ksel=(-k encode_grad)
[ "${#gpu_tests[@]}" = 0 ] || "$PY" -m pytest "${gpu_tests[@]}" "${ksel[@]}" -q -p no:cacheprovider -rs || status=$?

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
  # the full cuda suite includes the encoder target plan, so it feeds the target table too
  ops=(); [ "$ENC_ONLY" = 1 ] && ops=(--ops topk_encode,threshold_encode)
  marker=$(mktemp)
  for dtype in float32 bfloat16; do
    echo "[gpu] benchmarks ($dtype${ops[*]:+, ${ops[*]}})"
    "$PY" -m sparsekern.cli bench --device cuda --dtype "$dtype" "${ops[@]}" --no-progress || status=$?
  done
  mapfile -t results < <(find benchmarks/results -maxdepth 1 -name 'ops-*.json' -newer "$marker" | sort)
  rm -f "$marker"
  echo "[gpu] encoder targets (issue 10)"
  if [ "${#results[@]}" -gt 0 ]; then
    "$PY" -m sparsekern.bench.targets "${results[@]}" || status=$?
    echo "[gpu] measured encoder strategy per op (commit with: python -m sparsekern.bench.choose_strategy FILES --write)"
    "$PY" -m sparsekern.bench.choose_strategy "${results[@]}" || true
  else
    echo "no benchmark results written"; status=1
  fi
fi
if [ "$FEATURES" = 1 ]; then
  echo "[gpu] feature-analysis benchmark (issue 11)"
  "$PY" -m sparsekern.cli bench features --device cuda --no-progress || status=$?
fi
if [ "$TRAINING" = 1 ]; then
  cases=(); [ "$STEP_ONLY" = 1 ] && cases=(--cases step)
  for dtype in float32 bfloat16; do
    echo "[gpu] training benchmark (issue 12, $dtype${cases[*]:+, ${cases[*]}})"
    "$PY" -m sparsekern.cli bench training --device cuda --dtype "$dtype" "${cases[@]}" --no-progress || status=$?
  done
fi
exit "${status:-0}"
