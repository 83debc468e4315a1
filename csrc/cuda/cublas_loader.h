// cuBLAS for the fused linear ops, resolved at run time (dlopen) instead of linked.
//
// Why not link it: a module that names libcublas.so as a dependency fails to import wherever that library is
// absent (every CPU-only machine, and CI), and linking it statically adds hundreds of MB. At run time on a GPU
// machine the library is already in the process: torch's CUDA build loads its own libcublas.so.<major> at
// `import torch`, so dlopen by soname hands back that copy (no second cuBLAS, one set of handles per thread).
//
// Only the handful of entry points below are declared, by their C ABI (enums are ints); when the real
// cublas_api.h is on the include path, cublas_loader.cpp checks every constant against it at compile time
// (tests/test_native_build.py compiles that check in CI against the header of the nvidia-cublas wheel).
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>
#include <string>

namespace ra3::cuda::blas {

enum Op : int { kNoTrans = 0, kTrans = 1 };                    // cublasOperation_t
enum ComputeType : int { kCompute32F = 68, kCompute64F = 70 };  // cublasComputeType_t (no TF32, no reduced)
constexpr int kGemmDefault = -1;                               // cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT
constexpr int kStatusSuccess = 0;                              // cublasStatus_t CUBLAS_STATUS_SUCCESS

// Where the library came from and its version; throws std::runtime_error naming every place tried when no
// cuBLAS of this build's CUDA major version can be loaded. Loads once per process.
struct LibraryInfo {
  std::string path;  // what dlopen was given
  int major, minor, patch;
};
const LibraryInfo& library();

// C = alpha * op(A) @ op(B) + beta * C in cuBLAS's column-major convention, on `stream`, with the calling
// thread's handle for `device` (the current CUDA device; host-buffer tests pass -1). a, b, c are addresses.
// Throws std::invalid_argument when a size does not fit cuBLAS's int, std::runtime_error on a cuBLAS error
// (the message names `what` and the status).
void gemm(int device, cudaStream_t stream, Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, double alpha,
          uintptr_t a, cudaDataType a_type, int64_t lda, uintptr_t b, cudaDataType b_type, int64_t ldb, double beta,
          uintptr_t c, cudaDataType c_type, int64_t ldc, ComputeType compute, const char* what);

}  // namespace ra3::cuda::blas
