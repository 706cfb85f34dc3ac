// Portable fixed-width SIMD (GCC/Clang vector extensions) and fast vectorised exp/log.
//
// One vector is one hardware register of the ISA the translation unit is compiled for:
// 64 bytes (16 floats, one zmm) with AVX-512, 32 bytes (8 floats, one ymm) with AVX/AVX2,
// 16 bytes (4 floats: xmm / NEON q) otherwise. setup.py compiles the same sources once per
// ISA (optical_kernels._cpu_base / _cpu_avx2 / _cpu_avx512); OKC_VEC_BYTES overrides the
// width (measurement only). A vector wider than the registers (the former fixed 64 bytes on
// AVX2) is split by the compiler into register pairs: every loop blocked for 32 zmm
// registers then needs twice the registers it has, and spills.
//
// exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a minimax polynomial
// (Cephes expf, ~1 ulp) for float and a degree-13 Taylor polynomial (< 1 ulp) for double;
// 2^n is built in the exponent bits. Inputs below the smallest normal result give exactly 0
// (never subnormals, never garbage); large inputs saturate at about e^88 / e^709.
// log: Cephes logf (~1 ulp) for positive normal floats; double uses std::log per lane.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef OKC_VEC_BYTES
#if defined(__AVX512F__)
#define OKC_VEC_BYTES 64
#elif defined(__AVX__)
#define OKC_VEC_BYTES 32
#else
#define OKC_VEC_BYTES 16
#endif
#endif

namespace okc {

// Bytes of one SIMD vector of this build.
constexpr int kVecBytes = OKC_VEC_BYTES;

// Whether any bit of a vector of kVecBytes bytes (a comparison mask) is set: one test
// instruction where the ISA has it, instead of a loop over the lanes.
template <class M>
static inline bool any_bits(M m) {
  static_assert(sizeof(M) == OKC_VEC_BYTES, "a mask is one vector");
#if OKC_VEC_BYTES == 64 && defined(__AVX512F__)
  __m512i v;
  std::memcpy(&v, &m, 64);
  return _mm512_test_epi64_mask(v, v) != 0;
#elif OKC_VEC_BYTES == 32 && defined(__AVX__)
  __m256i v;
  std::memcpy(&v, &m, 32);
  return !_mm256_testz_si256(v, v);
#else
  uint64_t w[sizeof(M) / 8];
  std::memcpy(w, &m, sizeof(M));
  uint64_t r = 0;
  for (unsigned k = 0; k < sizeof(M) / 8; ++k) r |= w[k];
  return r != 0;
#endif
}

template <class T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(OKC_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(OKC_VEC_BYTES)));
  static constexpr int L = OKC_VEC_BYTES / 4;

  static inline V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // Scalar-vector operations broadcast the scalar (GCC/Clang vector extensions).
  static inline V set1(float x) { return x - V{}; }
  static inline I iset1(int32_t x) { return x + I{}; }
  static inline V sel(I m, V a, V b) { return (V)((m & (I)a) | (~m & (I)b)); }
  static inline V vmax(V a, V b) { return sel(a > b, a, b); }
  static inline V vmin(V a, V b) { return sel(a < b, a, b); }
  static inline float hsum(V v) {
    float s = 0.f;
    for (int k = 0; k < L; ++k) s += v[k];
    return s;
  }
  static inline float hmax(V v) {
    float s = v[0];
    for (int k = 1; k < L; ++k) s = v[k] > s ? v[k] : s;
    return s;
  }

  static inline bool any(I m) { return any_bits(m); }

  static inline V exp(V x) {
    const V lo = set1(-87.33654f), hi = set1(88.0f);
    const I under = x < lo;
    x = sel(x > hi, hi, x);
    x = sel(under, lo, x);
    const V magic = set1(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V t = x * set1(1.44269504088896341f) + magic;
    const V n = t - magic;
    const I ni = (I)t - iset1(0x4B400000);
    V r = x - n * set1(0.693359375f);
    r = r - n * set1(-2.12194440e-4f);
    V p = set1(1.9875691500E-4f);
    p = p * r + set1(1.3981999507E-3f);
    p = p * r + set1(8.3334519073E-3f);
    p = p * r + set1(4.1665795894E-2f);
    p = p * r + set1(1.6666665459E-1f);
    p = p * r + set1(5.0000001201E-1f);
    V y = p * (r * r) + r + set1(1.0f);
    const I e = (ni + iset1(127)) << 23;
    y = y * (V)e;
    return sel(under, set1(0.f), y);
  }

  // Natural log of positive normal numbers.
  static inline V log(V x) {
    const I xi = (I)x;
    I e = ((xi >> 23) & iset1(0xff)) - iset1(126);
    const V mnt = (V)((xi & iset1(0x007fffff)) | iset1(0x3f000000));  // [0.5, 1)
    const I small = mnt < set1(0.707106781186547524f);
    e = e + small;  // small is -1 where true
    const V z0 = sel(small, mnt + mnt, mnt) - set1(1.f);
    const V z = z0 * z0;
    V y = set1(7.0376836292E-2f);
    y = y * z0 + set1(-1.1514610310E-1f);
    y = y * z0 + set1(1.1676998740E-1f);
    y = y * z0 + set1(-1.2420140846E-1f);
    y = y * z0 + set1(1.4249322787E-1f);
    y = y * z0 + set1(-1.6668057665E-1f);
    y = y * z0 + set1(2.0000714765E-1f);
    y = y * z0 + set1(-2.4999993993E-1f);
    y = y * z0 + set1(3.3333331174E-1f);
    y = y * z0 * z;
    const V ef = __builtin_convertvector(e, V);
    y = y + ef * set1(-2.12194440e-4f);
    y = y - set1(0.5f) * z;
    return z0 + y + ef * set1(0.693359375f);
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(OKC_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(OKC_VEC_BYTES)));
  static constexpr int L = OKC_VEC_BYTES / 8;

  static inline V load(const double* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(double* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V set1(double x) { return x - V{}; }
  static inline I iset1(int64_t x) { return x + I{}; }
  static inline V sel(I m, V a, V b) { return (V)((m & (I)a) | (~m & (I)b)); }
  static inline V vmax(V a, V b) { return sel(a > b, a, b); }
  static inline V vmin(V a, V b) { return sel(a < b, a, b); }
  static inline double hsum(V v) {
    double s = 0.0;
    for (int k = 0; k < L; ++k) s += v[k];
    return s;
  }
  static inline double hmax(V v) {
    double s = v[0];
    for (int k = 1; k < L; ++k) s = v[k] > s ? v[k] : s;
    return s;
  }

  static inline bool any(I m) { return any_bits(m); }

  static inline V exp(V x) {
    const V lo = set1(-708.3), hi = set1(709.0);
    const I under = x < lo;
    x = sel(x > hi, hi, x);
    x = sel(under, lo, x);
    const V magic = set1(6755399441055744.0);  // 1.5 * 2^52
    const V t = x * set1(1.4426950408889634074) + magic;
    const V n = t - magic;
    const I ni = (I)t - iset1(0x4338000000000000LL);
    V r = x - n * set1(6.93147180369123816490e-01);
    r = r - n * set1(1.90821492927058770002e-10);
    // Taylor polynomial of e^r to degree 13 (|r| <= 0.347: truncation < 5e-18).
    V p = set1(1.0 / 6227020800.0);
    p = p * r + set1(1.0 / 479001600.0);
    p = p * r + set1(1.0 / 39916800.0);
    p = p * r + set1(1.0 / 3628800.0);
    p = p * r + set1(1.0 / 362880.0);
    p = p * r + set1(1.0 / 40320.0);
    p = p * r + set1(1.0 / 5040.0);
    p = p * r + set1(1.0 / 720.0);
    p = p * r + set1(1.0 / 120.0);
    p = p * r + set1(1.0 / 24.0);
    p = p * r + set1(1.0 / 6.0);
    p = p * r + set1(0.5);
    V y = p * (r * r) + r + set1(1.0);
    const I e = (ni + iset1(1023)) << 52;
    y = y * (V)e;
    return sel(under, set1(0.0), y);
  }

  static inline V log(V x) {
    V y;
    for (int k = 0; k < L; ++k) y[k] = std::log(x[k]);
    return y;
  }
};

}  // namespace okc
