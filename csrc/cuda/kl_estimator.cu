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

void kl_estimator_fwd(const KlEstimatorFwdArgs& a, uintptr_t stream) {
  check_estimator(a.estimator);
  check_dtype(a.dtype);
  if (a.n <= 0) return;
  DeviceGuard guard(a.out);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_fwd_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, as_stream(stream)>>>(
        a.estimator, cptr<T>(a.lp), cptr<T>(a.ref), a.n, mptr<T>(a.out));
  });
  check_launch("kl_estimator_fwd");
}

void kl_estimator_bwd(const KlEstimatorBwdArgs& a, uintptr_t stream) {
  check_estimator(a.estimator);
  check_dtype(a.dtype);
  if (a.n <= 0) return;
  DeviceGuard guard(a.grad_lp);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    kl_bwd_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, as_stream(stream)>>>(
        a.estimator, cptr<T>(a.lp), cptr<T>(a.ref), cptr<T>(a.g), a.n, mptr<T>(a.grad_lp));
  });
  check_launch("kl_estimator_bwd");
}

}  // namespace ra3::cuda
