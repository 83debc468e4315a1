// Softmax over one vocabulary chunk: the online log-sum-exp forward (softmax_stats_fwd) and the gradient w.r.t. the
// logits chunk (softmax_grad), for log-probs (mode 0), entropy (mode 1) and exact KL (mode 2).
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

template <typename T>
RA3_INLINE T chunk_max(const T* x_raw, int64_t vc, T inv_temp) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < vc; ++j) {
    T x = x_raw[j] * inv_temp;
    mx = x > mx ? x : mx;
  }
  return mx;
}

// Moves a running max m to max(m, chunk_mx) and gives the factor exp(m_old - m_new) that rescales what was summed
// against the old max. Returns false, leaving the state alone, while the max is still -inf (nothing to add).
template <typename T>
RA3_INLINE bool advance_max(T m, T chunk_mx, T* new_m, T* rescale) {
  T mn = m > chunk_mx ? m : chunk_mx;
  if (mn == -std::numeric_limits<T>::infinity()) return false;
  *new_m = mn;
  *rescale = std::exp(m - mn);  // m == -inf gives 0: nothing accumulated yet
  return true;
}

// One row of softmax_stats_fwd (see ra3_native.h for the state). ri is read in mode 2 only.
template <typename T>
RA3_INLINE void stats_row_impl(int mode, const T* zi, const T* ri, int64_t vc, T inv_temp, T* m, T* s, T* a, T* mr,
                               T* sr) {
  T mn, rescale;
  if (advance_max(*m, chunk_max(zi, vc, inv_temp), &mn, &rescale)) {
    T cs = 0, ca = 0;
    if (mode == kLogprob) {
#pragma omp simd reduction(+ : cs)
      for (int64_t j = 0; j < vc; ++j) cs += vexp(zi[j] * inv_temp - mn);
    } else if (mode == kEntropy) {
#pragma omp simd reduction(+ : cs, ca)
      for (int64_t j = 0; j < vc; ++j) {
        T x = zi[j] * inv_temp;
        T e = vexp(x - mn);
        T term = e * x;
        cs += e;
        ca += e > T(0) ? term : T(0);  // p = 0 at x = -inf: 0 * -inf must count as 0
      }
    } else {
#pragma omp simd reduction(+ : cs, ca)
      for (int64_t j = 0; j < vc; ++j) {
        T x = zi[j] * inv_temp;
        T e = vexp(x - mn);
        T term = e * (x - ri[j] * inv_temp);  // unconditional: a conditional load would block vectorisation
        cs += e;
        ca += e > T(0) ? term : T(0);
      }
    }
    *s = *s * rescale + cs;
    if (mode != kLogprob) *a = *a * rescale + ca;
    *m = mn;
  }
  if (mode == kExactKl && advance_max(*mr, chunk_max(ri, vc, inv_temp), &mn, &rescale)) {
    T cs = 0;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < vc; ++j) cs += vexp(ri[j] * inv_temp - mn);
    *sr = *sr * rescale + cs;
    *mr = mn;
  }
}

// One row of softmax_grad without the target's +c (added by the caller). oi may alias zi (in-place backward):
// each iteration reads element j before writing element j only.
template <typename T>
RA3_INLINE void grad_row_impl(int mode, const T* zi, const T* ri, T* oi, int64_t vc, T inv_temp, T l, T c, T aux,
                              T lr) {
  if (mode == kLogprob) {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) oi[j] = -c * vexp(zi[j] * inv_temp - l);
  } else if (mode == kEntropy) {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) {
      T lp = zi[j] * inv_temp - l;
      T p = vexp(lp);
      T val = -c * p * (lp + aux);
      oi[j] = p > T(0) ? val : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) {
      T lp = zi[j] * inv_temp - l;
      T p = vexp(lp);
      T val = c * p * (lp - (ri[j] * inv_temp - lr) - aux);
      oi[j] = p > T(0) ? val : T(0);
    }
  }
}

// The ISA-dispatched entry points (templates cannot carry target_clones).
RA3_ROW_KERNEL void stats_row(int mode, const float* zi, const float* ri, int64_t vc, float inv_temp, float* m,
                              float* s, float* a, float* mr, float* sr) {
  stats_row_impl(mode, zi, ri, vc, inv_temp, m, s, a, mr, sr);
}
RA3_ROW_KERNEL void stats_row(int mode, const double* zi, const double* ri, int64_t vc, double inv_temp, double* m,
                              double* s, double* a, double* mr, double* sr) {
  stats_row_impl(mode, zi, ri, vc, inv_temp, m, s, a, mr, sr);
}
RA3_ROW_KERNEL void grad_row(int mode, const float* zi, const float* ri, float* oi, int64_t vc, float inv_temp,
                             float l, float c, float aux, float lr) {
  grad_row_impl(mode, zi, ri, oi, vc, inv_temp, l, c, aux, lr);
}
RA3_ROW_KERNEL void grad_row(int mode, const double* zi, const double* ri, double* oi, int64_t vc, double inv_temp,
                             double l, double c, double aux, double lr) {
  grad_row_impl(mode, zi, ri, oi, vc, inv_temp, l, c, aux, lr);
}

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
          int64_t v_offset, T inv_temp, const int64_t* targets, const T* lse, const T* lse_r, const T* aux,
          const T* g) {
#pragma omp parallel for schedule(static) if (n * vc >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const T c = g[i] * inv_temp;
    T* oi = out + i * ldo;
    grad_row(mode, z + i * ldz, mode == kExactKl ? r + i * ldr : nullptr, oi, vc, inv_temp, lse[i], c,
             mode == kLogprob ? T(0) : aux[i], mode == kExactKl ? lse_r[i] : T(0));
    if (mode == kLogprob && targets != nullptr && targets[i] >= 0) {
      const int64_t t = targets[i] - v_offset;
      if (t >= 0 && t < vc) oi[t] += c;
    }
  }
}

}  // namespace

void softmax_stats_fwd(RA3_KERNEL_ARGS_SOFTMAX_STATS_FWD) {
  check_softmax_mode(mode);
  if (n <= 0 || vc <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    stats_fwd<T>(mode, cptr<T>(z), ldz, cptr<T>(r), ldr, n, vc, v_offset, T(inv_temp), cptr<int64_t>(targets),
                 mptr<T>(m), mptr<T>(s), mptr<T>(a), mptr<T>(mr), mptr<T>(sr), mptr<T>(tgt));
  });
}

void softmax_grad(RA3_KERNEL_ARGS_SOFTMAX_GRAD) {
  check_softmax_mode(mode);
  if (n <= 0 || vc <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad<T>(mode, cptr<T>(z), ldz, cptr<T>(r), ldr, mptr<T>(out), ldo, n, vc, v_offset, T(inv_temp),
            cptr<int64_t>(targets), cptr<T>(lse), cptr<T>(lse_r), cptr<T>(aux), cptr<T>(g));
  });
}

}  // namespace ra3::cpu
