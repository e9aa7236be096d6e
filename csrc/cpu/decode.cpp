// CPU sparse decode and its two backward kernels (contract: kernels.h).
//
// Forward / values-grad: the work is a gather of N*k rows of W_dec, memory bound. Rows of the
// output are split over threads; each output tile (TILE columns) is accumulated in registers
// over the k gathered rows, then stored once. When W_dec is larger than the cache budget the
// columns are processed in slabs so that one slab of W_dec (d_sae x slab) stays in L3 while all
// rows of the thread gather from it: DRAM traffic drops from ~N*k*d to ~d_sae*d elements.
// Weight-grad: counting sort of the flattened (n, j) by feature, then each thread owns a range
// of features (= distinct output rows): no atomics, no N*k*d buffer.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SK_DEC_AVX2 1
#endif

namespace sparsekern {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- SIMD abstraction: V holds L lanes of acc_t<T>; load/store convert from/to T -----------
#ifdef SK_DEC_AVX2
template <typename T>
struct Simd;

struct SimdF32Base {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

template <>
struct Simd<float> : SimdF32Base {
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Simd<c10::BFloat16> : SimdF32Base {
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
struct Simd<c10::Half> : SimdF32Base {
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
  static double hsum(V v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
};
#else
// Portable fallback (builds without -march=native): one lane, the compiler may still vectorize.
template <typename T>
struct Simd {
  using A = acc_t<T>;
  using V = A;
  static constexpr int L = 1;
  static V zero() { return A(0); }
  static V set1(A x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static A hsum(V v) { return v; }
  static V load(const T* p) { return static_cast<A>(*p); }
  static void store(T* p, V v) { *p = static_cast<T>(v); }
};
#endif

template <typename T>
constexpr int kNV = 8;  // accumulators per output tile: 8 ymm (+ broadcast + load) fit 16 regs
template <typename T>
constexpr int kTile = kNV<T> * Simd<T>::L;  // columns per register tile

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Cache budget for one slab of W_dec (bytes). Part of the 32 MiB L3 is left for the gathered
// rows' neighbours, the outputs and the other process on the machine.
int64_t slab_budget_bytes() {
  const char* e = std::getenv("SPARSEKERN_DECODE_SLAB_BYTES");  // DEV: per call
  return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(12) << 20;
}

// Columns per slab: all of d when W_dec fits the budget or is read only ~once anyway; else the
// widest multiple of the register tile whose d_sae x slab block fits.
template <typename T>
int64_t choose_slab(int64_t d_sae, int64_t d, int64_t gathers) {
  const int64_t row_bytes = d * int64_t(sizeof(T));
  const int64_t budget = slab_budget_bytes();
  if (d_sae * row_bytes <= budget || gathers <= d_sae) return std::max<int64_t>(d, 1);
  int64_t cols = budget / (d_sae * int64_t(sizeof(T)));
  cols = std::max<int64_t>(kTile<T>, cols / kTile<T> * kTile<T>);
  return std::min(cols, d);
}

// ---- validation ----------------------------------------------------------------------------
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_cpu_float(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float(t.scalar_type()), fn, ": ", name,
              " must be float32/float64/bfloat16/float16, got ", t.scalar_type());
}

// int64 contiguous copy of indices ([N, k] int64/int32), every entry checked in [0, d_sae)
// before any kernel dereferences it.
at::Tensor checked_indices(const char* fn, const at::Tensor& indices, int64_t d_sae) {
  TORCH_CHECK(indices.device().is_cpu(), fn, ": indices must be a CPU tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, fn,
              ": indices must be int64 (or int32), got ", indices.scalar_type());
  at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t m = idx.numel();
  int64_t lo = 0, hi = 0;
  if (m > 0) {
    lo = hi = p[0];
    for (int64_t i = 1; i < m; ++i) {  // branch-free min/max: vectorizes
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    TORCH_CHECK(lo >= 0 && hi < d_sae, fn, ": indices must lie in [0, d_sae=", d_sae,
                "), found values in [", lo, ", ", hi, "]");
  }
  return idx;
}

// Row-parallel grain: about 32K multiply-adds per task so tiny inputs stay on one thread.
int64_t row_grain(int64_t k, int64_t d) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / (std::max<int64_t>(k, 1) * std::max<int64_t>(d, 1)));
}

// ---- forward -------------------------------------------------------------------------------
// out[c:c+NV*L] = bias + sum_j vals[j] * W[idx[j], c:...] with the accumulators in registers.
// pf_idx (next row's indices, or null) is prefetched at the same columns.
template <typename T, int NV>
inline void fwd_tile(const acc_t<T>* vals, const int64_t* idx, const int64_t* pf_idx, int64_t k,
                     const T* W, int64_t ldw, int64_t c, const acc_t<T>* bias, T* out) {
  using S = Simd<T>;
  using SA = Simd<acc_t<T>>;
  constexpr int L = S::L;
  constexpr int kLines = (NV * L * int(sizeof(T)) + 63) / 64;
  typename S::V acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = bias ? SA::load(bias + c + i * L) : S::zero();
  for (int64_t j = 0; j < k; ++j) {
    const T* r = W + idx[j] * ldw + c;
    if (pf_idx) {
      const char* q = reinterpret_cast<const char*>(W + pf_idx[j] * ldw + c);
      for (int l = 0; l < kLines; ++l) prefetch(q + 64 * l);
    }
    const typename S::V v = S::set1(vals[j]);
    for (int i = 0; i < NV; ++i) acc[i] = S::fma(v, S::load(r + i * L), acc[i]);
  }
  for (int i = 0; i < NV; ++i) S::store(out + c + i * L, acc[i]);
}

template <typename T>
void fwd_row(const acc_t<T>* vals, const int64_t* idx, const int64_t* pf_idx, int64_t k,
             const T* W, int64_t ldw, int64_t c0, int64_t c1, const acc_t<T>* bias, T* out) {
  constexpr int L = Simd<T>::L;
  int64_t c = c0;
  for (; c + kTile<T> <= c1; c += kTile<T>) fwd_tile<T, kNV<T>>(vals, idx, pf_idx, k, W, ldw, c, bias, out);
  for (; c + L <= c1; c += L) fwd_tile<T, 1>(vals, idx, nullptr, k, W, ldw, c, bias, out);
  for (; c < c1; ++c) {  // tail columns (d not a multiple of the vector width)
    acc_t<T> s = bias ? bias[c] : acc_t<T>(0);
    for (int64_t j = 0; j < k; ++j) s += vals[j] * static_cast<acc_t<T>>(W[idx[j] * ldw + c]);
    out[c] = static_cast<T>(s);
  }
}

template <typename T>
void decode_impl(const acc_t<T>* vals, const int64_t* idx, int64_t N, int64_t k, const T* W,
                 int64_t ldw, int64_t d_sae, int64_t d, const acc_t<T>* bias, T* out) {
  const int64_t slab = choose_slab<T>(d_sae, d, N * k);
  const bool pf_on = !std::getenv("SK_NOPF");
  at::parallel_for(0, N, row_grain(k, d), [&](int64_t r0, int64_t r1) {
    // Slabs outermost inside the task: both threads sweep the same slab at about the same time,
    // so it is loaded into the shared L3 once.
    for (int64_t c0 = 0; c0 < d; c0 += slab) {
      const int64_t c1 = std::min(d, c0 + slab);
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t* pf = (pf_on && n + 1 < r1) ? idx + (n + 1) * k : nullptr;
        fwd_row<T>(vals + n * k, idx + n * k, pf, k, W, ldw, c0, c1, bias, out + n * d);
      }
    }
  });
}

// ---- backward: values ----------------------------------------------------------------------
// <g[0:len], W_row[0:len]> with g already in the accumulation type.
template <typename T>
inline acc_t<T> dot(const acc_t<T>* g, const T* w, int64_t len) {
  using S = Simd<T>;
  using SA = Simd<acc_t<T>>;
  constexpr int L = S::L;
  typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t c = 0;
  for (; c + 4 * L <= len; c += 4 * L) {  // 4 independent chains hide the FMA latency
    a0 = S::fma(SA::load(g + c), S::load(w + c), a0);
    a1 = S::fma(SA::load(g + c + L), S::load(w + c + L), a1);
    a2 = S::fma(SA::load(g + c + 2 * L), S::load(w + c + 2 * L), a2);
    a3 = S::fma(SA::load(g + c + 3 * L), S::load(w + c + 3 * L), a3);
  }
  for (; c + L <= len; c += L) a0 = S::fma(SA::load(g + c), S::load(w + c), a0);
  acc_t<T> s = S::hsum(S::add(S::add(a0, a1), S::add(a2, a3)));
  for (; c < len; ++c) s += g[c] * static_cast<acc_t<T>>(w[c]);
  return s;
}

template <typename T>
void backward_values_impl(const T* G, const int64_t* idx, int64_t N, int64_t k, const T* W,
                          int64_t ldw, int64_t d_sae, int64_t d, acc_t<T>* res) {
  using A = acc_t<T>;
  const int64_t slab = choose_slab<T>(d_sae, d, N * k);
  at::parallel_for(0, N, row_grain(k, d), [&](int64_t r0, int64_t r1) {
    std::vector<A> gbuf(std::is_same_v<T, A> ? 0 : slab);  // grad row converted once per row
    for (int64_t c0 = 0; c0 < d; c0 += slab) {
      const int64_t len = std::min(d, c0 + slab) - c0;
      for (int64_t n = r0; n < r1; ++n) {
        const A* g;
        if constexpr (std::is_same_v<T, A>) {
          g = G + n * d + c0;
        } else {
          for (int64_t c = 0; c < len; ++c) gbuf[c] = static_cast<A>(G[n * d + c0 + c]);
          g = gbuf.data();
        }
        const int64_t* ix = idx + n * k;
        A* out = res + n * k;
        for (int64_t j = 0; j < k; ++j) {
          if (n + 1 < r1) prefetch(W + ix[k + j] * ldw + c0);  // next row, same slot
          const A s = dot<T>(g, W + ix[j] * ldw + c0, len);
          out[j] = c0 == 0 ? s : out[j] + s;
        }
      }
    }
  });
}

// ---- backward: weight ----------------------------------------------------------------------
// grad_W[f, c:c+NV*L] = sum over the feature's segment of sval[e] * G[srow[e], c:...].
template <typename T, int NV>
inline void wgrad_tile(const acc_t<T>* sval, const int64_t* srow, int64_t e0, int64_t e1,
                       const T* G, int64_t d, int64_t c, T* out) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::V acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = S::zero();
  for (int64_t e = e0; e < e1; ++e) {
    const T* r = G + srow[e] * d + c;
    const typename S::V v = S::set1(sval[e]);
    for (int i = 0; i < NV; ++i) acc[i] = S::fma(v, S::load(r + i * L), acc[i]);
  }
  for (int i = 0; i < NV; ++i) S::store(out + c + i * L, acc[i]);
}

template <typename T>
void backward_weight_impl(const T* G, const acc_t<T>* vals, const int64_t* idx, int64_t N,
                          int64_t k, int64_t d_sae, int64_t d, T* out) {
  using A = acc_t<T>;
  const int64_t M = N * k;
  // 1) Counting sort of the flat positions p = n*k + j by feature; stable (positions ascend
  //    within a feature), so the reduction order, hence the result, is deterministic.
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(nthr, M / 16384));
  const int64_t csz = (M + nchunk - 1) / nchunk;
  std::vector<int64_t> hist(nchunk * d_sae, 0);  // [chunk][feature]
  at::parallel_for(0, nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = hist.data() + t * d_sae;
      for (int64_t p = t * csz, pe = std::min(M, (t + 1) * csz); p < pe; ++p) ++h[idx[p]];
    }
  });
  std::vector<int64_t> offsets(d_sae + 1);
  int64_t run = 0;
  for (int64_t f = 0; f < d_sae; ++f) {  // feature-major, chunk-minor exclusive scan
    offsets[f] = run;
    for (int64_t t = 0; t < nchunk; ++t) {
      const int64_t c = hist[t * d_sae + f];
      hist[t * d_sae + f] = run;
      run += c;
    }
  }
  offsets[d_sae] = run;
  std::vector<int64_t> srow(M);
  std::vector<A> sval(M);
  at::parallel_for(0, nchunk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = hist.data() + t * d_sae;
      for (int64_t p = t * csz, pe = std::min(M, (t + 1) * csz); p < pe; ++p) {
        const int64_t dst = h[idx[p]]++;
        srow[dst] = p / k;
        sval[dst] = vals[p];
      }
    }
  });
  // 2) Segmented reduction. Features are split so each thread gets about the same cost
  //    (one output row + one gathered row per entry); each thread owns its output rows.
  auto cost = [&](int64_t f) { return offsets[f] + f; };
  const int64_t total = cost(d_sae);
  const int64_t ntask = std::max<int64_t>(1, std::min<int64_t>(nthr * 4, d_sae));
  at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    constexpr int L = Simd<T>::L;
    // first feature whose cost reaches the task's share (cost is strictly increasing)
    auto bound = [&](int64_t t) {
      if (t >= ntask) return d_sae;
      const int64_t target = total * t / ntask;
      int64_t lo = 0, hi = d_sae;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (cost(mid) < target) lo = mid + 1; else hi = mid;
      }
      return lo;
    };
    for (int64_t f = bound(t0), fe = bound(t1); f < fe; ++f) {
      T* o = out + f * d;
      const int64_t e0 = offsets[f], e1 = offsets[f + 1];
      if (e0 == e1) {  // unused feature: zero row (all-zero bits are 0.0 in every dtype)
        std::memset(static_cast<void*>(o), 0, sizeof(T) * d);
        continue;
      }
      int64_t c = 0;
      for (; c + kTile<T> <= d; c += kTile<T>) wgrad_tile<T, kNV<T>>(sval.data(), srow.data(), e0, e1, G, d, c, o);
      for (; c + L <= d; c += L) wgrad_tile<T, 1>(sval.data(), srow.data(), e0, e1, G, d, c, o);
      for (; c < d; ++c) {
        A s = 0;
        for (int64_t e = e0; e < e1; ++e) s += sval[e] * static_cast<A>(G[srow[e] * d + c]);
        o[c] = static_cast<T>(s);
      }
    }
  });
}

// W_dec with unit column stride is used in place (any row stride); otherwise copied.
at::Tensor rows_unit_stride(const at::Tensor& W) {
  return (W.stride(1) == 1 && W.stride(0) >= 0) ? W : W.contiguous();
}

at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec) {
  constexpr const char* fn = "sparse_decode_cpu";
  check_cpu_float(fn, "values", values);
  check_cpu_float(fn, "W_dec", W_dec);
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [N, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), fn, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(W_dec.dim() == 2, fn, ": W_dec must be [d_sae, d], got ", W_dec.sizes());
  const int64_t N = values.size(0), k = values.size(1);
  const int64_t d_sae = W_dec.size(0), d = W_dec.size(1);
  const at::ScalarType acc = acc_scalar(W_dec.scalar_type());
  at::Tensor bias;
  if (b_dec.has_value() && b_dec->defined()) {
    check_cpu_float(fn, "b_dec", *b_dec);
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == d, fn, ": b_dec must be [d=", d,
                "], got ", b_dec->sizes());
    bias = b_dec->to(acc).contiguous();
  }
  at::Tensor idx = checked_indices(fn, indices, d_sae);
  at::Tensor vals = values.to(acc).contiguous();
  at::Tensor W = rows_unit_stride(W_dec);
  at::Tensor out = at::empty({N, d}, W_dec.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), fn, [&] {
    using A = acc_t<scalar_t>;
    decode_impl<scalar_t>(vals.const_data_ptr<A>(), idx.const_data_ptr<int64_t>(), N, k,
                          W.const_data_ptr<scalar_t>(), W.stride(0), d_sae, d,
                          bias.defined() ? bias.const_data_ptr<A>() : nullptr,
                          out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor sparse_decode_backward_values_cpu(const at::Tensor& grad_out, const at::Tensor& indices,
                                             const at::Tensor& W_dec) {
  constexpr const char* fn = "sparse_decode_backward_values_cpu";
  check_cpu_float(fn, "grad_out", grad_out);
  check_cpu_float(fn, "W_dec", W_dec);
  TORCH_CHECK(W_dec.dim() == 2, fn, ": W_dec must be [d_sae, d], got ", W_dec.sizes());
  TORCH_CHECK(indices.dim() == 2, fn, ": indices must be [N, k], got ", indices.sizes());
  const int64_t N = indices.size(0), k = indices.size(1);
  const int64_t d_sae = W_dec.size(0), d = W_dec.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == d, fn,
              ": grad_out must be [N=", N, ", d=", d, "], got ", grad_out.sizes());
  at::Tensor idx = checked_indices(fn, indices, d_sae);
  // grad_out normally has W_dec's dtype (it is the output's grad); convert if it does not.
  at::Tensor G = grad_out.to(W_dec.scalar_type()).contiguous();
  at::Tensor W = rows_unit_stride(W_dec);
  const at::ScalarType acc = acc_scalar(W_dec.scalar_type());
  at::Tensor res = at::empty({N, k}, W_dec.options().dtype(acc));
  if (N > 0 && k > 0) {
    if (d == 0) {
      res.zero_();
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), fn, [&] {
        backward_values_impl<scalar_t>(G.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                       N, k, W.const_data_ptr<scalar_t>(), W.stride(0), d_sae, d,
                                       res.mutable_data_ptr<acc_t<scalar_t>>());
      });
    }
  }
  return res.to(W_dec.scalar_type());
}

at::Tensor sparse_decode_backward_weight_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                             const at::Tensor& indices, int64_t d_sae) {
  constexpr const char* fn = "sparse_decode_backward_weight_cpu";
  check_cpu_float(fn, "grad_out", grad_out);
  check_cpu_float(fn, "values", values);
  TORCH_CHECK(d_sae >= 0, fn, ": d_sae must be >= 0, got ", d_sae);
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [N, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), fn, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == values.size(0), fn,
              ": grad_out must be [N=", values.size(0), ", d], got ", grad_out.sizes());
  const int64_t N = values.size(0), k = values.size(1), d = grad_out.size(1);
  at::Tensor idx = checked_indices(fn, indices, d_sae);
  const at::ScalarType acc = acc_scalar(grad_out.scalar_type());
  at::Tensor vals = values.to(acc).contiguous();
  at::Tensor G = grad_out.contiguous();
  at::Tensor out = at::empty({d_sae, d}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  if (d_sae == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), fn, [&] {
    using A = acc_t<scalar_t>;
    backward_weight_impl<scalar_t>(G.const_data_ptr<scalar_t>(), vals.const_data_ptr<A>(),
                                   idx.const_data_ptr<int64_t>(), N, k, d_sae, d,
                                   out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace sparsekern
