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

void segment_sum_fwd(RA3_KERNEL_ARGS_SEGMENT_SUM_FWD, uintptr_t stream) {
  check_dtype(dtype);
  if (num_segments <= 0) return;
  DeviceGuard guard(out);
  const size_t elem = dtype == 0 ? sizeof(float) : sizeof(double);
  // All-zero bytes are +0.0 in both float formats.
  check(cudaMemsetAsync(reinterpret_cast<void*>(out), 0, elem * num_segments, as_stream(stream)), "cudaMemsetAsync");
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    segment_sum_fwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
        cptr<T>(values), cptr<int64_t>(ids), n, num_segments, mptr<T>(out));
  });
  check_launch("segment_sum_fwd");
}

void segment_sum_bwd(RA3_KERNEL_ARGS_SEGMENT_SUM_BWD, uintptr_t stream) {
  check_dtype(dtype);
  if (n <= 0) return;
  DeviceGuard guard(grad_values);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    segment_sum_bwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(
        cptr<T>(grad_out), cptr<int64_t>(ids), n, mptr<T>(grad_values));
  });
  check_launch("segment_sum_bwd");
}

}  // namespace ra3::cuda
