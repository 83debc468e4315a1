/* A stand-in for libcublas.so.<major> that multiplies *host* memory, so that the cuda backend's fused linear loop
 * (csrc/cuda/vocab_softmax_loop.cpp, run on host buffers by ra3._C._host_vocab_softmax_loop_*) can be checked on a machine
 * with no GPU. It exports the five entry points ra3 resolves, follows cuBLAS's column-major conventions, and
 * rejects (CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED) what real cuBLAS rejects: leading dimensions below the
 * stored rows, A and B of different types, type combinations cublasGemmEx does not offer. With beta == 0 it never
 * reads C (cuBLAS's rule: C may hold garbage then). Accumulates in double.
 *
 * Built by tests/test_vocab_softmax_loop.py: cc -shared -fPIC -DFAKE_MAJOR=13 [-DFAKE_OMIT_GEMM] fake_cublas.c
 */
#include <stdint.h>
#include <string.h>

#ifndef FAKE_MAJOR
#define FAKE_MAJOR 13
#endif

enum { OK = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_64F = 70 };

static int handle_storage;

int cublasCreate_v2(void** handle) {
  *handle = &handle_storage;
  return OK;
}

int cublasSetStream_v2(void* handle, void* stream) {
  (void)stream;
  return handle == &handle_storage ? OK : INVALID_VALUE;
}

const char* cublasGetStatusString(int status) {
  switch (status) {
    case OK: return "CUBLAS_STATUS_SUCCESS";
    case INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

int cublasGetProperty(int type, int* value) {
  *value = type == 0 ? FAKE_MAJOR : (type == 1 ? 99 : 0);
  return OK;
}

static double load(const void* p, int type, int64_t i) {
  switch (type) {
    case R_32F: return ((const float*)p)[i];
    case R_64F: return ((const double*)p)[i];
    case R_16F: return (double)((const _Float16*)p)[i];
    default: { /* R_16BF: the top half of a float */
      uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
      float f;
      memcpy(&f, &u, 4);
      return f;
    }
  }
}

#ifndef FAKE_OMIT_GEMM
int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                 int a_type, int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type,
                 int ldc, int compute, int algo) {
  (void)algo;
  if (handle != &handle_storage || m < 0 || n < 0 || k < 0) return INVALID_VALUE;
  if ((transa != 0 && transa != 1) || (transb != 0 && transb != 1)) return INVALID_VALUE;
  if (lda < (transa ? k : m) || lda < 1 || ldb < (transb ? n : k) || ldb < 1 || ldc < m || ldc < 1)
    return INVALID_VALUE;
  if (a_type != b_type) return NOT_SUPPORTED;
  const int f32 = compute == COMPUTE_32F && c_type == R_32F &&
                  (a_type == R_32F || a_type == R_16F || a_type == R_16BF);
  const int f64 = compute == COMPUTE_64F && c_type == R_64F && a_type == R_64F;
  if (!f32 && !f64) return NOT_SUPPORTED;
  const double al = f64 ? *(const double*)alpha : *(const float*)alpha;
  const double be = f64 ? *(const double*)beta : *(const float*)beta;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      double acc = 0;
      for (int64_t l = 0; l < k; ++l) {
        const double a = load(A, a_type, transa ? l + i * (int64_t)lda : i + l * (int64_t)lda);
        const double b = load(B, b_type, transb ? j + l * (int64_t)ldb : l + j * (int64_t)ldb);
        acc += a * b;
      }
      const int64_t at = i + j * (int64_t)ldc;
      double c = al * acc;
      if (be != 0) c += be * load(C, c_type, at);
      if (f64)
        ((double*)C)[at] = c;
      else
        ((float*)C)[at] = (float)c;
    }
  }
  return OK;
}
#endif
