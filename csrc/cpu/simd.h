// The SIMD layer of the CPU kernels (decode and encode): Simd<T> holds L lanes of acc_t<T>, and load /
// store convert from / to T (float, double, bfloat16, half). One implementation per vector width:
//   simd::scalar  one lane, plain C++ (any CPU; the compiler may still vectorise the loops around it)
//   simd::avx2    256-bit AVX2 + FMA + F16C, compiled under the AVX2 target (isa.h)
// A per-ISA pass of a kernel file picks one with `using simd::SK_ISA_SIMD::Simd;` (foreach_isa.h).
// Every lane computes exactly what the scalar code computes (fma = one rounding, bf16/half stores round
// to nearest even); only reductions across lanes (hsum) add in another order.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "isa.h"

#if SK_ISA_DISPATCH || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SK_HAVE_AVX2_SIMD 1
#include <immintrin.h>  // declares every intrinsic whatever the flags (GCC >= 4.9); usable in target regions
#else
#define SK_HAVE_AVX2_SIMD 0
#endif

namespace sparsekern {

// Accumulation type: fp64 for float64, else fp32.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

namespace simd {

// V is one acc_t<T>. mask_*(a, b) has bit i set where lane i compares true (here: bit 0).
namespace scalar {
template <typename T>
struct Simd {
  using A = acc_t<T>;
  using V = A;
  static constexpr int L = 1;
  static V zero() { return A(0); }
  static V set1(A x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static A hsum(V v) { return v; }
  static V load(const T* p) { return static_cast<A>(*p); }
  static void store(T* p, V v) { *p = static_cast<T>(v); }
  static unsigned mask_gt(V a, V b) { return a > b; }
  static unsigned mask_nle(V a, V b) { return !(a <= b); }  // a > b, or either is NaN
};
}  // namespace scalar

#if SK_HAVE_AVX2_SIMD
#if SK_ISA_DISPATCH
SK_TARGET_BEGIN(SK_TARGET_AVX2)
#endif
namespace avx2 {
template <typename T>
struct Simd;

struct F32 {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static unsigned mask_gt(V a, V b) { return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ))); }
  static unsigned mask_nle(V a, V b) { return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NLE_UQ))); }
};

template <>
struct Simd<float> : F32 {
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Simd<c10::BFloat16> : F32 {
  static V load(const c10::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even, NaN -> 0x7FC0: bit-identical to c10::BFloat16(float).
  static void store(c10::BFloat16* p, V v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

template <>
struct Simd<c10::Half> : F32 {
  static V load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(c10::Half* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static double hsum(V v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static unsigned mask_gt(V a, V b) { return unsigned(_mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_GT_OQ))); }
  static unsigned mask_nle(V a, V b) { return unsigned(_mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_NLE_UQ))); }
};
}  // namespace avx2
#if SK_ISA_DISPATCH
SK_TARGET_END
#endif
#endif  // SK_HAVE_AVX2_SIMD

}  // namespace simd
}  // namespace sparsekern
