// Per-token math shared by the CPU and CUDA kernels: the KL estimators (kl_estimator_*, policy_loss_fwd) and the
// PPO-clipped or CISPO surrogate of one token (policy_loss_fwd).
//
// d = logprob - ref_logprob; k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (computed as expm1(-d) + d, which keeps
// its precision for the small d that dominate RL training).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define RA3_HD __host__ __device__ __forceinline__
#else
#define RA3_HD inline
#endif

namespace ra3 {

RA3_HD float exp_t(float x) { return expf(x); }
RA3_HD double exp_t(double x) { return exp(x); }
RA3_HD float expm1_t(float x) { return expm1f(x); }
RA3_HD double expm1_t(double x) { return expm1(x); }

// The estimate for one token; estimator is 1, 2 or 3 (validated in Python).
template <typename T>
RA3_HD T kl_value(int estimator, T d) {
  if (estimator == 1) return d;
  if (estimator == 2) return T(0.5) * d * d;
  return expm1_t(-d) + d;
}

// d(estimate)/d(logprob); the gradient w.r.t. ref_logprob is its negative.
template <typename T>
RA3_HD T kl_dlogprob(int estimator, T d) {
  if (estimator == 1) return T(1);
  if (estimator == 2) return d;
  return -expm1_t(-d);
}

// One token of the clipped policy-gradient loss with a KL penalty, before aggregation weights.
template <typename T>
struct PpoToken {
  T loss;      // ppo: max(-ratio A, -clamp(ratio, 1 - clip_low, 1 + clip_high) A); cispo: -sg(clamp(ratio)) A lp;
               // plus kl_coef * kl
  T dloss;     // d loss / d logprob (d ratio / d logprob = ratio, for a sequence ratio too: GSPO-token)
  T kl;        // the KL estimate (0 without a reference or with kl_coef == 0)
  T ratio;     // the importance ratio given
  bool clipped;  // ppo: the clamped branch is strictly larger, so it is active and passes no gradient;
                 // cispo: the ratio lies outside [1 - clip_low, 1 + clip_high], so its weight was clipped
};

// `ratio` is exp(lp - old) (token level) or the token's sequence ratio (GSPO, ratio_level 1).
template <typename T>
RA3_HD PpoToken<T> ppo_token(T lp, T ratio, T adv, bool cispo, bool use_kl, T ref, T kl_coef, int estimator,
                             T clip_low, T clip_high) {
  PpoToken<T> t;
  t.ratio = ratio;
  const T lo = T(1) - clip_low, hi = T(1) + clip_high;
  const T clamped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  T pg, dpg;
  if (cispo) {
    t.clipped = ratio < lo || ratio > hi;
    pg = -clamped * adv * lp;
    dpg = -clamped * adv;
  } else {
    const T unclipped_term = -ratio * adv;
    const T clipped_term = -clamped * adv;
    t.clipped = clipped_term > unclipped_term;
    pg = t.clipped ? clipped_term : unclipped_term;
    dpg = t.clipped ? T(0) : unclipped_term;  // d(-ratio A)/d lp = -ratio A
  }
  t.kl = T(0);
  T dkl = T(0);
  if (use_kl) {
    const T d = lp - ref;
    t.kl = kl_value<T>(estimator, d);
    dkl = kl_dlogprob<T>(estimator, d);
  }
  t.loss = pg + kl_coef * t.kl;
  t.dloss = dpg + kl_coef * dkl;
  return t;
}

}  // namespace ra3
