// CUDA twins of csrc/cpu/group_advantages.cpp. Per-group moments come from atomicAdd scatters into stream-ordered
// scratch (counts as exact integers), then elementwise kernels; each step is one small launch on `stream`. With the
// batch's std (normalize 4) the same scatters run once more with every reward under one key (`whole`).
#include <cmath>

#include "../ra3_native.h"
#include "cuda_utils.cuh"

namespace ra3::cuda {
namespace {

constexpr int kThreads = 256;
using Count = unsigned long long;

#define RA3_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ bool in_range(int64_t k, int64_t num_groups) { return k >= 0 && k < num_groups; }

// Pass 1: count[k] and the reward sum (into mean[k]); k is the group, or 0 for every grouped reward when `whole`.
template <typename T>
__global__ void count_sum_kernel(const T* __restrict__ r, const int64_t* __restrict__ gid, int64_t n,
                                 int64_t num_groups, bool whole, Count* count, T* sum) {
  RA3_GRID_STRIDE(i, n) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) continue;
    const int64_t key = whole ? 0 : k;
    atomicAdd(count + key, Count(1));
    atomicAdd(sum + key, r[i]);
  }
}

// Pass 2: squared deviations from the key's mean (sum / count, computed on the fly) into ss[key].
template <typename T>
__global__ void sq_dev_kernel(const T* __restrict__ r, const int64_t* __restrict__ gid, int64_t n,
                              int64_t num_groups, bool whole, const Count* __restrict__ count,
                              const T* __restrict__ sum, T* ss) {
  RA3_GRID_STRIDE(i, n) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) continue;
    const int64_t key = whole ? 0 : k;
    const T d = r[i] - sum[key] / T(count[key]);
    atomicAdd(ss + key, d * d);
  }
}

// Pass 3, per group: mean = sum / count (in place) and the unbiased std (0 for fewer than two members).
template <typename T>
__global__ void finish_moments_kernel(int64_t num_groups, const Count* __restrict__ count, T* mean,
                                      const T* __restrict__ ss, T* sd) {
  RA3_GRID_STRIDE(k, num_groups) {
    const Count c = count[k];
    mean[k] = c > 0 ? mean[k] / T(c) : T(0);
    sd[k] = c > 1 ? sqrt(ss[k] / T(c - 1)) : T(0);
  }
}

// Batch std (normalize 4): every group's sd[k] becomes the unbiased std of all grouped rewards (from the `whole`
// count and squared deviations), which scales them and which the backward pass reads.
template <typename T>
__global__ void batch_std_kernel(int64_t num_groups, const Count* __restrict__ count, const T* __restrict__ ss,
                                 T* sd) {
  const Count c = count[0];
  const T s = c > 1 ? sqrt(ss[0] / T(c - 1)) : T(0);
  RA3_GRID_STRIDE(k, num_groups) sd[k] = s;
}

template <typename T>
__global__ void adv_out_kernel(const T* __restrict__ r, const int64_t* __restrict__ gid, int64_t n,
                               int64_t num_groups, int normalize, T eps, const Count* __restrict__ count,
                               const T* __restrict__ mean, const T* __restrict__ sd, T* __restrict__ out) {
  RA3_GRID_STRIDE(i, n) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) {
      out[i] = T(0);
      continue;
    }
    const Count c = count[k];
    T v;
    if (normalize == kNormNone) v = r[i];
    else if (normalize == kNormMean) v = r[i] - mean[k];
    else if (normalize == kNormStd || normalize == kNormBatchStd) v = (r[i] - mean[k]) / (sd[k] + eps);
    else v = c > 1 ? (r[i] - mean[k]) * T(c) / T(c - 1) : T(0);
    out[i] = v;
  }
}

// The moments the scaling std depends on, in slot [G] of count, gsum (there the reward sum) and cov: the batch's
// (normalize 4), next to the per-group slots [0, G).
struct BatchSlot {
  bool on;
  int64_t slot;
};

// Backward pass 1: count, sum of g (gbar * count) and cov = sum g (r - mu) per group; with the batch's std also
// the batch's count, reward sum and cov (summed over groups) in slot `batch.slot`.
template <typename T>
__global__ void grad_moments_kernel(const T* __restrict__ r, const int64_t* __restrict__ gid, int64_t n,
                                    int64_t num_groups, const T* __restrict__ mean, const T* __restrict__ g,
                                    BatchSlot batch, Count* count, T* gsum, T* cov) {
  RA3_GRID_STRIDE(i, n) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) continue;
    const T c = g[i] * (r[i] - mean[k]);
    atomicAdd(count + k, Count(1));
    atomicAdd(gsum + k, g[i]);
    atomicAdd(cov + k, c);
    if (batch.on) {
      atomicAdd(count + batch.slot, Count(1));
      atomicAdd(gsum + batch.slot, r[i]);
      atomicAdd(cov + batch.slot, c);
    }
  }
}

template <typename T>
__global__ void adv_grad_kernel(const T* __restrict__ r, const int64_t* __restrict__ gid, int64_t n,
                                int64_t num_groups, int normalize, T eps, const T* __restrict__ mean,
                                const T* __restrict__ sd, const T* __restrict__ g, BatchSlot batch,
                                const Count* __restrict__ count, const T* __restrict__ gsum,
                                const T* __restrict__ cov, T* __restrict__ grad_r) {
  RA3_GRID_STRIDE(i, n) {
    const int64_t k = gid[i];
    if (!in_range(k, num_groups)) {
      grad_r[i] = T(0);
      continue;
    }
    if (normalize == kNormNone) {
      grad_r[i] = g[i];
      continue;
    }
    const Count c = count[k];
    const T centred = g[i] - gsum[k] / T(c);
    T v;
    if (normalize == kNormMean) {
      v = centred;
    } else if (normalize == kNormRloo) {
      v = c > 1 ? centred * T(c) / T(c - 1) : T(0);
    } else {
      // The std's own moments: the group's, or the batch's (slot batch.slot, its gsum holding the reward sum).
      const Count sc = batch.on ? count[batch.slot] : c;
      const T smean = batch.on ? gsum[batch.slot] / T(sc) : mean[k], scov = batch.on ? cov[batch.slot] : cov[k];
      const T s = sd[k] + eps;
      v = centred / s;
      if (sc > 1 && sd[k] > T(0)) v -= (r[i] - smean) * scov / (T(sc - 1) * sd[k] * s * s);
    }
    grad_r[i] = v;
  }
}

}  // namespace

void group_adv_fwd(const GroupAdvFwdArgs& a, uintptr_t stream) {
  check_normalize(a.normalize);
  check_dtype(a.dtype);
  if (a.num_groups <= 0 && a.n <= 0) return;
  DeviceGuard guard(a.out != 0 ? a.out : a.mean);
  const cudaStream_t st = as_stream(stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t G = a.num_groups > 0 ? a.num_groups : 0;
    // Per-group count and squared deviations, then the batch's count, reward sum and squared deviations.
    const size_t slots = size_t(G) + 1;
    Scratch scratch(slots * sizeof(Count) + (slots + 1) * sizeof(T), st);
    Count* count = scratch.as<Count>();
    T* ss = reinterpret_cast<T*>(count + slots);
    Count* batch_count = count + G;
    T *batch_ss = ss + G, *batch_sum = ss + G + 1;
    check(cudaMemsetAsync(count, 0, slots * sizeof(Count) + (slots + 1) * sizeof(T), st), "cudaMemsetAsync");
    if (G > 0) check(cudaMemsetAsync(reinterpret_cast<void*>(a.mean), 0, G * sizeof(T), st), "cudaMemsetAsync");
    const unsigned gn = grid_for(a.n, kThreads), gg = grid_for(G, kThreads);
    const T* r = cptr<T>(a.rewards);
    const int64_t* gid = cptr<int64_t>(a.gids);
    if (a.n > 0 && G > 0) {
      count_sum_kernel<T><<<gn, kThreads, 0, st>>>(r, gid, a.n, G, false, count, mptr<T>(a.mean));
      sq_dev_kernel<T><<<gn, kThreads, 0, st>>>(r, gid, a.n, G, false, count, mptr<T>(a.mean), ss);
    }
    if (G > 0) finish_moments_kernel<T><<<gg, kThreads, 0, st>>>(G, count, mptr<T>(a.mean), ss, mptr<T>(a.std_dev));
    if (a.normalize == kNormBatchStd && G > 0) {
      if (a.n > 0) {
        count_sum_kernel<T><<<gn, kThreads, 0, st>>>(r, gid, a.n, G, true, batch_count, batch_sum);
        sq_dev_kernel<T><<<gn, kThreads, 0, st>>>(r, gid, a.n, G, true, batch_count, batch_sum, batch_ss);
      }
      batch_std_kernel<T><<<gg, kThreads, 0, st>>>(G, batch_count, batch_ss, mptr<T>(a.std_dev));
    }
    if (a.n > 0)
      adv_out_kernel<T><<<gn, kThreads, 0, st>>>(r, gid, a.n, G, a.normalize, T(a.eps), count, cptr<T>(a.mean),
                                                 cptr<T>(a.std_dev), mptr<T>(a.out));
    check_launch("group_adv_fwd");
  });
}

void group_adv_bwd(const GroupAdvBwdArgs& a, uintptr_t stream) {
  check_normalize(a.normalize);
  check_dtype(a.dtype);
  if (a.n <= 0) return;
  DeviceGuard guard(a.grad_r);
  const cudaStream_t st = as_stream(stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t G = a.num_groups > 0 ? a.num_groups : 0;
    const int64_t slots = G + 1;  // the groups, then the batch (BatchSlot)
    const BatchSlot batch{a.normalize == kNormBatchStd, G};
    Scratch scratch(slots * (sizeof(Count) + 2 * sizeof(T)), st);
    Count* count = scratch.as<Count>();
    T* gsum = reinterpret_cast<T*>(count + slots);
    T* cov = gsum + slots;
    const unsigned gn = grid_for(a.n, kThreads);
    if (G > 0) {
      check(cudaMemsetAsync(count, 0, slots * (sizeof(Count) + 2 * sizeof(T)), st), "cudaMemsetAsync");
      grad_moments_kernel<T><<<gn, kThreads, 0, st>>>(cptr<T>(a.rewards), cptr<int64_t>(a.gids), a.n, G,
                                                      cptr<T>(a.mean), cptr<T>(a.g), batch, count, gsum, cov);
    }
    adv_grad_kernel<T><<<gn, kThreads, 0, st>>>(cptr<T>(a.rewards), cptr<int64_t>(a.gids), a.n, G, a.normalize,
                                                T(a.eps), cptr<T>(a.mean), cptr<T>(a.std_dev), cptr<T>(a.g), batch,
                                                count, gsum, cov, mptr<T>(a.grad_r));
    check_launch("group_adv_bwd");
  });
}

}  // namespace ra3::cuda
