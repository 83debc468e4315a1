// Clipped policy-gradient loss with an optional KL penalty, fused: loss, per-token gradient and statistics in one
// call. Variants: token or sequence (GSPO) importance ratios, the PPO-clipped or the CISPO surrogate, and the
// aggregations of ra3_native.h (see ra3/ops/policy_loss.py for their definitions and sources).
//
// Pass 1 (rows in parallel) evaluates every token of a row in one branch-free `omp simd` loop and keeps per-row
// partial sums (with sequence ratios, a first simd loop over the row forms its weighted mean log-ratio); the
// partials are reduced serially in row order (reproducible whatever the thread count); pass 2 scales each row's
// gradient by its aggregation weight. Tokens with mask 0 contribute exactly 0, even where their log-probs are inf
// or NaN padding: their inputs are replaced by 0 before any arithmetic and their terms are selected away, never
// multiplied by 0.
//
// The per-token math is token_math.h's ppo_token (which the CUDA kernel uses), written here so that it
// vectorises: vexp / vexpm1 instead of libm's scalar calls, the KL estimator, the advantage layout, the ratio
// level and the surrogate as template parameters. With the scalar version this kernel ran at ~12 ns a token on a
// 2-core EPYC.
#include <limits>
#include <vector>

#include "../ra3_native.h"
#include "vec_math.h"

namespace ra3::cpu {
namespace {

constexpr int64_t kParallelMin = int64_t(1) << 15;
enum RowSum { kMask, kLoss, kClipped, kKl, kRatio, kNumRowSums };

// One row's inputs and outputs: g[t] = mask * dloss (0 where masked), acc[kNumRowSums] += the row's sums.
template <typename T>
struct Row {
  int64_t T_;
  const T *lp, *old, *adv, *mask, *ref;
  T kl_coef, clip_low, clip_high;
  T* g;
  T* acc;
};

// The KL estimate and its derivative w.r.t. the log-prob for estimator E (0: no KL term).
template <int E, bool kFma, typename T>
RA3_INLINE void kl_terms(T d, T& kl, T& dkl) {
  if constexpr (E == 0) {
    kl = T(0), dkl = T(0);
  } else if constexpr (E == 1) {
    kl = d, dkl = T(1);
  } else if constexpr (E == 2) {
    kl = T(0.5) * d * d, dkl = d;
  } else {
    const T e = vexpm1<kFma>(-d);
    kl = e + d, dkl = -e;
  }
}

// GSPO's sequence ratio of a row: exp of the mask-weighted mean of lp - old over its tokens (1 without any).
template <bool kFma, typename T>
RA3_INLINE T sequence_ratio(const Row<T>& r) {
  T s_w = T(0), s_d = T(0);
#pragma omp simd reduction(+ : s_w, s_d)
  for (int64_t t = 0; t < r.T_; ++t) {
    const T w = r.mask[t], lp_t = r.lp[t], old_t = r.old[t];
    const bool live = w != T(0);
    s_w += live ? w : T(0);
    s_d += live ? w * (lp_t - old_t) : T(0);
  }
  return s_w != T(0) ? vexp<kFma>(s_d / s_w) : T(1);
}

// One row. SEQ: every token's ratio is the row's sequence ratio (GSPO-token: its value, with the gradient of
// exp(lp - sg(lp)), i.e. d ratio / d lp = ratio); CISPO: -sg(clip(ratio)) A lp instead of the PPO-clipped term.
template <int E, bool PER_TOKEN, bool SEQ, bool CISPO, bool kFma, typename T>
RA3_INLINE void row_impl(const Row<T>& r) {
  const int64_t T_ = r.T_;
  const T *lp = r.lp, *old = r.old, *adv = r.adv, *mask = r.mask, *ref = r.ref;
  const T kl_coef = r.kl_coef, lo = T(1) - r.clip_low, hi = T(1) + r.clip_high;
  T* g = r.g;
  // hoisted: a load that the stores to g might alias would keep the loop scalar
  const T adv_row = adv[0];
  const T seq_ratio = SEQ ? sequence_ratio<kFma>(r) : T(1);
  T s_mask = T(0), s_loss = T(0), s_clip = T(0), s_kl = T(0), s_ratio = T(0);
#pragma omp simd reduction(+ : s_mask, s_loss, s_clip, s_kl, s_ratio)
  for (int64_t t = 0; t < T_; ++t) {
    // Every load is unconditional and every select feeds a plain `+=`: GCC 12 leaves this loop scalar (7 ns a
    // token) when the reductions themselves are conditional.
    const T w = mask[t], lp_t = lp[t], old_t = old[t], adv_t = PER_TOKEN ? adv[t] : adv_row;
    const T ref_t = E != 0 ? ref[t] : T(0);
    const bool live = w != T(0);
    const T x = live ? lp_t : T(0);
    const T a = live ? adv_t : T(0);
    // (a select on live, as exp(0) = 1 for the token ratio: a loop-invariant ratio leaves GCC 12's loop scalar)
    const T ratio = SEQ ? (live ? seq_ratio : T(1)) : vexp<kFma>(x - (live ? old_t : T(0)));
    const T clamped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
    T pg, dpg;
    bool clipped;
    if constexpr (CISPO) {
      clipped = ratio < lo || ratio > hi;  // the weight was clipped
      pg = -clamped * a * x, dpg = -clamped * a;
    } else {
      const T unclipped = -ratio * a, clipped_term = -clamped * a;
      clipped = clipped_term > unclipped;  // the clamped branch is active and passes no gradient
      pg = clipped ? clipped_term : unclipped, dpg = clipped ? T(0) : unclipped;
    }
    T kl, dkl;
    kl_terms<E, kFma>(x - (live ? ref_t : T(0)), kl, dkl);
    const T loss = pg + kl_coef * kl;
    const T dloss = dpg + kl_coef * dkl;
    const T wl = live ? w : T(0);
    s_mask += w;
    s_loss += wl * (live ? loss : T(0));
    s_clip += clipped ? wl : T(0);
    s_kl += wl * (live ? kl : T(0));
    s_ratio += wl * (live ? ratio : T(0));
    g[t] = wl * (live ? dloss : T(0));
  }
  T* acc = r.acc;
  acc[kMask] += s_mask, acc[kLoss] += s_loss, acc[kClipped] += s_clip, acc[kKl] += s_kl, acc[kRatio] += s_ratio;
}

template <bool SEQ, bool CISPO, bool kFma, typename T>
RA3_INLINE void row_variant(int estimator, bool per_token, const Row<T>& r) {
#define RA3_PPO_ROW(E, P) row_impl<E, P, SEQ, CISPO, kFma>(r)
  switch (estimator * 2 + (per_token ? 1 : 0)) {
    case 0: RA3_PPO_ROW(0, false); break;
    case 1: RA3_PPO_ROW(0, true); break;
    case 2: RA3_PPO_ROW(1, false); break;
    case 3: RA3_PPO_ROW(1, true); break;
    case 4: RA3_PPO_ROW(2, false); break;
    case 5: RA3_PPO_ROW(2, true); break;
    case 6: RA3_PPO_ROW(3, false); break;
    default: RA3_PPO_ROW(3, true); break;
  }
#undef RA3_PPO_ROW
}

template <bool kFma, typename T>
RA3_INLINE void row_dispatch(int estimator, bool per_token, bool seq, bool cispo, const Row<T>& r) {
  switch ((seq ? 2 : 0) + (cispo ? 1 : 0)) {
    case 0: row_variant<false, false, kFma>(estimator, per_token, r); break;
    case 1: row_variant<false, true, kFma>(estimator, per_token, r); break;
    case 2: row_variant<true, false, kFma>(estimator, per_token, r); break;
    default: row_variant<true, true, kFma>(estimator, per_token, r); break;
  }
}

// The ISA-dispatched entry points (see RA3_ROW_KERNEL).
RA3_ROW_KERNEL(void ppo_row(int estimator, bool per_token, bool seq, bool cispo, const Row<float>& r),
               row_dispatch<kFma>(estimator, per_token, seq, cispo, r);)
RA3_ROW_KERNEL(void ppo_row(int estimator, bool per_token, bool seq, bool cispo, const Row<double>& r),
               row_dispatch<kFma>(estimator, per_token, seq, cispo, r);)

template <typename Tp>
void ppo(int64_t B, int64_t T, const Tp* lp, const Tp* old, const Tp* adv, bool adv_per_token, const Tp* mask,
         const Tp* ref, Tp kl_coef, int estimator, Tp clip_low, Tp clip_high, bool seq, bool cispo, int aggregation,
         Tp agg_norm, Tp* loss_out, Tp* grad, Tp* stats) {
  const bool use_kl = ref != nullptr && kl_coef != Tp(0);
  std::vector<Tp> rows(static_cast<size_t>(B) * kNumRowSums, Tp(0));
#pragma omp parallel for schedule(static) if (B * T >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    // grad holds mask * dloss here; pass 2 multiplies in the row's aggregation weight
    const Row<Tp> row{T, lp + b * T, old + b * T, adv + (adv_per_token ? b * T : b), mask + b * T,
                      use_kl ? ref + b * T : nullptr, kl_coef, clip_low, clip_high, grad + b * T,
                      rows.data() + b * kNumRowSums};
    ppo_row(use_kl ? estimator : 0, adv_per_token, seq, cispo, row);
  }
  Tp total[kNumRowSums] = {};
  for (int64_t b = 0; b < B; ++b)
    for (int k = 0; k < kNumRowSums; ++k) total[k] += rows[b * kNumRowSums + k];
  const Tp tiny = std::numeric_limits<Tp>::min();
  const bool any = total[kMask] > Tp(0);
  // Aggregation weight per row: loss = sum_b scale_b * sum_t mask * l.
  auto row_scale = [&](int64_t b) -> Tp {
    if (aggregation == kTokenMean) return any ? Tp(1) / total[kMask] : Tp(0);
    if (aggregation == kSeqMeanTokenSum) return Tp(1) / Tp(B);
    if (aggregation == kTokenSumNorm) return agg_norm > Tp(0) ? Tp(1) / agg_norm : Tp(0);
    const Tp ms = rows[b * kNumRowSums + kMask];
    return Tp(1) / (Tp(B) * (ms > tiny ? ms : tiny));
  };
  Tp loss = Tp(0);
  for (int64_t b = 0; b < B; ++b) loss += row_scale(b) * rows[b * kNumRowSums + kLoss];
#pragma omp parallel for schedule(static) if (B * T >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    const Tp sc = row_scale(b);
    Tp* g = grad + b * T;
    for (int64_t t = 0; t < T; ++t) g[t] *= sc;
  }
  loss_out[0] = loss;
  stats[0] = any ? total[kClipped] / total[kMask] : Tp(0);
  stats[1] = any ? total[kKl] / total[kMask] : Tp(0);
  stats[2] = any ? total[kRatio] / total[kMask] : Tp(0);
  stats[3] = total[kMask];
}

}  // namespace

void policy_loss_fwd(const PolicyLossFwdArgs& a) {
  check_estimator(a.kl_estimator);
  check_ratio_level(a.ratio_level);
  check_surrogate(a.surrogate);
  check_aggregation(a.aggregation);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using Tp = decltype(tag);
    ppo<Tp>(a.B, a.T, cptr<Tp>(a.lp), cptr<Tp>(a.old), cptr<Tp>(a.adv), a.adv_per_token != 0, cptr<Tp>(a.mask),
            cptr<Tp>(a.ref), Tp(a.kl_coef), a.kl_estimator, Tp(a.clip_low), Tp(a.clip_high),
            a.ratio_level == kRatioSequence, a.surrogate == kSurrogateCispo, a.aggregation, Tp(a.agg_norm),
            mptr<Tp>(a.loss_out), mptr<Tp>(a.grad_lp), mptr<Tp>(a.stats_out));
  });
}

}  // namespace ra3::cpu
