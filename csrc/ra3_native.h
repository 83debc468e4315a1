// The torch-free boundary of ra3._C: every kernel entry point, CPU and CUDA, as plain C++ declarations.
//
// Conventions (the Python side, ra3/ops/_kernels.py, validates everything before calling):
//   * a pointer is a `uintptr_t` (Python int from tensor.data_ptr()); 0 means "absent";
//   * `dtype` 0 = float32, 1 = float64: every floating buffer of one call has that dtype and all arithmetic and
//     accumulation happens in it; index buffers (targets, segment ids, group ids) are int64;
//   * buffers are contiguous unless a leading dimension `ld*` (in elements) is given;
//   * CUDA twins take the same arguments plus a final `stream` (a cudaStream_t as an integer, 0 = default stream),
//     launch asynchronously on it and throw std::runtime_error on a launch error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ra3 {

// Softmax-over-vocabulary modes shared by vocab_softmax_fwd and vocab_softmax_grad.
enum SoftmaxMode : int { kLogprob = 0, kEntropy = 1, kExactKl = 2 };
// Normalisations of group_adv_* (kNormBatchStd: centred per group, scaled by the whole batch's std), and the
// aggregations (kTokenSumNorm: the masked token sum over a given normaliser), importance-ratio levels and
// surrogates of policy_loss_fwd.
enum GroupNormalize : int { kNormNone = 0, kNormMean = 1, kNormStd = 2, kNormRloo = 3, kNormBatchStd = 4 };
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kTokenSumNorm = 3 };
enum RatioLevel : int { kRatioToken = 0, kRatioSequence = 1 };
enum Surrogate : int { kSurrogatePpo = 0, kSurrogateCispo = 1 };

inline void check_dtype(int dtype) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("dtype must be 0 (float32) or 1 (float64), got " + std::to_string(dtype));
}

inline void check_softmax_mode(int mode) {
  if (mode < kLogprob || mode > kExactKl)
    throw std::invalid_argument("mode must be 0 (logprob), 1 (entropy) or 2 (exact KL), got " + std::to_string(mode));
}

inline void check_estimator(int estimator) {
  if (estimator < 1 || estimator > 3)
    throw std::invalid_argument("estimator must be 1 (k1), 2 (k2) or 3 (k3), got " + std::to_string(estimator));
}

inline void check_normalize(int normalize) {
  if (normalize < kNormNone || normalize > kNormBatchStd)
    throw std::invalid_argument("normalize must be 0 (none), 1 (mean), 2 (std), 3 (rloo) or 4 (batch-std), got " +
                                std::to_string(normalize));
}

inline void check_aggregation(int aggregation) {
  if (aggregation < kTokenMean || aggregation > kTokenSumNorm)
    throw std::invalid_argument(
        "aggregation must be 0 (token-mean), 1 (seq-mean-token-sum), 2 (seq-mean-token-mean) or 3 (token sum / "
        "agg_norm), got " + std::to_string(aggregation));
}

inline void check_ratio_level(int ratio_level) {
  if (ratio_level != kRatioToken && ratio_level != kRatioSequence)
    throw std::invalid_argument("ratio_level must be 0 (token) or 1 (sequence), got " + std::to_string(ratio_level));
}

inline void check_surrogate(int surrogate) {
  if (surrogate != kSurrogatePpo && surrogate != kSurrogateCispo)
    throw std::invalid_argument("surrogate must be 0 (ppo) or 1 (cispo), got " + std::to_string(surrogate));
}

// Typed views of the integer addresses that cross the Python boundary.
template <typename T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* mptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Calls fn.template operator()<T>() with T = float or double from the dtype tag.
template <typename Fn>
void dispatch_dtype(int dtype, Fn&& fn) {
  check_dtype(dtype);
  if (dtype == 0)
    fn(float{});
  else
    fn(double{});
}

// vocab_softmax_fwd folds a chunk of x = z * inv_temp into the running per-row state: m the max of x, s = sum
// exp(x - m), and a = sum exp(x - m) * (x - m) (mode 1, entropy, relative to the max so it stays small where the
// logits are large) or sum exp(x - m) * (x - y) (mode 2, exact KL with y = r * inv_temp, whose state mr, sr is
// that of y). vocab_softmax_grad takes the finished state apart: m, logs = log s and q = a / s (modes 1-2), so that
// x - m is exact near the max and log p = (x - m) - logs, entropy + log p = (x - m) - q and
// log p - log p_ref - KL = (x - y) - q lose nothing to a rounded log-sum-exp of large logits.
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_FWD                                                                      \
  int mode, int dtype, uintptr_t z, int64_t ldz, uintptr_t r, int64_t ldr, int64_t n, int64_t vc,              \
      int64_t v_offset, double inv_temp, uintptr_t targets, uintptr_t m, uintptr_t s, uintptr_t a,             \
      uintptr_t mr, uintptr_t sr, uintptr_t tgt
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_GRAD                                                                     \
  int mode, int dtype, uintptr_t z, int64_t ldz, uintptr_t r, int64_t ldr, uintptr_t out, int64_t ldo,         \
      int64_t n, int64_t vc, int64_t v_offset, double inv_temp, uintptr_t targets, uintptr_t m,                \
      uintptr_t logs, uintptr_t q, uintptr_t g
#define RA3_KERNEL_ARGS_SEGMENT_SUM_FWD                                                                        \
  int dtype, uintptr_t values, uintptr_t ids, int64_t n, int64_t num_segments, uintptr_t out
#define RA3_KERNEL_ARGS_SEGMENT_SUM_BWD int dtype, uintptr_t grad_out, uintptr_t ids, int64_t n, uintptr_t grad_values
#define RA3_KERNEL_ARGS_KL_ESTIMATOR_FWD                                                                       \
  int dtype, int estimator, uintptr_t lp, uintptr_t ref, int64_t n, uintptr_t out
#define RA3_KERNEL_ARGS_KL_ESTIMATOR_BWD                                                                       \
  int dtype, int estimator, uintptr_t lp, uintptr_t ref, uintptr_t g, int64_t n, uintptr_t grad_lp
#define RA3_KERNEL_ARGS_GROUP_ADV_FWD                                                                          \
  int dtype, uintptr_t rewards, uintptr_t gids, int64_t n, int64_t num_groups, int normalize, double eps,      \
      uintptr_t out, uintptr_t mean, uintptr_t std_out
#define RA3_KERNEL_ARGS_GROUP_ADV_BWD                                                                          \
  int dtype, uintptr_t rewards, uintptr_t gids, int64_t n, int64_t num_groups, int normalize, double eps,      \
      uintptr_t mean, uintptr_t std_in, uintptr_t g, uintptr_t grad_r
// policy_loss_fwd: ratio_level 1 uses each row's exp(weighted mean of lp - old) as every token's ratio (GSPO);
// surrogate 1 is CISPO's -sg(clip(ratio)) A lp; aggregation 3 divides the masked token sum by agg_norm (0 gives
// loss 0), which aggregations 0-2 ignore.
#define RA3_KERNEL_ARGS_POLICY_LOSS_FWD                                                                        \
  int dtype, int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, int adv_per_token,              \
      uintptr_t mask, uintptr_t ref, double kl_coef, int kl_estimator, double clip_low, double clip_high,      \
      int ratio_level, int surrogate, int aggregation, double agg_norm, uintptr_t loss_out, uintptr_t grad_lp, \
      uintptr_t stats_out

// The fused linear ops' whole vocabulary loop (CUDA only; csrc/cuda/vocab_softmax_loop.cpp). A "source" is one
// model's (hidden [n, h], weight [vocab, h], bias [vocab] or 0), contiguous; in_dtype 0 float32, 1 float64,
// 2 bfloat16, 3 float16 is the dtype of its hidden and weight (the GEMM operands), the bias is in `dtype`, the
// compute dtype of every other buffer. The ref_* source is read only by mode 2 (exact KL). `tile` / `ref_tile`
// are scratch of n * chunk compute-dtype elements, `ones` n ones in `dtype` (only with a bias). Backward with
// in_dtype 2: the float32 gradient tile goes to the GEMMs as `bf16_terms` bfloat16 tiles in `tile16`
// (bf16_terms * round_up(n * chunk, 8) elements; the second starts at round_up(n * w, 8) for a chunk of w):
// 1 = rounded once (the precision of Liger-Kernel and Cut Cross-Entropy), 2 = hi + lo (two GEMMs each,
// float32-class gradients).
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES                                                             \
  int in_dtype, uintptr_t hidden, uintptr_t weight, uintptr_t bias, int64_t h, int ref_in_dtype,               \
      uintptr_t ref_hidden, uintptr_t ref_weight, uintptr_t ref_bias, int64_t ref_h
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_FWD                                                                 \
  int mode, int dtype, int64_t n, int64_t vocab, int64_t chunk, RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES,    \
      double inv_temp, uintptr_t targets, uintptr_t ones, uintptr_t tile, uintptr_t ref_tile, uintptr_t m,     \
      uintptr_t s, uintptr_t a, uintptr_t mr, uintptr_t sr, uintptr_t tgt
// grad_hidden [n, h] is overwritten; grad_weight [vocab, h] and grad_bias [vocab] (0 = not wanted) too.
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_GRAD                                                                \
  int mode, int dtype, int64_t n, int64_t vocab, int64_t chunk, RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_SOURCES,    \
      double inv_temp, uintptr_t targets, uintptr_t m, uintptr_t logs, uintptr_t q, uintptr_t g,               \
      uintptr_t ones, uintptr_t tile, uintptr_t ref_tile, uintptr_t tile16, int bf16_terms,                    \
      uintptr_t grad_hidden, uintptr_t grad_weight, uintptr_t grad_bias
// Next-token cross-entropy's token loop (CUDA only): per chunk of `rows` tokens, the [rows, vocab] logits tile of
// one source, its online log-sum-exp into m, s, tgt (initialised by the caller) and logs = log s [n], and, while the
// tile is in memory, the gradient for the per-row upstream g [n] into grad_hidden [n, h] (overwritten), grad_weight
// [vocab, h] and grad_bias [vocab] (accumulated from zero here); a gradient pointer of 0 is not computed. `tile`
// holds rows * vocab compute-dtype elements, `tile16` bf16_terms * round_up(rows * vocab, 8) bfloat16 (in_dtype 2
// with gradients).
#define RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY                                                       \
  int dtype, int64_t n, int64_t vocab, int64_t rows, int in_dtype, uintptr_t hidden, uintptr_t weight,         \
      uintptr_t bias, int64_t h, double inv_temp, uintptr_t targets, uintptr_t g, uintptr_t ones, uintptr_t tile, \
      uintptr_t tile16, int bf16_terms, uintptr_t m, uintptr_t s, uintptr_t tgt, uintptr_t logs,               \
      uintptr_t grad_hidden, uintptr_t grad_weight, uintptr_t grad_bias

namespace cpu {
void vocab_softmax_fwd(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_FWD);
void vocab_softmax_grad(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_GRAD);
void segment_sum_fwd(RA3_KERNEL_ARGS_SEGMENT_SUM_FWD);
void segment_sum_bwd(RA3_KERNEL_ARGS_SEGMENT_SUM_BWD);
void kl_estimator_fwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_FWD);
void kl_estimator_bwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_BWD);
void group_adv_fwd(RA3_KERNEL_ARGS_GROUP_ADV_FWD);
void group_adv_bwd(RA3_KERNEL_ARGS_GROUP_ADV_BWD);
void policy_loss_fwd(RA3_KERNEL_ARGS_POLICY_LOSS_FWD);
}  // namespace cpu

#ifdef RA3_WITH_CUDA
namespace cuda {
void vocab_softmax_fwd(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_FWD, uintptr_t stream);
void vocab_softmax_grad(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_GRAD, uintptr_t stream);
void segment_sum_fwd(RA3_KERNEL_ARGS_SEGMENT_SUM_FWD, uintptr_t stream);
void segment_sum_bwd(RA3_KERNEL_ARGS_SEGMENT_SUM_BWD, uintptr_t stream);
void kl_estimator_fwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_FWD, uintptr_t stream);
void kl_estimator_bwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_BWD, uintptr_t stream);
void group_adv_fwd(RA3_KERNEL_ARGS_GROUP_ADV_FWD, uintptr_t stream);
void group_adv_bwd(RA3_KERNEL_ARGS_GROUP_ADV_BWD, uintptr_t stream);
void policy_loss_fwd(RA3_KERNEL_ARGS_POLICY_LOSS_FWD, uintptr_t stream);
void vocab_softmax_loop_fwd(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_FWD, uintptr_t stream);
void vocab_softmax_loop_grad(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_GRAD, uintptr_t stream);
// The same loop on host buffers with the CPU tile kernels: for tests only, with a cuBLAS stand-in that takes host
// pointers (RA3_CUBLAS_LIBRARY); a real cuBLAS would fault on them.
void host_vocab_softmax_loop_fwd(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_FWD);
void host_vocab_softmax_loop_grad(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_GRAD);
void vocab_softmax_loop_cross_entropy(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY, uintptr_t stream);
void host_vocab_softmax_loop_cross_entropy(RA3_KERNEL_ARGS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY);
// The cuBLAS the linear ops call, loaded on first use: (path, major, minor, patch); throws std::runtime_error
// naming what was tried when none loads.
struct CublasInfo {
  std::string path;
  int major, minor, patch;
};
CublasInfo cublas_info();
// The CUDA runtime version this module was built against (e.g. 13000), for build_info().
int runtime_version();
// True when a driver is installed whose CUDA version is at least the runtime's major version (the runtime is
// linked statically, so an older driver cannot run the kernels); creates no context.
bool driver_supports_runtime();
}  // namespace cuda
#endif

}  // namespace ra3
