// CUDA twins of csrc/cpu/kl_estimator.cpp: elementwise k1/k2/k3 and their gradient w.r.t. the policy log-probs.
#include "../ra3_native.h"
#include "../token_math.h"
#include "cuda_utils.cuh"

namespace ra3::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void kl_fwd_kernel(int estimator, const T* __restrict__ lp, const T* __restrict__ ref, int64_t n,
                              T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = kl_value<T>(estimator, lp[i] - ref[i]);
}

template <typename T>
__global__ void kl_bwd_kernel(int estimator, const T* __restrict__ lp, const T* __restrict__ ref,
                              const T* __restrict__ g, int64_t n, T* __restrict__ grad_lp) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    grad_lp[i] = g[i] * kl_dlogprob<T>(estimator, lp[i] - ref[i]);
}

}  // namespace

void kl_estimator_fwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_FWD, uintptr_t stream) {
  check_estimator(estimator);
  check_dtype(dtype);
  if (n <= 0) return;
  DeviceGuard guard(out);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_fwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(estimator, cptr<T>(lp),
                                                                                 cptr<T>(ref), n, mptr<T>(out));
  });
  check_launch("kl_estimator_fwd");
}

void kl_estimator_bwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_BWD, uintptr_t stream) {
  check_estimator(estimator);
  check_dtype(dtype);
  if (n <= 0) return;
  DeviceGuard guard(grad_lp);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_bwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
        estimator, cptr<T>(lp), cptr<T>(ref), cptr<T>(g), n, mptr<T>(grad_lp));
  });
  check_launch("kl_estimator_bwd");
}

}  // namespace ra3::cuda
