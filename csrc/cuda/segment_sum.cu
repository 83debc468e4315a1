// CUDA twins of csrc/cpu/segment_sum.cpp. The forward scatters with atomicAdd (order, hence the last bits of a
// float sum, may vary run to run); the backward is a gather.
#include "../ra3_native.h"
#include "cuda_utils.cuh"

namespace ra3::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void segment_sum_fwd_kernel(const T* __restrict__ values, const int64_t* __restrict__ ids, int64_t n,
                                       int64_t num_segments, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = ids[i];
    if (k >= 0 && k < num_segments) atomicAdd(out + k, values[i]);
  }
}

template <typename T>
__global__ void segment_sum_bwd_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ids, int64_t n,
                                       T* __restrict__ grad_values) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = ids[i];
    grad_values[i] = k >= 0 ? grad_out[k] : T(0);
  }
}

}  // namespace

void segment_sum_fwd(const SegmentSumFwdArgs& a, uintptr_t stream) {
  check_dtype(a.dtype);
  if (a.num_segments <= 0) return;
  DeviceGuard guard(a.out);
  const size_t elem = a.dtype == kFloat32 ? sizeof(float) : sizeof(double);
  // All-zero bytes are +0.0 in both float formats.
  check(cudaMemsetAsync(reinterpret_cast<void*>(a.out), 0, elem * a.num_segments, as_stream(stream)),
        "cudaMemsetAsync");
  if (a.n <= 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    segment_sum_fwd_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, as_stream(stream)>>>(
        cptr<T>(a.values), cptr<int64_t>(a.ids), a.n, a.num_segments, mptr<T>(a.out));
  });
  check_launch("segment_sum_fwd");
}

void segment_sum_bwd(const SegmentSumBwdArgs& a, uintptr_t stream) {
  check_dtype(a.dtype);
  if (a.n <= 0) return;
  DeviceGuard guard(a.grad_values);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    segment_sum_bwd_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, as_stream(stream)>>>(
        cptr<T>(a.grad_out), cptr<int64_t>(a.ids), a.n, mptr<T>(a.grad_values));
  });
  check_launch("segment_sum_bwd");
}

}  // namespace ra3::cuda
