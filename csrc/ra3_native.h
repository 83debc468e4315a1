// The torch-free boundary of ra3._C: every kernel entry point, CPU and CUDA, as plain C++ declarations.
//
// Conventions (the Python side, ra3/ops/kernel_abi.py, mirrors the structs and constants below and validates
// everything before calling):
//   * each kernel takes one argument struct (see "Kernel arguments" below), CUDA twins plus a final `stream` (a
//     cudaStream_t as an integer, 0 = default stream): they launch asynchronously on it and throw
//     std::runtime_error on a launch error;
//   * a pointer is a `uintptr_t` (the binding takes a tensor's data_ptr(), None as 0, or an integer); 0 means
//     "absent";
//   * `dtype` (DType kFloat32 or kFloat64) is the compute dtype: every floating buffer of one call has it and all
//     arithmetic and accumulation happens in it; index buffers (targets, segment ids, group ids) are int64;
//   * buffers are contiguous unless a leading dimension `ld*` (in elements) is given.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ra3 {

// Dtype codes: of the compute (`dtype`: float32 or float64) and of GEMM operands (`in_dtype`: any of the four).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };
// Softmax-over-vocabulary modes shared by vocab_softmax_fwd and vocab_softmax_grad.
enum SoftmaxMode : int { kLogprob = 0, kEntropy = 1, kExactKl = 2 };
// Normalisations of group_adv_* (kNormBatchStd: centred per group, scaled by the whole batch's std), and the
// aggregations (kTokenSumNorm: the masked token sum over a given normaliser), importance-ratio levels and
// surrogates of policy_loss_fwd.
enum GroupNormalize : int { kNormNone = 0, kNormMean = 1, kNormStd = 2, kNormRloo = 3, kNormBatchStd = 4 };
enum Aggregation : int { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kTokenSumNorm = 3 };
enum RatioLevel : int { kRatioToken = 0, kRatioSequence = 1 };
enum Surrogate : int { kSurrogatePpo = 0, kSurrogateCispo = 1 };
// Every constant above as X(PYTHON_NAME, value), for ra3._C.abi() (the Python names of ra3/ops/kernel_abi.py).
#define RA3_CONSTANTS(X)                                                                                       \
  X(FLOAT32, kFloat32) X(FLOAT64, kFloat64) X(BFLOAT16, kBFloat16) X(FLOAT16, kFloat16) X(LOGPROB, kLogprob)   \
  X(ENTROPY, kEntropy) X(EXACT_KL, kExactKl) X(NORM_NONE, kNormNone) X(NORM_MEAN, kNormMean)                    \
  X(NORM_STD, kNormStd) X(NORM_RLOO, kNormRloo) X(NORM_BATCH_STD, kNormBatchStd) X(TOKEN_MEAN, kTokenMean)      \
  X(SEQ_MEAN_TOKEN_SUM, kSeqMeanTokenSum) X(SEQ_MEAN_TOKEN_MEAN, kSeqMeanTokenMean)                            \
  X(TOKEN_SUM_NORM, kTokenSumNorm) X(RATIO_TOKEN, kRatioToken) X(RATIO_SEQUENCE, kRatioSequence)               \
  X(SURROGATE_PPO, kSurrogatePpo) X(SURROGATE_CISPO, kSurrogateCispo)

inline void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat64)
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
  if (dtype == kFloat32)
    fn(float{});
  else
    fn(double{});
}

// ---- Kernel arguments: one struct per kernel, its fields written once, here, as X(type, name) --------------------
// The Python mirror is the NamedTuple of the same name in ra3/ops/kernel_abi.py (field for field, same order);
// bindings.cpp checks a tuple type's field names against these once, then reads its fields by position, and
// ra3._C.abi() lists them for the test that holds the two sides together.

// vocab_softmax_fwd folds a chunk of x = z * inv_temp into the running per-row state: m the max of x, s = sum
// exp(x - m), and a = sum exp(x - m) * (x - m) (mode 1, entropy, relative to the max so it stays small where the
// logits are large) or sum exp(x - m) * (x - y) (mode 2, exact KL with y = r * inv_temp, whose state mr, sr is
// that of y). z, r are [n, vc] chunks (row strides ldz, ldr) starting at vocabulary column v_offset; targets [n]
// (mode 0, -1 = ignored) picks the target's x into tgt.
#define RA3_FIELDS_VOCAB_SOFTMAX_FWD(X)                                                                        \
  X(int, mode) X(int, dtype) X(uintptr_t, z) X(int64_t, ldz) X(uintptr_t, r) X(int64_t, ldr) X(int64_t, n)     \
  X(int64_t, vc) X(int64_t, v_offset) X(double, inv_temp) X(uintptr_t, targets) X(uintptr_t, m)                \
  X(uintptr_t, s) X(uintptr_t, a) X(uintptr_t, mr) X(uintptr_t, sr) X(uintptr_t, tgt)
// vocab_softmax_grad takes the finished state apart: m, logs = log s and q = a / s (modes 1-2), so that x - m is
// exact near the max and log p = (x - m) - logs, entropy + log p = (x - m) - q and log p - log p_ref - KL =
// (x - y) - q lose nothing to a rounded log-sum-exp of large logits. Writes g[i] * d(value_i)/dz into out (row
// stride ldo; may alias z).
#define RA3_FIELDS_VOCAB_SOFTMAX_GRAD(X)                                                                       \
  X(int, mode) X(int, dtype) X(uintptr_t, z) X(int64_t, ldz) X(uintptr_t, r) X(int64_t, ldr) X(uintptr_t, out) \
  X(int64_t, ldo) X(int64_t, n) X(int64_t, vc) X(int64_t, v_offset) X(double, inv_temp) X(uintptr_t, targets) \
  X(uintptr_t, m) X(uintptr_t, logs) X(uintptr_t, q) X(uintptr_t, g)
#define RA3_FIELDS_SEGMENT_SUM_FWD(X)                                                                          \
  X(int, dtype) X(uintptr_t, values) X(uintptr_t, ids) X(int64_t, n) X(int64_t, num_segments) X(uintptr_t, out)
#define RA3_FIELDS_SEGMENT_SUM_BWD(X)                                                                          \
  X(int, dtype) X(uintptr_t, grad_out) X(uintptr_t, ids) X(int64_t, n) X(uintptr_t, grad_values)
#define RA3_FIELDS_KL_ESTIMATOR_FWD(X)                                                                         \
  X(int, dtype) X(int, estimator) X(uintptr_t, lp) X(uintptr_t, ref) X(int64_t, n) X(uintptr_t, out)
#define RA3_FIELDS_KL_ESTIMATOR_BWD(X)                                                                         \
  X(int, dtype) X(int, estimator) X(uintptr_t, lp) X(uintptr_t, ref) X(uintptr_t, g) X(int64_t, n)             \
  X(uintptr_t, grad_lp)
// group_adv_fwd writes out [n] and the per-group mean and std_dev [num_groups] (the unbiased std that scales them:
// the group's, or the whole batch's for normalize 4); group_adv_bwd reads them back.
#define RA3_FIELDS_GROUP_ADV_FWD(X)                                                                            \
  X(int, dtype) X(uintptr_t, rewards) X(uintptr_t, gids) X(int64_t, n) X(int64_t, num_groups) X(int, normalize) \
  X(double, eps) X(uintptr_t, out) X(uintptr_t, mean) X(uintptr_t, std_dev)
#define RA3_FIELDS_GROUP_ADV_BWD(X)                                                                            \
  X(int, dtype) X(uintptr_t, rewards) X(uintptr_t, gids) X(int64_t, n) X(int64_t, num_groups) X(int, normalize) \
  X(double, eps) X(uintptr_t, mean) X(uintptr_t, std_dev) X(uintptr_t, g) X(uintptr_t, grad_r)
// policy_loss_fwd: ratio_level 1 uses each row's exp(weighted mean of lp - old) as every token's ratio (GSPO);
// surrogate 1 is CISPO's -sg(clip(ratio)) A lp; aggregation 3 divides the masked token sum by agg_norm (0 gives
// loss 0), which aggregations 0-2 ignore. Writes loss_out[0], grad_lp [B, T] and stats_out = (clip fraction,
// kl mean, ratio mean, mask sum).
#define RA3_FIELDS_POLICY_LOSS_FWD(X)                                                                          \
  X(int, dtype) X(int64_t, B) X(int64_t, T) X(uintptr_t, lp) X(uintptr_t, old) X(uintptr_t, adv)               \
  X(int, adv_per_token) X(uintptr_t, mask) X(uintptr_t, ref) X(double, kl_coef) X(int, kl_estimator)           \
  X(double, clip_low) X(double, clip_high) X(int, ratio_level) X(int, surrogate) X(int, aggregation)          \
  X(double, agg_norm) X(uintptr_t, loss_out) X(uintptr_t, grad_lp) X(uintptr_t, stats_out)

// The fused linear ops' whole vocabulary loop (CUDA only; csrc/cuda/vocab_softmax_loop.cpp). A source is one
// model's hidden [n, h] and weight [vocab, h], contiguous, of GEMM dtype in_dtype (DType: float32, float64,
// bfloat16 or float16), and bias [vocab] (in the compute dtype `dtype`) or 0. The ref source is read only by mode 2
// (exact KL). `tile` / `ref_tile` are scratch of n * chunk compute-dtype elements, `ones` n ones in `dtype` (only
// with a bias). Backward with bfloat16 operands: the float32 gradient tile goes to the GEMMs as `bf16_terms`
// bfloat16 tiles in `tile16` (bf16_terms * round_up(n * chunk, 8) elements; the second starts at round_up(n * w, 8)
// for a chunk of w): 1 = rounded once (the precision of Liger-Kernel and Cut Cross-Entropy), 2 = hi + lo (two GEMMs
// each, float32-class gradients).
#define RA3_FIELDS_LINEAR_SOURCE(X)                                                                            \
  X(int, in_dtype) X(uintptr_t, hidden) X(uintptr_t, weight) X(uintptr_t, bias) X(int64_t, h)
#define RA3_FIELDS_VOCAB_SOFTMAX_LOOP_FWD(X)                                                                   \
  X(int, mode) X(int, dtype) X(int64_t, n) X(int64_t, vocab) X(int64_t, chunk) X(LinearSourceArgs, source)     \
  X(LinearSourceArgs, ref_source) X(double, inv_temp) X(uintptr_t, targets) X(uintptr_t, ones)                 \
  X(uintptr_t, tile) X(uintptr_t, ref_tile) X(uintptr_t, m) X(uintptr_t, s) X(uintptr_t, a) X(uintptr_t, mr)   \
  X(uintptr_t, sr) X(uintptr_t, tgt)
// grad_hidden [n, h] is overwritten; grad_weight [vocab, h] and grad_bias [vocab] (0 = not wanted) too.
#define RA3_FIELDS_VOCAB_SOFTMAX_LOOP_GRAD(X)                                                                  \
  X(int, mode) X(int, dtype) X(int64_t, n) X(int64_t, vocab) X(int64_t, chunk) X(LinearSourceArgs, source)     \
  X(LinearSourceArgs, ref_source) X(double, inv_temp) X(uintptr_t, targets) X(uintptr_t, m) X(uintptr_t, logs) \
  X(uintptr_t, q) X(uintptr_t, g) X(uintptr_t, ones) X(uintptr_t, tile) X(uintptr_t, ref_tile)                 \
  X(uintptr_t, tile16) X(int, bf16_terms) X(uintptr_t, grad_hidden) X(uintptr_t, grad_weight)                  \
  X(uintptr_t, grad_bias)
// Next-token cross-entropy's token loop (CUDA only): per chunk of `rows` tokens, the [rows, vocab] logits tile of
// the source, its online log-sum-exp into m, s, tgt (initialised by the caller) and logs = log s [n], and, while the
// tile is in memory, the gradient for the per-row upstream g [n] into grad_hidden [n, h] (overwritten), grad_weight
// [vocab, h] and grad_bias [vocab] (accumulated from zero here); a gradient pointer of 0 is not computed. `tile`
// holds rows * vocab compute-dtype elements, `tile16` bf16_terms * round_up(rows * vocab, 8) bfloat16 (bfloat16
// operands with gradients).
#define RA3_FIELDS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY(X)                                                         \
  X(int, dtype) X(int64_t, n) X(int64_t, vocab) X(int64_t, rows) X(LinearSourceArgs, source) X(double, inv_temp) \
  X(uintptr_t, targets) X(uintptr_t, g) X(uintptr_t, ones) X(uintptr_t, tile) X(uintptr_t, tile16)            \
  X(int, bf16_terms) X(uintptr_t, m) X(uintptr_t, s) X(uintptr_t, tgt) X(uintptr_t, logs)                      \
  X(uintptr_t, grad_hidden) X(uintptr_t, grad_weight) X(uintptr_t, grad_bias)

// Every argument struct as X(Struct, FIELDS); the kernels' entry points take `const Struct&` (CUDA ones plus a
// final `stream`). The kernel's name is the struct's without "Args", in snake case (SegmentSumFwdArgs:
// segment_sum_fwd); LinearSourceArgs is a field of the loop structs, not a kernel.
#define RA3_ARGS_STRUCTS(X)                                                                                    \
  X(LinearSourceArgs, RA3_FIELDS_LINEAR_SOURCE)                                                                \
  X(VocabSoftmaxFwdArgs, RA3_FIELDS_VOCAB_SOFTMAX_FWD)                                                         \
  X(VocabSoftmaxGradArgs, RA3_FIELDS_VOCAB_SOFTMAX_GRAD)                                                       \
  X(SegmentSumFwdArgs, RA3_FIELDS_SEGMENT_SUM_FWD)                                                             \
  X(SegmentSumBwdArgs, RA3_FIELDS_SEGMENT_SUM_BWD)                                                             \
  X(KlEstimatorFwdArgs, RA3_FIELDS_KL_ESTIMATOR_FWD)                                                           \
  X(KlEstimatorBwdArgs, RA3_FIELDS_KL_ESTIMATOR_BWD)                                                           \
  X(GroupAdvFwdArgs, RA3_FIELDS_GROUP_ADV_FWD)                                                                 \
  X(GroupAdvBwdArgs, RA3_FIELDS_GROUP_ADV_BWD)                                                                 \
  X(PolicyLossFwdArgs, RA3_FIELDS_POLICY_LOSS_FWD)                                                             \
  X(VocabSoftmaxLoopFwdArgs, RA3_FIELDS_VOCAB_SOFTMAX_LOOP_FWD)                                                \
  X(VocabSoftmaxLoopGradArgs, RA3_FIELDS_VOCAB_SOFTMAX_LOOP_GRAD)                                              \
  X(VocabSoftmaxLoopCrossEntropyArgs, RA3_FIELDS_VOCAB_SOFTMAX_LOOP_CROSS_ENTROPY)

#define RA3_ARGS_FIELD(type, name) type name{};
#define RA3_ARGS_DEFINE(Struct, FIELDS) \
  struct Struct {                       \
    FIELDS(RA3_ARGS_FIELD)              \
  };
RA3_ARGS_STRUCTS(RA3_ARGS_DEFINE)
#undef RA3_ARGS_DEFINE
#undef RA3_ARGS_FIELD

namespace cpu {
void vocab_softmax_fwd(const VocabSoftmaxFwdArgs& a);
void vocab_softmax_grad(const VocabSoftmaxGradArgs& a);
void segment_sum_fwd(const SegmentSumFwdArgs& a);
void segment_sum_bwd(const SegmentSumBwdArgs& a);
void kl_estimator_fwd(const KlEstimatorFwdArgs& a);
void kl_estimator_bwd(const KlEstimatorBwdArgs& a);
void group_adv_fwd(const GroupAdvFwdArgs& a);
void group_adv_bwd(const GroupAdvBwdArgs& a);
void policy_loss_fwd(const PolicyLossFwdArgs& a);
}  // namespace cpu

#ifdef RA3_WITH_CUDA
namespace cuda {
void vocab_softmax_fwd(const VocabSoftmaxFwdArgs& a, uintptr_t stream);
void vocab_softmax_grad(const VocabSoftmaxGradArgs& a, uintptr_t stream);
void segment_sum_fwd(const SegmentSumFwdArgs& a, uintptr_t stream);
void segment_sum_bwd(const SegmentSumBwdArgs& a, uintptr_t stream);
void kl_estimator_fwd(const KlEstimatorFwdArgs& a, uintptr_t stream);
void kl_estimator_bwd(const KlEstimatorBwdArgs& a, uintptr_t stream);
void group_adv_fwd(const GroupAdvFwdArgs& a, uintptr_t stream);
void group_adv_bwd(const GroupAdvBwdArgs& a, uintptr_t stream);
void policy_loss_fwd(const PolicyLossFwdArgs& a, uintptr_t stream);
void vocab_softmax_loop_fwd(const VocabSoftmaxLoopFwdArgs& a, uintptr_t stream);
void vocab_softmax_loop_grad(const VocabSoftmaxLoopGradArgs& a, uintptr_t stream);
// The same loop on host buffers with the CPU tile kernels: for tests only, with a cuBLAS stand-in that takes host
// pointers (RA3_CUBLAS_LIBRARY); a real cuBLAS would fault on them.
void host_vocab_softmax_loop_fwd(const VocabSoftmaxLoopFwdArgs& a);
void host_vocab_softmax_loop_grad(const VocabSoftmaxLoopGradArgs& a);
void vocab_softmax_loop_cross_entropy(const VocabSoftmaxLoopCrossEntropyArgs& a, uintptr_t stream);
void host_vocab_softmax_loop_cross_entropy(const VocabSoftmaxLoopCrossEntropyArgs& a);
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
