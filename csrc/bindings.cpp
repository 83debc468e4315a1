// The pybind11 module ra3._C: thin wrappers that release the GIL and forward integer addresses to the kernels.
//
// Nothing here includes torch: the Python side (ra3/ops/kernel_abi.py) passes each kernel's argument NamedTuple
// (tensors are read through their data_ptr() method) and the CUDA stream handle, so one build of this module works
// with any torch version.
// C++ exceptions become Python exceptions: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "ra3_native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// An argument struct from its NamedTuple (ra3/ops/kernel_abi.py). The tuple's type is checked once, by field name
// and order against the struct's (a field the two sides spell or order differently is a TypeError naming it, never
// a value landing in the wrong place); after that the fields are read by position, which keeps a call's overhead
// to about a microsecond. A pointer field takes a tensor (its data_ptr()), None (0) or an integer address.
namespace pybind11::detail {
template <typename T>
T args_field(handle value, const char* owner, const char* name) {
  try {
    if constexpr (std::is_same_v<T, uintptr_t>) {
      if (value.is_none()) return 0;
      if (!PyLong_Check(value.ptr()) && hasattr(value, "data_ptr")) return value.attr("data_ptr")().cast<T>();
    }
    return value.cast<T>();
  } catch (const cast_error&) {
    throw type_error(std::string(owner) + "." + name + ": cannot take " + std::string(repr(value)) + " (" +
                     std::string(str(type::handle_of(value).attr("__name__"))) + ")");
  }
}

// Throws unless src is a tuple whose type's _fields are `names`, in order; remembers the types that passed.
inline void check_args_type(handle src, const char* owner, std::initializer_list<const char*> names,
                            std::unordered_set<PyTypeObject*>& checked) {
  PyTypeObject* type = Py_TYPE(src.ptr());
  if (checked.count(type)) return;
  if (!PyTuple_Check(src.ptr()) || !hasattr(src, "_fields"))
    throw type_error(std::string(owner) + ": expected the NamedTuple ra3.ops.kernel_abi." + owner + ", got " +
                     std::string(str(type::handle_of(src).attr("__name__"))));
  const tuple fields = src.attr("_fields");
  size_t i = 0;
  for (const char* name : names) {
    const std::string got = i < fields.size() ? fields[i].cast<std::string>() : std::string("nothing");
    if (got != name)
      throw type_error(std::string(owner) + " has no field '" + name + "' at position " + std::to_string(i) +
                       " (its tuple has '" + got + "' there)");
    ++i;
  }
  if (fields.size() != names.size())
    throw type_error(std::string(owner) + " has " + std::to_string(names.size()) + " fields, its tuple " +
                     std::to_string(fields.size()));
  Py_INCREF(type);  // a checked type stays alive, so its address is never reused by another
  checked.insert(type);
}

// (the field's type from the struct itself: the FIELDS lists name ra3's types unqualified, e.g. LinearSourceArgs)
#define RA3_ARGS_NAME(type, name) #name,
#define RA3_ARGS_LOAD(type, name) \
  value.name = args_field<decltype(value.name)>(PyTuple_GET_ITEM(src.ptr(), i++), kName, #name);
#define RA3_ARGS_CASTER(Struct, FIELDS)                                                                        \
  template <>                                                                                                  \
  struct type_caster<ra3::Struct> {                                                                            \
    PYBIND11_TYPE_CASTER(ra3::Struct, const_name(#Struct));                                                    \
    static constexpr const char* kName = #Struct;                                                              \
    bool load(handle src, bool) {                                                                              \
      static std::unordered_set<PyTypeObject*> checked;  /* guarded by the GIL */                              \
      check_args_type(src, kName, {FIELDS(RA3_ARGS_NAME)}, checked);                                           \
      Py_ssize_t i = 0;                                                                                        \
      FIELDS(RA3_ARGS_LOAD)                                                                                    \
      return true;                                                                                             \
    }                                                                                                          \
    static handle cast(const ra3::Struct&, return_value_policy, handle) { return none().release(); }           \
  };
RA3_ARGS_STRUCTS(RA3_ARGS_CASTER)
#undef RA3_ARGS_CASTER
#undef RA3_ARGS_LOAD
#undef RA3_ARGS_NAME
}  // namespace pybind11::detail

#ifndef RA3_CUDA_ARCHS
#define RA3_CUDA_ARCHS ""
#endif
#ifndef RA3_BUILD_TYPE
#define RA3_BUILD_TYPE ""
#endif

namespace {

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) out.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler_name();
  info["build_type"] = std::string(RA3_BUILD_TYPE);
#ifdef RA3_WITH_CUDA
  const int v = ra3::cuda::runtime_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["cuda_archs"] = split_archs(RA3_CUDA_ARCHS);
#else
  info["cuda_version"] = py::none();
  info["cuda_archs"] = std::vector<std::string>{};
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
#ifdef RA3_TARGET_CLONES
  info["cpu_isa_variants"] = std::vector<std::string>{"x86-64", "x86-64-v3", "x86-64-v4"};  // picked at load time
#else
  info["cpu_isa_variants"] = std::vector<std::string>{};
#endif
  info["cpu_arch"] = std::string(RA3_CPU_ARCH);  // "" = the portable build
  return info;
}

// The argument structs and constants by name, for the test that holds ra3/ops/kernel_abi.py to them.
py::dict abi_info() {
  py::dict structs, constants;
#define RA3_ABI_FIELD(type, name) #name,
#define RA3_ABI_STRUCT(Struct, FIELDS) structs[#Struct] = std::vector<std::string>{FIELDS(RA3_ABI_FIELD)};
  RA3_ARGS_STRUCTS(RA3_ABI_STRUCT)
#undef RA3_ABI_STRUCT
#undef RA3_ABI_FIELD
#define RA3_ABI_CONSTANT(name, value) constants[#name] = static_cast<int>(ra3::value);
  RA3_CONSTANTS(RA3_ABI_CONSTANT)
#undef RA3_ABI_CONSTANT
  py::dict out;
  out["structs"] = structs;
  out["constants"] = constants;
  return out;
}

}  // namespace

// Each kernel takes its argument struct (as `args`); the GIL is released once the struct is read.
#define RA3_DEF_CPU(name, doc)                                                                                 \
  m.def("cpu_" #name, &ra3::cpu::name, doc, py::arg("args"), py::call_guard<py::gil_scoped_release>())
#define RA3_DEF_CUDA(name, doc)                                                                                \
  m.def("cuda_" #name, &ra3::cuda::name, doc " Asynchronous on `stream` (a cudaStream_t as int, 0 = default).", \
        py::arg("args"), py::arg("stream"), py::call_guard<py::gil_scoped_release>())

PYBIND11_MODULE(_C, m) {
  m.doc() = "ra3 native kernels (C++/OpenMP CPU, CUDA): raw-pointer entry points called by ra3.ops, no torch ABI.";

  m.def("has_cuda", []() {
#ifdef RA3_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build contains the cuda_* kernels.");
  m.def("cuda_usable", []() {
#ifdef RA3_WITH_CUDA
    return ra3::cuda::driver_supports_runtime();
#else
    return false;
#endif
  }, "True when the cuda_* kernels are built and the installed driver is new enough for their CUDA runtime.");
  m.def("abi", &abi_info,
        "dict: structs (argument struct name -> its fields in order) and constants (name -> value) of the C ABI.");
  m.def("build_info", &build_info,
        "dict: compiler, build_type, cuda_version (str or None), cuda_archs (list), openmp, openmp_max_threads, "
        "cpu_isa_variants (list), cpu_arch (the -march of the CPU kernels, \"\" for the portable build).");

#define RA3_DEF_ALL(DEF)                                                                                       \
  DEF(vocab_softmax_fwd,                                                                                       \
      "Online log-sum-exp of one vocabulary chunk into the running per-row state (m, s, a[, mr, sr]); "        \
      "mode 0 also picks the target logit into tgt.");                                                         \
  DEF(vocab_softmax_grad,                                                                                      \
      "Gradient w.r.t. one logits chunk into out (may alias z) for mode 0 logprob, 1 entropy, 2 exact KL.");   \
  DEF(segment_sum_fwd, "out[k] = sum of values[i] with ids[i] == k (ids < 0 skipped).");                       \
  DEF(segment_sum_bwd, "grad_values[i] = grad_out[ids[i]], or 0 where ids[i] < 0.");                           \
  DEF(kl_estimator_fwd, "Per-token KL estimate k1/k2/k3 of d = lp - ref.");                                    \
  DEF(kl_estimator_bwd, "grad_lp = g * d(estimate)/d(lp).");                                                   \
  DEF(group_adv_fwd,                                                                                           \
      "Group advantages (normalize 0 none, 1 mean, 2 std, 3 rloo, 4 batch-std) plus per-group mean and the "   \
      "unbiased std that scales them (the group's, or the whole batch's for 4).");                             \
  DEF(group_adv_bwd, "Exact gradient of group_adv_fwd's out w.r.t. the rewards.");                             \
  DEF(policy_loss_fwd,                                                                                         \
      "PPO-clipped (or CISPO) loss with token or sequence (GSPO) ratios + KL penalty: loss_out[0], "           \
      "grad_lp[B, T], stats_out = (clip fraction, kl mean, ratio mean, mask sum).")

  RA3_DEF_ALL(RA3_DEF_CPU);
#ifdef RA3_WITH_CUDA
  RA3_DEF_ALL(RA3_DEF_CUDA);
  // CUDA only: the fused linear ops' vocabulary loop with its cuBLAS GEMMs (no CPU twin: the CPU backend's GEMMs
  // go through torch, since this module links no BLAS).
  RA3_DEF_CUDA(vocab_softmax_loop_fwd,
               "vocab_softmax_fwd over the whole vocabulary, each logits tile formed by cuBLAS (hidden @ weight.T).");
  RA3_DEF_CUDA(vocab_softmax_loop_grad,
               "vocab_softmax_grad over the whole vocabulary, with the cuBLAS GEMMs into grad_hidden, grad_weight and "
               "grad_bias.");
  RA3_DEF_CUDA(vocab_softmax_loop_cross_entropy,
               "Token chunks of cross-entropy: log-sum-exp into (m, s, logs) and, while each tile is in memory, the "
               "gradient for upstream g into grad_hidden, grad_weight, grad_bias.");
  // Tests only, apart from the module's surface: the extension loop on host buffers with the CPU tile kernels and
  // RA3_CUBLAS_LIBRARY's GEMM (tests/host_cuda_plugin.py runs the cuda backend's linear ops through it, no GPU).
  py::module_ testing = m.def_submodule(
      "testing", "Tests only: the cuda extension loop run on host buffers (CPU tile kernels, RA3_CUBLAS_LIBRARY's "
                 "GEMM), for machines with no GPU. Not part of ra3's API.");
  testing.def("vocab_softmax_loop_fwd", &ra3::cuda::host_vocab_softmax_loop_fwd,
              "cuda_vocab_softmax_loop_fwd's loop on host buffers.",
              py::arg("args"), py::call_guard<py::gil_scoped_release>());
  testing.def("vocab_softmax_loop_grad", &ra3::cuda::host_vocab_softmax_loop_grad,
              "cuda_vocab_softmax_loop_grad's loop on host buffers.",
              py::arg("args"), py::call_guard<py::gil_scoped_release>());
  testing.def("vocab_softmax_loop_cross_entropy", &ra3::cuda::host_vocab_softmax_loop_cross_entropy,
              "cuda_vocab_softmax_loop_cross_entropy's loop on host buffers.",
              py::arg("args"), py::call_guard<py::gil_scoped_release>());
  m.def("cublas_info", []() {
    const ra3::cuda::CublasInfo info = ra3::cuda::cublas_info();
    py::dict d;
    d["path"] = info.path;
    d["version"] = std::to_string(info.major) + "." + std::to_string(info.minor) + "." + std::to_string(info.patch);
    return d;
  }, "dict(path, version) of the cuBLAS the linear ops use, loaded on first call; RuntimeError naming every "
     "place tried when none loads.");
#endif
}
