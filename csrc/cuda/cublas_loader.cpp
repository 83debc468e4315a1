// Run-time loading of cuBLAS and the one GEMM entry point the fused linear ops use (see cublas_loader.h).
// Plain C++ (host compiler).
#include "cublas_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>


// Where the real header is visible, every hand-written constant and signature is checked against it.
#if __has_include(<cublas_api.h>)
#include <cublas_api.h>
#include <type_traits>
static_assert(int(ra3::cuda::blas::kNoTrans) == int(CUBLAS_OP_N) && int(ra3::cuda::blas::kTrans) == int(CUBLAS_OP_T));
static_assert(int(ra3::cuda::blas::kCompute32F) == int(CUBLAS_COMPUTE_32F));
static_assert(int(ra3::cuda::blas::kCompute64F) == int(CUBLAS_COMPUTE_64F));
static_assert(ra3::cuda::blas::kGemmDefault == CUBLAS_GEMM_DEFAULT);
static_assert(ra3::cuda::blas::kStatusSuccess == CUBLAS_STATUS_SUCCESS);
static_assert(sizeof(cublasStatus_t) == sizeof(int) && sizeof(cublasOperation_t) == sizeof(int) &&
              sizeof(cublasComputeType_t) == sizeof(int) && sizeof(cublasGemmAlgo_t) == sizeof(int));
#define RA3_CUBLAS_HEADER_CHECKED 1
#elif defined(RA3_REQUIRE_CUBLAS_HEADER)  // the test that compiles this check must not pass without the header
#error "RA3_REQUIRE_CUBLAS_HEADER is set but <cublas_api.h> is not on the include path"
#endif

namespace ra3::cuda::blas {
namespace {

using Handle = void*;  // cublasHandle_t: a pointer to an opaque struct
using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using GetPropertyFn = int (*)(int, int*);  // libraryPropertyType: 0 major, 1 minor, 2 patch
using StatusStringFn = const char* (*)(int);
using GemmExFn = int (*)(Handle, int, int, int, int, int, const void*, const void*, cudaDataType, int, const void*,
                         cudaDataType, int, const void*, void*, cudaDataType, int, int, int);

#ifdef RA3_CUBLAS_HEADER_CHECKED
// The real signatures with every enum read as int and the handle as void*, compared with the ones above.
template <typename T>
struct Abi {
  using type = T;
};
template <> struct Abi<cublasStatus_t> { using type = int; };
template <> struct Abi<cublasOperation_t> { using type = int; };
template <> struct Abi<cublasComputeType_t> { using type = int; };
template <> struct Abi<cublasGemmAlgo_t> { using type = int; };
template <> struct Abi<libraryPropertyType> { using type = int; };
template <> struct Abi<cublasHandle_t> { using type = Handle; };
template <> struct Abi<cublasHandle_t*> { using type = Handle*; };
template <typename R, typename... A>
struct Abi<R (*)(A...)> {
  using type = typename Abi<R>::type (*)(typename Abi<A>::type...);
};
template <typename Fn>
constexpr bool declared(Fn) {
  return true;
}
static_assert(std::is_same_v<Abi<decltype(&cublasCreate_v2)>::type, CreateFn>);
static_assert(std::is_same_v<Abi<decltype(&cublasSetStream_v2)>::type, SetStreamFn>);
static_assert(std::is_same_v<Abi<decltype(&cublasGetProperty)>::type, GetPropertyFn>);
static_assert(std::is_same_v<Abi<decltype(&cublasGetStatusString)>::type, StatusStringFn>);
// cublasGemmEx is overloaded in C++ (an inline wrapper takes the old cudaDataType compute type): pick the C one.
using RealGemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                      const void*, const void*, cudaDataType, int, const void*, cudaDataType, int,
                                      const void*, void*, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
static_assert(std::is_same_v<Abi<RealGemmEx>::type, GemmExFn> && declared(static_cast<RealGemmEx>(&cublasGemmEx)));
#endif

struct Api {
  LibraryInfo info;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  StatusStringFn status_string = nullptr;
  GemmExFn gemm_ex = nullptr;
};

constexpr int kMajor = CUDART_VERSION / 1000;  // cuBLAS and the (statically linked) runtime share a major version

template <typename Fn>
Fn symbol(void* lib, const char* name, const std::string& path) {
  dlerror();
  void* p = dlsym(lib, name);
  if (p == nullptr) throw std::runtime_error("ra3._C: " + path + " has no symbol " + name);
  return reinterpret_cast<Fn>(p);
}

Api load() {
  const std::string soname = "libcublas.so." + std::to_string(kMajor);
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("RA3_CUBLAS_LIBRARY"); env != nullptr && *env != '\0') candidates.push_back(env);
  candidates.push_back(soname);  // torch's copy when it is already loaded, else the loader's search path
  candidates.push_back("/usr/local/cuda/lib64/" + soname);
  std::string tried;
  for (const std::string& path : candidates) {
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* err = dlerror();
      tried += "\n  " + path + ": " + (err != nullptr ? err : "not found");
      continue;
    }
    Api api;
    api.info.path = path;
    api.create = symbol<CreateFn>(lib, "cublasCreate_v2", path);
    api.set_stream = symbol<SetStreamFn>(lib, "cublasSetStream_v2", path);
    api.status_string = symbol<StatusStringFn>(lib, "cublasGetStatusString", path);
    api.gemm_ex = symbol<GemmExFn>(lib, "cublasGemmEx", path);
    auto get_property = symbol<GetPropertyFn>(lib, "cublasGetProperty", path);
    int* parts[3] = {&api.info.major, &api.info.minor, &api.info.patch};
    for (int i = 0; i < 3; ++i) {
      if (get_property(i, parts[i]) != kStatusSuccess) *parts[i] = -1;
    }
    if (api.info.major != kMajor)
      throw std::runtime_error("ra3._C: " + path + " is cuBLAS " + std::to_string(api.info.major) +
                               ", this build needs cuBLAS " + std::to_string(kMajor));
    return api;  // the library stays loaded for the life of the process
  }
  throw std::runtime_error("ra3._C: cuBLAS " + std::to_string(kMajor) +
                           " could not be loaded (import torch's CUDA build first, or set RA3_CUBLAS_LIBRARY to "
                           "the library's path); tried:" + tried);
}

const Api& api() {
  // A failed load is remembered and rethrown: every call then reports the same reason.
  static std::once_flag once;
  static Api loaded;
  static std::string error;
  std::call_once(once, [] {
    try {
      loaded = load();
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
  return loaded;
}

std::string status_name(const Api& a, int status) {
  const char* s = a.status_string != nullptr ? a.status_string(status) : nullptr;
  return s != nullptr ? std::string(s) : "status " + std::to_string(status);
}

// One handle per (thread, device), created on first use and kept: creating one costs a context-wide allocation.
Handle handle_for(const Api& a, int device) {
  thread_local std::unordered_map<int, Handle> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  Handle h = nullptr;
  const int status = a.create(&h);
  if (status != kStatusSuccess) throw std::runtime_error("ra3._C: cublasCreate failed: " + status_name(a, status));
  handles.emplace(device, h);
  return h;
}

int as_int(int64_t v, const char* name, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(name) + " = " + std::to_string(v) + " of the " + what +
                                " GEMM does not fit cuBLAS's 32-bit sizes");
  return static_cast<int>(v);
}

}  // namespace

const LibraryInfo& library() { return api().info; }

void gemm(int device, cudaStream_t stream, Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, double alpha,
          uintptr_t a, cudaDataType a_type, int64_t lda, uintptr_t b, cudaDataType b_type, int64_t ldb, double beta,
          uintptr_t c, cudaDataType c_type, int64_t ldc, ComputeType compute, const char* what) {
  const Api& lib = api();
  const int im = as_int(m, "m", what), in = as_int(n, "n", what), ik = as_int(k, "k", what);
  const int ilda = as_int(lda, "lda", what), ildb = as_int(ldb, "ldb", what), ildc = as_int(ldc, "ldc", what);
  if (im == 0 || in == 0) return;
  Handle h = handle_for(lib, device);
  int status = lib.set_stream(h, stream);
  if (status != kStatusSuccess)
    throw std::runtime_error(std::string("ra3._C: cublasSetStream (") + what + ") failed: " + status_name(lib, status));
  const float alpha32 = static_cast<float>(alpha), beta32 = static_cast<float>(beta);
  const void* pa = compute == kCompute64F ? static_cast<const void*>(&alpha) : &alpha32;
  const void* pb = compute == kCompute64F ? static_cast<const void*>(&beta) : &beta32;
  status = lib.gemm_ex(h, op_a, op_b, im, in, ik, pa, reinterpret_cast<const void*>(a), a_type, ilda,
                       reinterpret_cast<const void*>(b), b_type, ildb, pb, reinterpret_cast<void*>(c), c_type, ildc,
                       compute, kGemmDefault);
  if (status != kStatusSuccess)
    throw std::runtime_error(std::string("ra3._C: cublasGemmEx (") + what + ") failed: " + status_name(lib, status));
}

}  // namespace ra3::cuda::blas
