// Branch-free exp() and expm1() that the compiler can vectorise inside `#pragma omp simd` loops, and the
// macros that compile a hot loop for several x86 ISA levels (RA3_ROW_KERNEL) and force inlining (RA3_INLINE).
//
// std::exp is an opaque libm call, so a loop calling it stays scalar (glibc's vector variants need -ffast-math,
// which would also break the -inf/NaN handling the kernels rely on). This one uses only +, *, compares and integer
// bit operations: x = k*ln2 + r with |r| <= ln2/2, exp(r) from a Taylor polynomial (error below 1 ulp: degree 13
// for double, 7 for float), 2^k built in the exponent bits.
//
// Domain: results below the smallest normal number flush to 0 (x < -708.39 for double, x < -87.33 for float) and
// x = -inf gives 0, which is what the softmax sums want; x above the overflow bound gives +inf; NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(RA3_TARGET_CLONES)
// Baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512), picked at load time (see CMakeLists.txt), so a
// portable build still runs wide vectors. Templates cannot carry target_clones: put it on plain entry points.
#define RA3_ROW_KERNEL __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define RA3_ROW_KERNEL
#endif
#if defined(__GNUC__)
#define RA3_INLINE inline __attribute__((always_inline))
#else
#define RA3_INLINE inline
#endif

namespace ra3::cpu {

template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<double> {
  using Bits = uint64_t;
  static constexpr double kLo = -708.39;  // exp(kLo) ~ 2.5e-308 is still a normal double
  static constexpr double kHi = 709.78;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
  static constexpr int kDegree = 13;
};

template <>
struct ExpTraits<float> {
  using Bits = uint32_t;
  static constexpr float kLo = -87.33f;
  static constexpr float kHi = 88.72f;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float kLn2Hi = 6.9314575195e-01f;
  static constexpr float kLn2Lo = 1.4286067653e-06f;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kBias = 127;
  static constexpr int kDegree = 7;
};

template <typename T>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline T vexp(T x) {
  using E = ExpTraits<T>;
  using Bits = typename E::Bits;
  constexpr T kLog2e = T(1.4426950408889634);
  // Clamp keeps k inside the normal exponent range; out-of-range results are selected at the end.
  T xc = x < E::kLo ? E::kLo : x;
  xc = xc > E::kHi ? E::kHi : xc;
  T kd = xc * kLog2e + E::kMagic;  // round(x / ln2) sits in the low mantissa bits of kd
  Bits kbits;
  std::memcpy(&kbits, &kd, sizeof(T));
  kd -= E::kMagic;
  T rr = (xc - kd * E::kLn2Hi) - kd * E::kLn2Lo;  // two-step Cody-Waite reduction keeps r exact enough
  // Horner form of sum_{i<=deg} r^i / i!.
  T p = T(1);
  for (int i = E::kDegree; i >= 1; --i) p = T(1) + p * rr * (T(1) / T(i));  // unrolled; 1/i folds
  // 2^k: (k + bias) << mantissa bits; the high bits of kbits (from the magic constant) shift out.
  Bits sbits = (kbits + E::kBias) << E::kMantissaBits;
  T scale;
  std::memcpy(&scale, &sbits, sizeof(T));
  T y = p * scale;
  y = x < E::kLo ? T(0) : y;
  y = x > E::kHi ? std::numeric_limits<T>::infinity() : y;
  return x != x ? x : y;  // NaN in, NaN out
}

// expm1(x) = exp(x) - 1 without the cancellation near 0: the Taylor series x + x^2/2! + ... for |x| <= ln2/2
// (truncation below half an ulp: degree 8 for float, 14 for double), vexp(x) - 1 beyond, where exp(x) - 1 loses
// at most ~2 bits. -inf gives -1, +inf gives +inf, NaN stays NaN; both branches are computed and one selected.
template <typename T>
RA3_INLINE T vexpm1(T x) {
  constexpr int kDegree = ExpTraits<T>::kDegree + 1;
  constexpr T kSmall = T(0.34657359027997264);  // ln2 / 2
  T q = T(1);
  for (int i = kDegree; i >= 2; --i) q = T(1) + q * x * (T(1) / T(i));  // unrolled; 1/i folds
  const T small = x * q;
  const T large = vexp(x) - T(1);
  const T ax = x < T(0) ? -x : x;
  return ax <= kSmall ? small : large;
}

}  // namespace ra3::cpu
