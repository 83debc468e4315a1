// Small element-wise passes between the fused linear ops' GEMMs (vocab_softmax_loop.cpp).
//
// float32 -> bfloat16 rounding of a gradient tile, so that the two backward GEMMs of the fused linear ops run
// on bf16 tensor cores (accumulating in float32) instead of at the float32 rate. With a second output the tile is
// split into hi + lo, hi = bf16(x), lo = bf16(x - hi): two bf16 GEMMs then carry ~16 mantissa bits instead of 8.
#include <cuda_bf16.h>

#include "cuda_utils.cuh"
#include "tile_ops.h"

namespace ra3::cuda {
namespace {

constexpr int kThreads = 256;

// Four elements per step (one 16-byte load, one 8-byte store) when both buffers allow it.
__device__ __forceinline__ __nv_bfloat162 residual(float x, float y, __nv_bfloat162 hi) {
  return __floats2bfloat162_rn(x - __low2float(hi), y - __high2float(hi));
}

__global__ void __launch_bounds__(kThreads)
    round_bf16_vec4(const float4* __restrict__ src, __nv_bfloat162* __restrict__ hi, __nv_bfloat162* __restrict__ lo,
                    int64_t quads) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const float4 v = src[q];
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    hi[2 * q] = a;
    hi[2 * q + 1] = b;
    if (lo != nullptr) {
      lo[2 * q] = residual(v.x, v.y, a);
      lo[2 * q + 1] = residual(v.z, v.w, b);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    round_bf16_scalar(const float* __restrict__ src, __nv_bfloat16* __restrict__ hi, __nv_bfloat16* __restrict__ lo,
                      int64_t begin, int64_t end) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    const __nv_bfloat16 h = __float2bfloat16_rn(src[i]);
    hi[i] = h;
    if (lo != nullptr) lo[i] = __float2bfloat16_rn(src[i] - __bfloat162float(h));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) log_kernel(const T* __restrict__ s, T* __restrict__ logs, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) logs[i] = log(s[i]);
}

}  // namespace

void log_of(int dtype, uintptr_t s, uintptr_t logs, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    log_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(cptr<T>(s), mptr<T>(logs), n);
  });
  check_launch("log_of");
}

void round_to_bf16(uintptr_t src, uintptr_t hi, uintptr_t lo, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  int64_t done = 0;
  if (src % 16 == 0 && hi % 8 == 0 && lo % 8 == 0) {
    const int64_t quads = count / 4;
    if (quads > 0) {
      round_bf16_vec4<<<grid_for(quads, kThreads), kThreads, 0, stream>>>(
          reinterpret_cast<const float4*>(src), reinterpret_cast<__nv_bfloat162*>(hi),
          reinterpret_cast<__nv_bfloat162*>(lo), quads);
      check_launch("round_to_bf16");
    }
    done = quads * 4;
  }
  if (done < count) {
    round_bf16_scalar<<<grid_for(count - done, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<const float*>(src), reinterpret_cast<__nv_bfloat16*>(hi), reinterpret_cast<__nv_bfloat16*>(lo),
        done, count);
    check_launch("round_to_bf16");
  }
}

}  // namespace ra3::cuda
