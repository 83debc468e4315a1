// The pybind11 module ra3._C: thin wrappers that release the GIL and forward integer addresses to the kernels.
//
// Nothing here includes torch: the Python side (ra3/ops/_kernels.py) passes tensor.data_ptr() values, sizes,
// dtype tags and the CUDA stream handle, so one build of this module works with any torch version.
// C++ exceptions become Python exceptions: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "ra3_native.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

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

// Keyword names of the shared arguments, in contract order (see ra3_native.h).
#define RA3_PY_ARGS_VOCAB_SOFTMAX_FWD                                                                          \
  py::arg("mode"), py::arg("dtype"), py::arg("z"), py::arg("ldz"), py::arg("r"), py::arg("ldr"), py::arg("n"), \
      py::arg("vc"), py::arg("v_offset"), py::arg("inv_temp"), py::arg("targets"), py::arg("m"), py::arg("s"), \
      py::arg("a"), py::arg("mr"), py::arg("sr"), py::arg("tgt")
#define RA3_PY_ARGS_VOCAB_SOFTMAX_GRAD                                                                         \
  py::arg("mode"), py::arg("dtype"), py::arg("z"), py::arg("ldz"), py::arg("r"), py::arg("ldr"), py::arg("out"), \
      py::arg("ldo"), py::arg("n"), py::arg("vc"), py::arg("v_offset"), py::arg("inv_temp"), py::arg("targets"), \
      py::arg("m"), py::arg("logs"), py::arg("q"), py::arg("g")
#define RA3_PY_ARGS_SEGMENT_SUM_FWD                                                                            \
  py::arg("dtype"), py::arg("values"), py::arg("ids"), py::arg("n"), py::arg("num_segments"), py::arg("out")
#define RA3_PY_ARGS_SEGMENT_SUM_BWD                                                                            \
  py::arg("dtype"), py::arg("grad_out"), py::arg("ids"), py::arg("n"), py::arg("grad_values")
#define RA3_PY_ARGS_KL_ESTIMATOR_FWD                                                                           \
  py::arg("dtype"), py::arg("estimator"), py::arg("lp"), py::arg("ref"), py::arg("n"), py::arg("out")
#define RA3_PY_ARGS_KL_ESTIMATOR_BWD                                                                           \
  py::arg("dtype"), py::arg("estimator"), py::arg("lp"), py::arg("ref"), py::arg("g"), py::arg("n"),           \
      py::arg("grad_lp")
#define RA3_PY_ARGS_GROUP_ADV_FWD                                                                              \
  py::arg("dtype"), py::arg("rewards"), py::arg("gids"), py::arg("n"), py::arg("num_groups"),                  \
      py::arg("normalize"), py::arg("eps"), py::arg("out"), py::arg("mean"), py::arg("std")
#define RA3_PY_ARGS_GROUP_ADV_BWD                                                                              \
  py::arg("dtype"), py::arg("rewards"), py::arg("gids"), py::arg("n"), py::arg("num_groups"),                  \
      py::arg("normalize"), py::arg("eps"), py::arg("mean"), py::arg("std"), py::arg("g"), py::arg("grad_r")
#define RA3_PY_ARGS_POLICY_LOSS_FWD                                                                            \
  py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("lp"), py::arg("old"), py::arg("adv"),                 \
      py::arg("adv_per_token"), py::arg("mask"), py::arg("ref"), py::arg("kl_coef"), py::arg("kl_estimator"),  \
      py::arg("clip_low"), py::arg("clip_high"), py::arg("ratio_level"), py::arg("surrogate"),                 \
      py::arg("aggregation"), py::arg("agg_norm"), py::arg("loss_out"), py::arg("grad_lp"), py::arg("stats_out")

#define RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES                                                                 \
  py::arg("in_dtype"), py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("h"),                    \
      py::arg("ref_in_dtype"), py::arg("ref_hidden"), py::arg("ref_weight"), py::arg("ref_bias"), py::arg("ref_h")
#define RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_FWD                                                                     \
  py::arg("mode"), py::arg("dtype"), py::arg("n"), py::arg("vocab"), py::arg("chunk"),                       \
      RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES,                                                                 \
      py::arg("inv_temp"), py::arg("targets"), py::arg("ones"), py::arg("tile"), py::arg("ref_tile"),          \
      py::arg("m"), py::arg("s"), py::arg("a"), py::arg("mr"), py::arg("sr"), py::arg("tgt")
#define RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_GRAD                                                                    \
  py::arg("mode"), py::arg("dtype"), py::arg("n"), py::arg("vocab"), py::arg("chunk"),                       \
      RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES,                                                                 \
      py::arg("inv_temp"), py::arg("targets"), py::arg("m"), py::arg("logs"), py::arg("q"), py::arg("g"),      \
      py::arg("ones"), py::arg("tile"), py::arg("ref_tile"), py::arg("tile16"), py::arg("bf16_terms"),         \
      py::arg("grad_hidden"), py::arg("grad_weight"), py::arg("grad_bias")
#define RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY                                                           \
  py::arg("dtype"), py::arg("n"), py::arg("vocab"), py::arg("rows"), py::arg("in_dtype"), py::arg("hidden"),   \
      py::arg("weight"), py::arg("bias"), py::arg("h"), py::arg("inv_temp"), py::arg("targets"), py::arg("g"), \
      py::arg("ones"), py::arg("tile"), py::arg("tile16"), py::arg("bf16_terms"), py::arg("m"), py::arg("s"),  \
      py::arg("tgt"), py::arg("logs"), py::arg("grad_hidden"), py::arg("grad_weight"), py::arg("grad_bias")

}  // namespace

#define RA3_DEF_CPU(name, ARGS, doc)                                                                           \
  m.def("cpu_" #name, &ra3::cpu::name, doc, ARGS, py::call_guard<py::gil_scoped_release>())
#define RA3_DEF_CUDA(name, ARGS, doc)                                                                          \
  m.def("cuda_" #name, &ra3::cuda::name, doc " Asynchronous on `stream` (a cudaStream_t as int, 0 = default).", \
        ARGS, py::arg("stream"), py::call_guard<py::gil_scoped_release>())

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
  m.def("build_info", &build_info,
        "dict: compiler, build_type, cuda_version (str or None), cuda_archs (list), openmp, openmp_max_threads, "
        "cpu_isa_variants (list), cpu_arch (the -march of the CPU kernels, \"\" for the portable build).");

#define RA3_DEF_ALL(DEF)                                                                                       \
  DEF(vocab_softmax_fwd, RA3_PY_ARGS_VOCAB_SOFTMAX_FWD,                                                        \
      "Online log-sum-exp of one vocabulary chunk into the running per-row state (m, s, a[, mr, sr]); "        \
      "mode 0 also picks the target logit into tgt.");                                                         \
  DEF(vocab_softmax_grad, RA3_PY_ARGS_VOCAB_SOFTMAX_GRAD,                                                      \
      "Gradient w.r.t. one logits chunk into out (may alias z) for mode 0 logprob, 1 entropy, 2 exact KL.");   \
  DEF(segment_sum_fwd, RA3_PY_ARGS_SEGMENT_SUM_FWD, "out[k] = sum of values[i] with ids[i] == k (ids < 0 skipped)."); \
  DEF(segment_sum_bwd, RA3_PY_ARGS_SEGMENT_SUM_BWD, "grad_values[i] = grad_out[ids[i]], or 0 where ids[i] < 0."); \
  DEF(kl_estimator_fwd, RA3_PY_ARGS_KL_ESTIMATOR_FWD, "Per-token KL estimate k1/k2/k3 of d = lp - ref.");      \
  DEF(kl_estimator_bwd, RA3_PY_ARGS_KL_ESTIMATOR_BWD, "grad_lp = g * d(estimate)/d(lp).");                     \
  DEF(group_adv_fwd, RA3_PY_ARGS_GROUP_ADV_FWD,                                                                \
      "Group advantages (normalize 0 none, 1 mean, 2 std, 3 rloo, 4 batch-std) plus per-group mean and the "   \
      "unbiased std that scales them (the group's, or the whole batch's for 4).");                             \
  DEF(group_adv_bwd, RA3_PY_ARGS_GROUP_ADV_BWD, "Exact gradient of group_adv_fwd's out w.r.t. the rewards.");  \
  DEF(policy_loss_fwd, RA3_PY_ARGS_POLICY_LOSS_FWD,                                                            \
      "PPO-clipped (or CISPO) loss with token or sequence (GSPO) ratios + KL penalty: loss_out[0], "           \
      "grad_lp[B, T], stats_out = (clip fraction, kl mean, ratio mean, mask sum).")

  RA3_DEF_ALL(RA3_DEF_CPU);
#ifdef RA3_WITH_CUDA
  RA3_DEF_ALL(RA3_DEF_CUDA);
  // CUDA only: the fused linear ops' vocabulary loop with its cuBLAS GEMMs (no CPU twin: the CPU backend's GEMMs
  // go through torch, since this module links no BLAS).
  RA3_DEF_CUDA(vocab_softmax_loop_fwd, RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_FWD,
               "vocab_softmax_fwd over the whole vocabulary, each logits tile formed by cuBLAS (hidden @ weight.T).");
  RA3_DEF_CUDA(vocab_softmax_loop_grad, RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_GRAD,
               "vocab_softmax_grad over the whole vocabulary, with the cuBLAS GEMMs into grad_hidden, grad_weight and "
               "grad_bias.");
  RA3_DEF_CUDA(vocab_softmax_loop_cross_entropy, RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY,
               "Token chunks of cross-entropy: log-sum-exp into (m, s, logs) and, while each tile is in memory, the "
               "gradient for upstream g into grad_hidden, grad_weight, grad_bias.");
  // Tests only, apart from the module's surface: the extension loop on host buffers with the CPU tile kernels and
  // RA3_CUBLAS_LIBRARY's GEMM (tests/host_cuda_plugin.py runs the cuda backend's linear ops through it, no GPU).
  py::module_ testing = m.def_submodule(
      "testing", "Tests only: the cuda extension loop run on host buffers (CPU tile kernels, RA3_CUBLAS_LIBRARY's "
                 "GEMM), for machines with no GPU. Not part of ra3's API.");
  testing.def("vocab_softmax_loop_fwd", &ra3::cuda::host_vocab_softmax_loop_fwd,
              "cuda_vocab_softmax_loop_fwd's loop on host buffers.", RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_FWD,
              py::call_guard<py::gil_scoped_release>());
  testing.def("vocab_softmax_loop_grad", &ra3::cuda::host_vocab_softmax_loop_grad,
              "cuda_vocab_softmax_loop_grad's loop on host buffers.", RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_GRAD,
              py::call_guard<py::gil_scoped_release>());
  testing.def("vocab_softmax_loop_cross_entropy", &ra3::cuda::host_vocab_softmax_loop_cross_entropy,
              "cuda_vocab_softmax_loop_cross_entropy's loop on host buffers.",
              RA3_PY_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY, py::call_guard<py::gil_scoped_release>());
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
