// PPO-clipped policy loss with an optional KL penalty, fused: loss, per-token gradient and statistics in one call.
//
// Pass 1 (rows in parallel) evaluates every masked token once and keeps per-row partial sums; the partials are
// reduced serially in row order (reproducible whatever the thread count); pass 2 scales each row's gradient by its
// aggregation weight. Tokens with mask 0 contribute exactly 0 (even where their log-probs are inf or NaN padding).
#include <limits>
#include <vector>

#include "../ra3_native.h"
#include "../token_math.h"

namespace ra3::cpu {
namespace {

constexpr int64_t kParallelMin = int64_t(1) << 15;
enum RowSum { kMask, kLoss, kClipped, kKl, kRatio, kNumRowSums };

template <typename Tp>
void ppo(int64_t B, int64_t T, const Tp* lp, const Tp* old, const Tp* adv, bool adv_per_token, const Tp* mask,
         const Tp* ref, Tp kl_coef, int estimator, Tp clip_low, Tp clip_high, int aggregation, Tp* loss_out,
         Tp* grad, Tp* stats) {
  const bool use_kl = ref != nullptr && kl_coef != Tp(0);
  std::vector<Tp> rows(static_cast<size_t>(B) * kNumRowSums, Tp(0));
#pragma omp parallel for schedule(static) if (B * T >= kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    Tp* acc = rows.data() + b * kNumRowSums;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const Tp w = mask[i];
      if (w == Tp(0)) {
        grad[i] = Tp(0);
        continue;
      }
      const PpoToken<Tp> tok = ppo_token<Tp>(lp[i], old[i], adv_per_token ? adv[i] : adv[b], use_kl,
                                              use_kl ? ref[i] : Tp(0), kl_coef, estimator, clip_low, clip_high);
      acc[kMask] += w;
      acc[kLoss] += w * tok.loss;
      acc[kClipped] += tok.clipped ? w : Tp(0);
      acc[kKl] += w * tok.kl;
      acc[kRatio] += w * tok.ratio;
      grad[i] = w * tok.dloss;  // times the row's aggregation weight, in pass 2
    }
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

void policy_loss_fwd(RA3_KERNEL_ARGS_POLICY_LOSS_FWD) {
  check_estimator(kl_estimator);
  check_aggregation(aggregation);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    ppo<Tp>(B, T, cptr<Tp>(lp), cptr<Tp>(old), cptr<Tp>(adv), adv_per_token != 0, cptr<Tp>(mask), cptr<Tp>(ref),
            Tp(kl_coef), kl_estimator, Tp(clip_low), Tp(clip_high), aggregation, mptr<Tp>(loss_out),
            mptr<Tp>(grad_lp), mptr<Tp>(stats_out));
  });
}

}  // namespace ra3::cpu
