// CUDA twins of csrc/cpu/vocab_softmax.cpp: online log-sum-exp over one vocabulary chunk, and the gradient w.r.t.
// the logits chunk. One block per row; the threads stride over the chunk (coalesced), so each logit is read once.
#include "../ra3_native.h"
#include "../token_math.h"
#include "cuda_utils.cuh"

namespace ra3::cuda {
namespace {

constexpr int kThreads = 256;

// x = z * inv_temp, rounded before anything is subtracted from it. nvcc contracts a product and a following add
// into one fma by default (--fmad=true); then `z * inv_temp - m` is the exact product minus m, whose rounding error
// does not cancel at the row max (the CPU kernels' -ffp-contract=off case: a log-prob of inf at z / T ~ 1e36, a
// V = 1 gradient of -0.1 at T = 1e-3). __fmul_rn / __dmul_rn are never merged into an fma.
__device__ __forceinline__ float scaled(float z, float inv_temp) { return __fmul_rn(z, inv_temp); }
__device__ __forceinline__ double scaled(double z, double inv_temp) { return __dmul_rn(z, inv_temp); }

// Online softmax state: max m, sum s of exp(x - m), accumulator a of exp(x - m) * f. With REL (entropy) the
// payload is f = x - m itself, relative to the current max, so moving the max from m to mn first adds s * (m - mn)
// to a (ra3_native.h: a stays small where the logits are large).
template <typename T>
struct Lse {
  T m, s, a;
};

template <typename T>
__device__ __forceinline__ Lse<T> lse_empty() {
  return {-INFINITY, T(0), T(0)};
}

// a of a state whose max moves from m to mn (>= m), before the rescale by exp(m - mn).
template <bool REL, typename T>
__device__ __forceinline__ T shifted(T a, T s, T m, T mn) {
  return REL && s > T(0) ? a + s * (m - mn) : a;
}

// Adds one element x with payload f (ignored with REL: x - m). -inf elements contribute nothing (and would make
// exp(-inf - -inf) NaN).
template <bool REL, typename T>
__device__ __forceinline__ void lse_push(Lse<T>& st, T x, T f) {
  if (x == -INFINITY) return;
  if (x > st.m) {
    const T scale = exp_t(st.m - x);  // 0 while the state is still empty
    st.a = shifted<REL>(st.a, st.s, st.m, x) * scale + (REL ? T(0) : f);
    st.s = st.s * scale + T(1);
    st.m = x;
  } else {
    const T e = exp_t(x - st.m);  // NaN x lands here and poisons s, as it should
    st.s += e;
    st.a += e > T(0) ? e * (REL ? x - st.m : f) : T(0);
  }
}

template <bool REL, typename T>
__device__ __forceinline__ Lse<T> lse_merge(const Lse<T>& p, const Lse<T>& q) {
  const T m = p.m > q.m ? p.m : q.m;
  if (m == -INFINITY) return lse_empty<T>();
  const T sp = exp_t(p.m - m), sq = exp_t(q.m - m);
  return {m, p.s * sp + q.s * sq, shifted<REL>(p.a, p.s, p.m, m) * sp + shifted<REL>(q.a, q.s, q.m, m) * sq};
}

template <bool REL, typename T>
__device__ Lse<T> block_lse(Lse<T> st) {
  __shared__ T sm[kMaxWarps], ss[kMaxWarps], sa[kMaxWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Lse<T> o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.a, off)};
    st = lse_merge<REL>(st, o);
  }
  __syncthreads();
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sa[warp] = st.a;
  }
  __syncthreads();
  st = lane < warps ? Lse<T>{sm[lane], ss[lane], sa[lane]} : lse_empty<T>();
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Lse<T> o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.a, off)};
    st = lse_merge<REL>(st, o);
  }
  return st;
}

// Folds the chunk's state into the running one in global memory; leaves it alone while both maxima are -inf.
template <bool REL, typename T>
__device__ __forceinline__ void fold_into(const Lse<T>& chunk, T* m, T* s, T* a) {
  const Lse<T> run{*m, *s, a != nullptr ? *a : T(0)};
  const Lse<T> both = lse_merge<REL>(run, chunk);
  if (both.m == -INFINITY) return;
  *s = both.s;
  if (a != nullptr) *a = both.a;
  *m = both.m;
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    stats_fwd_kernel(const T* __restrict__ z, int64_t ldz, const T* __restrict__ r, int64_t ldr, int64_t vc,
                     int64_t v_offset, T inv_temp, const int64_t* __restrict__ targets, T* m, T* s, T* a, T* mr,
                     T* sr, T* tgt) {
  const int64_t i = blockIdx.x;
  const T* zi = z + i * ldz;
  const T* ri = MODE == kExactKl ? r + i * ldr : nullptr;
  Lse<T> st = lse_empty<T>(), st_r = lse_empty<T>();
  for (int64_t j = threadIdx.x; j < vc; j += blockDim.x) {
    const T x = scaled(zi[j], inv_temp);
    if (MODE == kLogprob) {
      lse_push<false>(st, x, T(0));
    } else if (MODE == kEntropy) {
      lse_push<true>(st, x, T(0));
    } else {
      const T y = scaled(ri[j], inv_temp);
      lse_push<false>(st, x, x - y);
      lse_push<false>(st_r, y, T(0));
    }
  }
  constexpr bool kRel = MODE == kEntropy;
  st = block_lse<kRel>(st);
  if (MODE == kExactKl) st_r = block_lse<false>(st_r);
  if (threadIdx.x != 0) return;
  fold_into<kRel>(st, m + i, s + i, MODE == kLogprob ? nullptr : a + i);
  if (MODE == kExactKl) fold_into<false>(st_r, mr + i, sr + i, static_cast<T*>(nullptr));
  if (MODE == kLogprob && targets != nullptr && tgt != nullptr) {
    const int64_t t = targets[i] - v_offset;
    if (targets[i] >= 0 && t >= 0 && t < vc) tgt[i] = scaled(zi[t], inv_temp);
  }
}

// out may alias z (in-place backward): every thread reads element j before writing element j only. From the row's
// max mx, log-sum logs and q = a / s (ra3_native.h).
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* z, int64_t ldz, const T* __restrict__ r, int64_t ldr, T* out, int64_t ldo, int64_t vc,
                int64_t v_offset, T inv_temp, const int64_t* __restrict__ targets, const T* __restrict__ mx,
                const T* __restrict__ logs, const T* __restrict__ q, const T* __restrict__ g) {
  const int64_t i = blockIdx.x;
  const T* zi = z + i * ldz;
  T* oi = out + i * ldo;
  const T mi = mx[i], li = logs[i];
  const T c = g[i] * inv_temp;
  // Ignored rows (negative targets) and targets outside this chunk match no column.
  const int64_t t = MODE == kLogprob && targets != nullptr && targets[i] >= 0 ? targets[i] - v_offset : -1;
  const T qi = MODE == kLogprob ? T(0) : q[i];
  const T* ri = MODE == kExactKl ? r + i * ldr : nullptr;
  for (int64_t j = threadIdx.x; j < vc; j += blockDim.x) {
    const T x = scaled(zi[j], inv_temp);
    const T d = x - mi;
    const T p = exp_t(d - li);
    T v;
    if (MODE == kLogprob) {
      v = c * ((j == t ? T(1) : T(0)) - p);
    } else if (MODE == kEntropy) {
      v = p > T(0) ? -c * p * (d - qi) : T(0);
    } else {
      v = p > T(0) ? c * p * ((x - scaled(ri[j], inv_temp)) - qi) : T(0);
    }
    oi[j] = v;
  }
}

template <typename T, int MODE>
void launch_stats(const VocabSoftmaxFwdArgs& a, cudaStream_t stream) {
  stats_fwd_kernel<T, MODE><<<static_cast<unsigned>(a.n), kThreads, 0, stream>>>(
      cptr<T>(a.z), a.ldz, cptr<T>(a.r), a.ldr, a.vc, a.v_offset, T(a.inv_temp), cptr<int64_t>(a.targets),
      mptr<T>(a.m), mptr<T>(a.s), mptr<T>(a.a), mptr<T>(a.mr), mptr<T>(a.sr), mptr<T>(a.tgt));
}

template <typename T, int MODE>
void launch_grad(const VocabSoftmaxGradArgs& a, cudaStream_t stream) {
  grad_kernel<T, MODE><<<static_cast<unsigned>(a.n), kThreads, 0, stream>>>(
      cptr<T>(a.z), a.ldz, cptr<T>(a.r), a.ldr, mptr<T>(a.out), a.ldo, a.vc, a.v_offset, T(a.inv_temp),
      cptr<int64_t>(a.targets), cptr<T>(a.m), cptr<T>(a.logs), cptr<T>(a.q), cptr<T>(a.g));
}

// One grid row per logits row: grid.x is limited to 2^31 - 1 blocks.
void check_rows(int64_t n) {
  if (n > int64_t(0x7fffffff)) throw std::invalid_argument("n must be < 2^31 rows per call, got " + std::to_string(n));
}

}  // namespace

void vocab_softmax_fwd(const VocabSoftmaxFwdArgs& a, uintptr_t stream) {
  check_softmax_mode(a.mode);
  check_rows(a.n);
  if (a.n <= 0 || a.vc <= 0) return;
  DeviceGuard guard(a.m);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* fn = a.mode == kLogprob ? &launch_stats<T, kLogprob>
               : a.mode == kEntropy ? &launch_stats<T, kEntropy>
                                    : &launch_stats<T, kExactKl>;
    fn(a, as_stream(stream));
  });
  check_launch("vocab_softmax_fwd");
}

void vocab_softmax_grad(const VocabSoftmaxGradArgs& a, uintptr_t stream) {
  check_softmax_mode(a.mode);
  check_rows(a.n);
  if (a.n <= 0 || a.vc <= 0) return;
  DeviceGuard guard(a.out);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* fn = a.mode == kLogprob ? &launch_grad<T, kLogprob>
               : a.mode == kEntropy ? &launch_grad<T, kEntropy>
                                    : &launch_grad<T, kExactKl>;
    fn(a, as_stream(stream));
  });
  check_launch("vocab_softmax_grad");
}

}  // namespace ra3::cuda
