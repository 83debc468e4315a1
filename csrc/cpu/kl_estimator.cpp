// Per-token KL estimators k1/k2/k3 between policy and reference log-probs, and their gradient w.r.t. the policy.
#include "../token_math.h"
#include "../ra3_native.h"

namespace ra3::cpu {

namespace {
constexpr int64_t kParallelMin = int64_t(1) << 16;
}  // namespace

void kl_estimator_fwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_FWD) {
  check_estimator(estimator);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* p = cptr<T>(lp);
    const T* q = cptr<T>(ref);
    T* o = mptr<T>(out);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = kl_value<T>(estimator, p[i] - q[i]);
  });
}

void kl_estimator_bwd(RA3_KERNEL_ARGS_KL_ESTIMATOR_BWD) {
  check_estimator(estimator);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* p = cptr<T>(lp);
    const T* q = cptr<T>(ref);
    const T* go = cptr<T>(g);
    T* o = mptr<T>(grad_lp);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = go[i] * kl_dlogprob<T>(estimator, p[i] - q[i]);
  });
}

}  // namespace ra3::cpu
