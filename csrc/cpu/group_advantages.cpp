// Group-relative advantages (GRPO family): each reward against its group's mean, scaled by the group's unbiased
// std (normalize 2) or by the whole batch's (4, TRL's scale_rewards="batch"), or the leave-one-out baseline (rloo,
// normalize 3), and the exact gradient w.r.t. the rewards.
//
// Rewards are few (one per sampled completion), so both passes are serial and in index order: reproducible.
// Group ids outside [0, num_groups) (the Python side rejects them) are read as "no group": out and grad get 0, and
// they count in no moment, the batch's included.
#include <cmath>
#include <vector>

#include "../ra3_native.h"

namespace ra3::cpu {
namespace {

inline bool in_range(int64_t k, int64_t num_groups) { return k >= 0 && k < num_groups; }

// Per-key count, mean and unbiased std (0 for keys of one member; 0 and 0 for empty ones) over the rewards whose
// key(i) is in [0, num_keys): the groups (key = the group id) or the whole batch (key 0 for every reward in a group).
template <typename T, typename Key>
std::vector<int64_t> moments(const T* r, int64_t n, int64_t num_keys, Key key, T* mean, T* sd) {
  std::vector<int64_t> count(num_keys, 0);
  std::vector<T> ss(num_keys, T(0));
  for (int64_t k = 0; k < num_keys; ++k) mean[k] = T(0);
  for (int64_t i = 0; i < n; ++i)
    if (in_range(key(i), num_keys)) {
      mean[key(i)] += r[i];
      ++count[key(i)];
    }
  for (int64_t k = 0; k < num_keys; ++k)
    if (count[k] > 0) mean[k] /= T(count[k]);
  // Two-pass variance: sum of squared deviations from the finished mean, no cancellation.
  for (int64_t i = 0; i < n; ++i)
    if (in_range(key(i), num_keys)) {
      T d = r[i] - mean[key(i)];
      ss[key(i)] += d * d;
    }
  for (int64_t k = 0; k < num_keys; ++k) sd[k] = count[k] > 1 ? std::sqrt(ss[k] / T(count[k] - 1)) : T(0);
  return count;
}

// The whole batch as one key: 0 for every reward in a group, -1 for the others.
inline auto batch_key(const int64_t* gid, int64_t num_groups) {
  return [=](int64_t i) -> int64_t { return in_range(gid[i], num_groups) ? 0 : -1; };
}

template <typename T>
void adv_fwd(const T* r, const int64_t* gid, int64_t n, int64_t num_groups, int normalize, T eps, T* out, T* mean,
             T* sd) {
  std::vector<int64_t> count = moments(r, n, num_groups, [=](int64_t i) { return gid[i]; }, mean, sd);
  if (normalize == kNormBatchStd) {
    // Every group is scaled by the batch's std: sd[k] holds it for the backward pass.
    T batch_mean, batch_sd;
    moments(r, n, 1, batch_key(gid, num_groups), &batch_mean, &batch_sd);
    for (int64_t k = 0; k < num_groups; ++k) sd[k] = batch_sd;
  }
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
      case kNormStd:
      case kNormBatchStd: out[i] = (r[i] - mean[k]) / (sd[k] + eps); break;
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
  // The std that scales reward i and what it depends on: its group's (mean, count, cov), or with the batch's std
  // the batch's mean and count and the cov summed over all groups.
  const bool batch = normalize == kNormBatchStd;
  T batch_mean = T(0), batch_cov = T(0);
  int64_t batch_count = 0;
  if (batch) {
    for (int64_t i = 0; i < n; ++i)
      if (in_range(gid[i], num_groups)) batch_mean += r[i], ++batch_count;
    if (batch_count > 0) batch_mean /= T(batch_count);
    for (int64_t k = 0; k < num_groups; ++k) batch_cov += cov[k];
  }
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
      const int64_t sc = batch ? batch_count : count[k];
      const T smean = batch ? batch_mean : mean[k], scov = batch ? batch_cov : cov[k];
      const T s = sd[k] + eps;
      T gr = centred / s;
      if (sc > 1 && sd[k] > T(0)) gr -= (r[i] - smean) * scov / (T(sc - 1) * sd[k] * s * s);
      grad_r[i] = gr;
    }
  }
}

}  // namespace

void group_adv_fwd(const GroupAdvFwdArgs& a) {
  check_normalize(a.normalize);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    adv_fwd<T>(cptr<T>(a.rewards), cptr<int64_t>(a.gids), a.n, a.num_groups, a.normalize, T(a.eps), mptr<T>(a.out),
               mptr<T>(a.mean), mptr<T>(a.std_dev));
  });
}

void group_adv_bwd(const GroupAdvBwdArgs& a) {
  check_normalize(a.normalize);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    adv_bwd<T>(cptr<T>(a.rewards), cptr<int64_t>(a.gids), a.n, a.num_groups, a.normalize, T(a.eps), cptr<T>(a.mean),
               cptr<T>(a.std_dev), cptr<T>(a.g), mptr<T>(a.grad_r));
  });
}

}  // namespace ra3::cpu
