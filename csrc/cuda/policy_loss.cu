// CUDA twin of csrc/cpu/policy_loss.cpp in three launches on `stream`:
//   1. one block per row: (with sequence ratios, first the row's weighted mean log-ratio) per-token loss and
//      unscaled gradient, block sums of the row's partials into scratch;
//   2. one block: totals over rows, the loss and the statistics, and each row's aggregation weight;
//   3. one block per row: scales the row's gradient by its weight.
// Every sum is a fixed-shape tree, so the result is reproducible run to run.
#include <cfloat>

#include "../ra3_native.h"
#include "../token_math.h"
#include "cuda_utils.cuh"

namespace ra3::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kReduceThreads = 1024;
enum RowSum { kMask, kLoss, kClipped, kKl, kRatio, kNumRowSums };

template <typename T>
__device__ __forceinline__ T tiny();
template <>
__device__ __forceinline__ float tiny<float>() {
  return FLT_MIN;
}
template <>
__device__ __forceinline__ double tiny<double>() {
  return DBL_MIN;
}

// GSPO's sequence ratio of row b: exp of the mask-weighted mean of lp - old over its tokens (1 without any); every
// thread of the block gets it.
template <typename T>
__device__ T sequence_ratio(int64_t b, int64_t T_, const T* __restrict__ lp, const T* __restrict__ old,
                            const T* __restrict__ mask) {
  T acc[2] = {};  // weight, weighted log-ratio
  for (int64_t t = threadIdx.x; t < T_; t += blockDim.x) {
    const int64_t i = b * T_ + t;
    const T w = mask[i];
    if (w == T(0)) continue;
    acc[0] += w;
    acc[1] += w * (lp[i] - old[i]);
  }
  block_sum(acc);
  return acc[0] != T(0) ? exp_t(acc[1] / acc[0]) : T(1);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(int64_t T_, const T* __restrict__ lp, const T* __restrict__ old, const T* __restrict__ adv,
                bool adv_per_token, const T* __restrict__ mask, const T* __restrict__ ref, T kl_coef, int estimator,
                T clip_low, T clip_high, bool seq_level, bool cispo, T* __restrict__ grad, T* __restrict__ rows) {
  const int64_t b = blockIdx.x;
  const bool use_kl = ref != nullptr && kl_coef != T(0);
  const T seq_ratio = seq_level ? sequence_ratio<T>(b, T_, lp, old, mask) : T(1);
  T acc[kNumRowSums] = {};
  for (int64_t t = threadIdx.x; t < T_; t += blockDim.x) {
    const int64_t i = b * T_ + t;
    const T w = mask[i];
    if (w == T(0)) {
      grad[i] = T(0);
      continue;
    }
    const T ratio = seq_level ? seq_ratio : exp_t(lp[i] - old[i]);
    const PpoToken<T> tok = ppo_token<T>(lp[i], ratio, adv_per_token ? adv[i] : adv[b], cispo, use_kl,
                                         use_kl ? ref[i] : T(0), kl_coef, estimator, clip_low, clip_high);
    acc[kMask] += w;
    acc[kLoss] += w * tok.loss;
    acc[kClipped] += tok.clipped ? w : T(0);
    acc[kKl] += w * tok.kl;
    acc[kRatio] += w * tok.ratio;
    grad[i] = w * tok.dloss;
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNumRowSums; ++k) rows[b * kNumRowSums + k] = acc[k];
  }
}

// Single block. Leaves each row's aggregation weight in rows[b * kNumRowSums + kClipped] for scale_kernel.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    totals_kernel(int64_t B, int aggregation, T agg_norm, T* rows, T* __restrict__ loss_out, T* __restrict__ stats) {
  T tot[4] = {};
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const T* row = rows + b * kNumRowSums;
    tot[0] += row[kMask];
    tot[1] += row[kClipped];
    tot[2] += row[kKl];
    tot[3] += row[kRatio];
  }
  block_sum(tot);
  const T total = tot[0];
  const bool any = total > T(0);
  T loss[1] = {T(0)};
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    T* row = rows + b * kNumRowSums;
    T scale;
    if (aggregation == kTokenMean) {
      scale = any ? T(1) / total : T(0);
    } else if (aggregation == kSeqMeanTokenSum) {
      scale = T(1) / T(B);
    } else if (aggregation == kTokenSumNorm) {
      scale = agg_norm > T(0) ? T(1) / agg_norm : T(0);
    } else {
      const T ms = row[kMask];
      scale = T(1) / (T(B) * (ms > tiny<T>() ? ms : tiny<T>()));
    }
    loss[0] += scale * row[kLoss];
    row[kClipped] = scale;  // the same thread read this row's totals above: no race
  }
  block_sum(loss);
  if (threadIdx.x == 0) {
    loss_out[0] = loss[0];
    stats[0] = any ? tot[1] / total : T(0);
    stats[1] = any ? tot[2] / total : T(0);
    stats[2] = any ? tot[3] / total : T(0);
    stats[3] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) scale_kernel(int64_t T_, const T* __restrict__ rows, T* grad) {
  const int64_t b = blockIdx.x;
  const T scale = rows[b * kNumRowSums + kClipped];
  for (int64_t t = threadIdx.x; t < T_; t += blockDim.x) grad[b * T_ + t] *= scale;
}

}  // namespace

void policy_loss_fwd(const PolicyLossFwdArgs& a, uintptr_t stream) {
  check_estimator(a.kl_estimator);
  check_ratio_level(a.ratio_level);
  check_surrogate(a.surrogate);
  check_aggregation(a.aggregation);
  check_dtype(a.dtype);
  if (a.B > int64_t(0x7fffffff)) throw std::invalid_argument("B must be < 2^31, got " + std::to_string(a.B));
  DeviceGuard guard(a.loss_out);
  const cudaStream_t st = as_stream(stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using Tp = decltype(tag);
    const int64_t rows_n = a.B > 0 ? a.B : 0;
    Scratch scratch(rows_n * kNumRowSums * sizeof(Tp), st);
    Tp* rows = scratch.as<Tp>();
    if (rows_n > 0)
      rows_kernel<Tp><<<static_cast<unsigned>(rows_n), kRowThreads, 0, st>>>(
          a.T, cptr<Tp>(a.lp), cptr<Tp>(a.old), cptr<Tp>(a.adv), a.adv_per_token != 0, cptr<Tp>(a.mask),
          cptr<Tp>(a.ref), Tp(a.kl_coef), a.kl_estimator, Tp(a.clip_low), Tp(a.clip_high),
          a.ratio_level == kRatioSequence, a.surrogate == kSurrogateCispo, mptr<Tp>(a.grad_lp), rows);
    totals_kernel<Tp><<<1, kReduceThreads, 0, st>>>(rows_n, a.aggregation, Tp(a.agg_norm), rows,
                                                    mptr<Tp>(a.loss_out), mptr<Tp>(a.stats_out));
    if (rows_n > 0 && a.T > 0)
      scale_kernel<Tp><<<static_cast<unsigned>(rows_n), kRowThreads, 0, st>>>(a.T, rows, mptr<Tp>(a.grad_lp));
    check_launch("policy_loss_fwd");
  });
}

}  // namespace ra3::cuda
