// Branch-free exp() and expm1() that the compiler can vectorise inside `#pragma omp simd` loops, and the
// macros that compile a hot loop for several x86 ISA levels (RA3_ROW_KERNEL) and force inlining (RA3_INLINE).
//
// std::exp is an opaque libm call, so a loop calling it stays scalar (glibc's vector variants need -ffast-math,
// which would also break the -inf/NaN handling the kernels rely on). This one uses only +, *, compares and integer
// bit operations: x = k*ln2 + r with |r| <= ln2/2, exp(r) from a Taylor polynomial (error below 1 ulp: degree 13
// for double, 7 for float), 2^k built in the exponent bits.
//
// Rounding is what the source says: the CPU kernels are compiled with -ffp-contract=off (CMakeLists.txt), so no
// product is silently fused into a following add. With contraction, `z * inv_temp - m` became fma(z, inv_temp, -m):
// not the rounded logit minus m but the product's rounding error, ~1e29 at z / T ~ 1e36 (exp of it is inf), and
// not the value the max, the target's logit and the backward pass saw. The polynomials below, where fusing is
// harmless and worth ~30% of a softmax kernel's time, ask for fused multiply-adds explicitly (madd) in the ISA
// levels that have them.
//
// Domain: results below the smallest normal number flush to 0 (x < -708.39 for double, x < -87.33 for float) and
// x = -inf gives 0, which is what the softmax sums want; x above the overflow bound gives +inf; NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// RA3_ROW_KERNEL(declaration, body...) defines a per-row entry point; the body sees `constexpr bool kFma`, true
// where the code it runs may use fused multiply-adds (pass it on to vexp / vexpm1 / madd). Templates cannot be
// multiversioned: write the loop as a template on kFma and call it from here.
#if defined(RA3_TARGET_CLONES)
// One definition per x86 ISA level, baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512), picked at load
// time (function multiversioning, an ifunc; see CMakeLists.txt), so a portable build still runs wide vectors.
#define RA3_ROW_KERNEL(decl, ...)                                         \
  __attribute__((target("default"))) decl {                               \
    [[maybe_unused]] constexpr bool kFma = false;                         \
    __VA_ARGS__                                                           \
  }                                                                       \
  __attribute__((target("arch=x86-64-v3"))) decl {                        \
    [[maybe_unused]] constexpr bool kFma = true;                          \
    __VA_ARGS__                                                           \
  }                                                                       \
  __attribute__((target("arch=x86-64-v4"))) decl {                        \
    [[maybe_unused]] constexpr bool kFma = true;                          \
    __VA_ARGS__                                                           \
  }
#else
#if defined(__FP_FAST_FMA) && defined(__FP_FAST_FMAF)  // the target has fast fma (e.g. -march=native, aarch64)
#define RA3_FAST_FMA true
#else
#define RA3_FAST_FMA false
#endif
#define RA3_ROW_KERNEL(decl, ...)                          \
  decl {                                                   \
    [[maybe_unused]] constexpr bool kFma = RA3_FAST_FMA;   \
    __VA_ARGS__                                            \
  }
#endif
#if defined(__GNUC__)
#define RA3_INLINE inline __attribute__((always_inline))
#else
#define RA3_INLINE inline
#endif

namespace ra3::cpu {

// 1 / I!, a compile-time constant (the coefficients of the Taylor polynomials below).
constexpr double inv_factorial(int n) {
  double f = 1.0;
  for (int i = 2; i <= n; ++i) f /= i;
  return f;
}
template <int I>
inline constexpr double kInvFactorial = inv_factorial(I);

// a * b + c: one fused multiply-add where kFma (one rounding), else a rounded product and a rounded sum.
template <bool kFma, typename T>
RA3_INLINE T madd(T a, T b, T c) {
  if constexpr (kFma)
    return std::fma(a, b, c);
  else
    return a * b + c;
}

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

// sum_{i=K..N} r^(i-K) / i! in Horner form: one multiply-add per degree.
template <bool kFma, int K, int N, typename T>
RA3_INLINE T taylor_tail(T r) {
  if constexpr (K == N)
    return T(kInvFactorial<N>);
  else
    return madd<kFma>(taylor_tail<kFma, K + 1, N>(r), r, T(kInvFactorial<K>));
}

template <bool kFma, typename T>
RA3_INLINE T vexp(T x) {
  using E = ExpTraits<T>;
  using Bits = typename E::Bits;
  constexpr T kLog2e = T(1.4426950408889634);
  // Clamp keeps k inside the normal exponent range; out-of-range results are selected at the end.
  T xc = x < E::kLo ? E::kLo : x;
  xc = xc > E::kHi ? E::kHi : xc;
  T kd = madd<kFma>(xc, kLog2e, E::kMagic);  // round(x / ln2) sits in the low mantissa bits of kd
  Bits kbits;
  std::memcpy(&kbits, &kd, sizeof(T));
  kd -= E::kMagic;
  // Two-step Cody-Waite reduction keeps r exact enough (kd * kLn2Hi is exact: kLn2Hi has trailing zero bits).
  T rr = madd<kFma>(-kd, E::kLn2Lo, madd<kFma>(-kd, E::kLn2Hi, xc));
  const T p = taylor_tail<kFma, 0, E::kDegree>(rr);  // sum_{i<=deg} r^i / i!
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
template <bool kFma, typename T>
RA3_INLINE T vexpm1(T x) {
  constexpr int kDegree = ExpTraits<T>::kDegree + 1;
  constexpr T kSmall = T(0.34657359027997264);  // ln2 / 2
  const T small = x * taylor_tail<kFma, 1, kDegree>(x);  // sum_{1<=i<=deg} x^i / i!
  const T large = vexp<kFma>(x) - T(1);
  const T ax = x < T(0) ? -x : x;
  return ax <= kSmall ? small : large;
}

}  // namespace ra3::cpu
