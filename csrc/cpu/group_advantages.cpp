// Group-relative advantages (GRPO family): each reward against its group's mean, scaled by the group's unbiased
// std (normalize 2), or the leave-one-out baseline (rloo, normalize 3), and the exact gradient w.r.t. the rewards.
//
// Rewards are few (one per sampled completion), so both passes are serial and in index order: reproducible.
// Group ids outside [0, num_groups) (the Python side rejects them) are read as "no group": out and grad get 0.
#include <cmath>
#include <vector>

#include "../ra3_native.h"

namespace ra3::cpu {
namespace {

inline bool in_range(int64_t k, int64_t num_groups) { return k >= 0 && k < num_groups; }

// Per-group count, mean and unbiased std (0 for groups of one; 0 and 0 for empty groups).
template <typename T>
std::vector<int64_t> group_moments(const T* r, const int64_t* gid, int64_t n, int64_t num_groups, T* mean, T* sd) {
  std::vector<int64_t> count(num_groups, 0);
  std::vector<T> ss(num_groups, T(0));
  for (int64_t k = 0; k < num_groups; ++k) mean[k] = T(0);
  for (int64_t i = 0; i < n; ++i)
    if (in_range(gid[i], num_groups)) {
      mean[gid[i]] += r[i];
      ++count[gid[i]];
    }
  for (int64_t k = 0; k < num_groups; ++k)
    if (count[k] > 0) mean[k] /= T(count[k]);
  // Two-pass variance: sum of squared deviations from the finished mean, no cancellation.
  for (int64_t i = 0; i < n; ++i)
    if (in_range(gid[i], num_groups)) {
      T d = r[i] - mean[gid[i]];
      ss[gid[i]] += d * d;
    }
  for (int64_t k = 0; k < num_groups; ++k) sd[k] = count[k] > 1 ? std::sqrt(ss[k] / T(count[k] - 1)) : T(0);
  return count;
}

template <typename T>
void adv_fwd(const T* r, const int64_t* gid, int64_t n, int64_t num_groups, int normalize, T eps, T* out, T* mean,
             T* sd) {
  std::vector<int64_t> count = group_moments(r, gid, n, num_groups, mean, sd);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) {
      out[i] = T(0);
      continue;
    }
    const T c = T(count[k]);
    switch (normalize) {
      case kNormNone: out[i] = r[i]; break;
      case kNormMean: out[i] = r[i] - mean[k]; break;
      case kNormStd: out[i] = (r[i] - mean[k]) / (sd[k] + eps); break;
      default: out[i] = count[k] > 1 ? (r[i] - mean[k]) * c / (c - T(1)) : T(0); break;  // rloo
    }
  }
}

template <typename T>
void adv_bwd(const T* r, const int64_t* gid, int64_t n, int64_t num_groups, int normalize, T eps, const T* mean,
             const T* sd, const T* g, T* grad_r) {
  if (normalize == kNormNone) {
    for (int64_t i = 0; i < n; ++i) grad_r[i] = in_range(gid[i], num_groups) ? g[i] : T(0);
    return;
  }
  // Per group: count, mean of the upstream gradient (gbar) and cov = sum g_i (r_i - mu).
  std::vector<int64_t> count(num_groups, 0);
  std::vector<T> gbar(num_groups, T(0)), cov(num_groups, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) continue;
    ++count[k];
    gbar[k] += g[i];
    cov[k] += g[i] * (r[i] - mean[k]);
  }
  for (int64_t k = 0; k < num_groups; ++k)
    if (count[k] > 0) gbar[k] /= T(count[k]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) {
      grad_r[i] = T(0);
      continue;
    }
    const T c = T(count[k]);
    const T centred = g[i] - gbar[k];
    if (normalize == kNormMean) {
      grad_r[i] = centred;
    } else if (normalize == kNormRloo) {
      grad_r[i] = count[k] > 1 ? centred * c / (c - T(1)) : T(0);
    } else {
      // out_j = (r_j - mu) / (sd + eps): the centring term, plus the term through sd (absent when sd is constant 0).
      const T s = sd[k] + eps;
      T gr = centred / s;
      if (count[k] > 1 && sd[k] > T(0)) gr -= (r[i] - mean[k]) * cov[k] / ((c - T(1)) * sd[k] * s * s);
      grad_r[i] = gr;
    }
  }
}

}  // namespace

void group_adv_fwd(RA3_KERNEL_ARGS_GROUP_ADV_FWD) {
  check_normalize(normalize);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adv_fwd<T>(cptr<T>(rewards), cptr<int64_t>(gids), n, num_groups, normalize, T(eps), mptr<T>(out),
               mptr<T>(mean), mptr<T>(std_out));
  });
}

void group_adv_bwd(RA3_KERNEL_ARGS_GROUP_ADV_BWD) {
  check_normalize(normalize);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adv_bwd<T>(cptr<T>(rewards), cptr<int64_t>(gids), n, num_groups, normalize, T(eps), cptr<T>(mean),
               cptr<T>(std_in), cptr<T>(g), mptr<T>(grad_r));
  });
}

}  // namespace ra3::cpu
