// Shared pieces of the CUDA twins: error checks, the device guard, stream-ordered scratch (host code, also for
// the plain C++ files), and block reductions (device code, nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../ra3_native.h"

namespace ra3::cuda {

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("ra3._C: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Call after every launch: reports bad configurations and earlier asynchronous failures as RuntimeError.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Makes the device that owns `ptr` current for the scope (the caller's tensors may live on another GPU than the
// thread's current one); a no-op on single-GPU machines.
class DeviceGuard {
 public:
  explicit DeviceGuard(uintptr_t ptr) {
    static const int device_count = [] {
      int count = 0;
      if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        count = 0;
      }
      return count;
    }();
    if (device_count <= 1 || ptr == 0) return;
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return;
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != attr.device) {
      check(cudaSetDevice(attr.device), "cudaSetDevice");
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Stream-ordered temporary device memory (cudaMallocAsync / cudaFreeAsync): freed after the kernels that use it.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync");
  }
  ~Scratch() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535 * 8) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

#ifdef __CUDACC__  // device code below; the host part above also serves plain C++ files (csrc/cuda/*.cpp)
constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // blocks have at most 1024 threads

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums N values per thread over the block; every thread gets the totals. Needs blockDim.x % 32 == 0.
template <typename T, int N>
__device__ void block_sum(T (&v)[N]) {
  __shared__ T partial[N][kMaxWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    T x = lane < warps ? partial[k][lane] : T(0);
    v[k] = warp_sum(x);
  }
}
#endif  // __CUDACC__

}  // namespace ra3::cuda
