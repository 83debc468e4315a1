// Softmax over one vocabulary chunk: the online log-sum-exp forward (vocab_softmax_fwd) and the gradient w.r.t. the
// logits chunk (vocab_softmax_grad), for log-probs (mode 0), entropy (mode 1) and exact KL (mode 2).
//
// Rows run in parallel (OpenMP); within a row the loops over the chunk are contiguous `omp simd` loops with the
// vectorisable vexp(), so a row of vc logits costs two streaming passes in the forward and one in the backward.
// The per-row functions are compiled for baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512) and picked
// at load time (RA3_TARGET_CLONES, see CMakeLists.txt), so a portable build still runs wide vectors.
#include <cmath>
#include <limits>

#include "../ra3_native.h"
#include "vec_math.h"

namespace ra3::cpu {
namespace {

// Below this many logits per call the OpenMP fork costs more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 15;

// The sums of one row and chunk. Summed one term at a time per vector lane in float32, ~3,100 terms a lane at
// V = 50257 with AVX-512 (twice that with AVX2), they dropped the terms below half an ulp of a lane's sum and came
// out low: entropies off by up to 8e-5 (2.5e-4 with AVX2), several times torch's error. Now each block of kBlock
// elements is summed in T (at most 16 terms a lane with AVX-512, 32 with AVX2, 64 for baseline x86-64) and the
// block sums in double (Acc). No slower than one T sum per row; summing every term in double cost 10-40%.
using Acc = double;
constexpr int64_t kBlock = 256;

// max_j z_j over the chunk; times inv_temp > 0 it is max_j (z_j * inv_temp) exactly, as rounding is monotone.
template <typename T>
RA3_INLINE T chunk_max(const T* z, int64_t vc) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < vc; ++j) mx = z[j] > mx ? z[j] : mx;
  return mx;
}

// Folds one chunk's sums, taken against the new max mn (>= the running max *m), into the running state: s = sum
// exp(x - m) and, where a is given, a = sum exp(x - m) * f. The rescale of the old sums and the additions run in
// Acc; the state is rounded to T once per chunk.
// With `relative` (entropy) a is sum exp(x - m) * (x - m): moving the max from m to mn adds s * (m - mn) to it first.
template <typename T>
RA3_INLINE void fold(T mn, Acc cs, Acc ca, T* m, T* s, T* a, bool relative) {
  const Acc rescale = std::exp(Acc(*m) - Acc(mn));  // exact: 1 when the max stays; 0 while the state is empty
  if (a != nullptr) {
    const Acc old = *s > T(0) && relative ? Acc(*a) + Acc(*s) * (Acc(*m) - Acc(mn)) : Acc(*a);
    *a = T(old * rescale + ca);
  }
  *s = T(Acc(*s) * rescale + cs);
  *m = mn;
}

// One row of vocab_softmax_fwd (see ra3_native.h for the state). ri is read in mode 2 only.
//
// Each element is x = z * inv_temp, rounded (the kernels are compiled without FMA contraction, CMakeLists.txt), so
// the max, the exponents x - mn, the target's logit and the backward's x - m all see the same x. The entropy sums
// e * (x - mn) <= 0 and keeps them relative to the max (small next to e * x where the logits sit far from 0, x ~ 1e4
// at T = 1e-3). The exact KL sums both softmaxes in one loop with the same instructions, so identical logits give
// bit-identical (m, s) and (mr, sr) and a KL of exactly 0.
template <bool kFma, typename T>
RA3_INLINE void stats_row_impl(int mode, const T* zi, const T* ri, int64_t vc, T inv_temp, T* m, T* s, T* a, T* mr,
                               T* sr) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const bool kl = mode == kExactKl;
  const T cz = chunk_max(zi, vc) * inv_temp;
  const T mn = *m > cz ? *m : cz;
  T mnr = kNegInf;
  if (kl) {
    const T cr = chunk_max(ri, vc) * inv_temp;
    mnr = *mr > cr ? *mr : cr;
  }
  // A side whose max is still -inf adds nothing and keeps its state; shifting it by 0 keeps its exps at 0, not NaN.
  const T sh = mn == kNegInf ? T(0) : mn, shr = mnr == kNegInf ? T(0) : mnr;
  Acc cs = 0, ca = 0, csr = 0;
  for (int64_t j0 = 0; j0 < vc; j0 += kBlock) {
    const int64_t j1 = vc - j0 > kBlock ? j0 + kBlock : vc;
    T bs = 0, ba = 0, bsr = 0;
    if (mode == kLogprob) {
#pragma omp simd reduction(+ : bs)
      for (int64_t j = j0; j < j1; ++j) {
        const T x = zi[j] * inv_temp;
        bs += vexp<kFma>(x - sh);
      }
    } else if (mode == kEntropy) {
#pragma omp simd reduction(+ : bs, ba)
      for (int64_t j = j0; j < j1; ++j) {
        const T x = zi[j] * inv_temp;
        const T d = x - sh;
        const T e = vexp<kFma>(d);
        bs += e;
        ba += e > T(0) ? e * d : T(0);  // p = 0 at x = -inf: 0 * -inf must count as 0
      }
    } else {
#pragma omp simd reduction(+ : bs, ba, bsr)
      for (int64_t j = j0; j < j1; ++j) {
        const T x = zi[j] * inv_temp, y = ri[j] * inv_temp;  // unconditional loads: conditional ones block simd
        const T e = vexp<kFma>(x - sh), er = vexp<kFma>(y - shr);
        bs += e;
        bsr += er;
        ba += e > T(0) ? e * (x - y) : T(0);
      }
    }
    cs += bs, ca += ba, csr += bsr;
  }
  if (mn != kNegInf) fold(mn, cs, ca, m, s, mode == kLogprob ? nullptr : a, mode == kEntropy);
  if (kl && mnr != kNegInf) fold(mnr, csr, Acc(0), mr, sr, static_cast<T*>(nullptr), false);
}

// One row of vocab_softmax_grad without the target's +c (added by the caller), from the row's max mx, log-sum
// logs and q = a / s. oi may alias zi (in-place backward): each iteration reads element j before writing element j.
template <bool kFma, typename T>
RA3_INLINE void grad_row_impl(int mode, const T* zi, const T* ri, T* oi, int64_t vc, T inv_temp, T mx, T logs, T c,
                              T q) {
  if (mode == kLogprob) {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) oi[j] = -c * vexp<kFma>((zi[j] * inv_temp - mx) - logs);
  } else if (mode == kEntropy) {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) {
      const T d = zi[j] * inv_temp - mx;
      const T p = vexp<kFma>(d - logs);
      const T val = -c * p * (d - q);  // d(entropy)/dx = -p (log p + entropy) = -p ((x - m) - q)
      oi[j] = p > T(0) ? val : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) {
      const T x = zi[j] * inv_temp;
      const T p = vexp<kFma>((x - mx) - logs);
      const T val = c * p * ((x - ri[j] * inv_temp) - q);  // p (log p - log p_ref - KL) = p ((x - y) - q)
      oi[j] = p > T(0) ? val : T(0);
    }
  }
}

// The ISA-dispatched entry points (see RA3_ROW_KERNEL).
RA3_ROW_KERNEL(void stats_row(int mode, const float* zi, const float* ri, int64_t vc, float inv_temp, float* m,
                              float* s, float* a, float* mr, float* sr),
               stats_row_impl<kFma>(mode, zi, ri, vc, inv_temp, m, s, a, mr, sr);)
RA3_ROW_KERNEL(void stats_row(int mode, const double* zi, const double* ri, int64_t vc, double inv_temp, double* m,
                              double* s, double* a, double* mr, double* sr),
               stats_row_impl<kFma>(mode, zi, ri, vc, inv_temp, m, s, a, mr, sr);)
RA3_ROW_KERNEL(void grad_row(int mode, const float* zi, const float* ri, float* oi, int64_t vc, float inv_temp,
                             float mx, float logs, float c, float q),
               grad_row_impl<kFma>(mode, zi, ri, oi, vc, inv_temp, mx, logs, c, q);)
RA3_ROW_KERNEL(void grad_row(int mode, const double* zi, const double* ri, double* oi, int64_t vc, double inv_temp,
                             double mx, double logs, double c, double q),
               grad_row_impl<kFma>(mode, zi, ri, oi, vc, inv_temp, mx, logs, c, q);)

template <typename T>
void stats_fwd(int mode, const T* z, int64_t ldz, const T* r, int64_t ldr, int64_t n, int64_t vc, int64_t v_offset,
               T inv_temp, const int64_t* targets, T* m, T* s, T* a, T* mr, T* sr, T* tgt) {
#pragma omp parallel for schedule(static) if (n * vc >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T* zi = z + i * ldz;
    const bool kl = mode == kExactKl;
    stats_row(mode, zi, kl ? r + i * ldr : nullptr, vc, inv_temp, m + i, s + i, mode == kLogprob ? nullptr : a + i,
              kl ? mr + i : nullptr, kl ? sr + i : nullptr);
    if (mode == kLogprob && targets != nullptr && tgt != nullptr) {
      const int64_t t = targets[i] - v_offset;
      if (targets[i] >= 0 && t >= 0 && t < vc) tgt[i] = zi[t] * inv_temp;
    }
  }
}

template <typename T>
void grad(int mode, const T* z, int64_t ldz, const T* r, int64_t ldr, T* out, int64_t ldo, int64_t n, int64_t vc,
          int64_t v_offset, T inv_temp, const int64_t* targets, const T* m, const T* logs, const T* q,
          const T* g) {
#pragma omp parallel for schedule(static) if (n * vc >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T c = g[i] * inv_temp;
    T* oi = out + i * ldo;
    grad_row(mode, z + i * ldz, mode == kExactKl ? r + i * ldr : nullptr, oi, vc, inv_temp, m[i], logs[i], c,
             mode == kLogprob ? T(0) : q[i]);
    if (mode == kLogprob && targets != nullptr && targets[i] >= 0) {
      const int64_t t = targets[i] - v_offset;
      if (t >= 0 && t < vc) oi[t] += c;
    }
  }
}

}  // namespace

void vocab_softmax_fwd(const VocabSoftmaxFwdArgs& a) {
  check_softmax_mode(a.mode);
  if (a.n <= 0 || a.vc <= 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    stats_fwd<T>(a.mode, cptr<T>(a.z), a.ldz, cptr<T>(a.r), a.ldr, a.n, a.vc, a.v_offset, T(a.inv_temp),
                 cptr<int64_t>(a.targets), mptr<T>(a.m), mptr<T>(a.s), mptr<T>(a.a), mptr<T>(a.mr), mptr<T>(a.sr),
                 mptr<T>(a.tgt));
  });
}

void vocab_softmax_grad(const VocabSoftmaxGradArgs& a) {
  check_softmax_mode(a.mode);
  if (a.n <= 0 || a.vc <= 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    grad<T>(a.mode, cptr<T>(a.z), a.ldz, cptr<T>(a.r), a.ldr, mptr<T>(a.out), a.ldo, a.n, a.vc, a.v_offset,
            T(a.inv_temp), cptr<int64_t>(a.targets), cptr<T>(a.m), cptr<T>(a.logs), cptr<T>(a.q), cptr<T>(a.g));
  });
}

}  // namespace ra3::cpu
