// CPU sparse decode and its two backward kernels (contract: kernels.h).
//
// Forward and values-grad gather N*k rows of W_dec: memory bound. Two paths:
//  * gather: rows split over threads; each output tile (kTile columns) is accumulated in
//    registers over the k gathered rows (next row's gathers prefetched), then stored once.
//  * scatter (W_dec past the caches and each feature used >= once per row chunk, the
//    SAE-training case): the chunk's entries are counting-sorted by feature; per column block
//    W_dec is streamed once in address order and each entry updates an L2-resident block of the
//    output (forward) or reads an L2-resident block of grad_out (values-grad). W_dec then comes
//    from DRAM ~once per chunk as sequential-ish reads instead of N*k random rows.
// Weight-grad: the same sort, then each thread owns a range of features (= distinct output
// rows): a segmented reduction, no atomics, no N*k*d buffer.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Stable counting sort of the flat entries of rows [r0, r1) by feature. Entry e (in sorted
// order) comes from row r0 + srow[e], at flat position spos[e] = row*k + j (if want_pos), with
// value sval[e] (if vals); offsets is the CSR row pointer over features ([d_sae + 1]); used
// lists the features with at least one entry (if want_used). Stable, so every reduction over
// a feature's segment runs in a fixed order: results are deterministic.
struct FeatureSort {
  std::vector<int64_t> offsets, spos, used, hist;
  std::vector<int32_t> srow;   // row - r0 (chunks have < 2^31 rows)
  std::vector<float> sval_f;   // sorted values in the accumulation type (fp32 / fp64)
  std::vector<double> sval_d;
  template <typename A>
  std::vector<A>& sval() {
    if constexpr (std::is_same_v<A, double>) return sval_d; else return sval_f;
  }
};

// The sort buffers are reused across calls on the same thread: fresh multi-100-KiB vectors
// cost more in page faults than the sort itself. Buffers past 64 MiB are released after use.
FeatureSort& thread_sort_scratch() {
  thread_local FeatureSort fs;
  return fs;
}
void trim_sort_scratch(FeatureSort& fs) {
  constexpr size_t kKeep = size_t(64) << 20;
  auto trim = [](auto& v) {
    if (v.capacity() * sizeof(v[0]) > kKeep) std::vector<std::decay_t<decltype(v[0])>>().swap(v);
  };
  trim(fs.offsets); trim(fs.srow); trim(fs.spos); trim(fs.used); trim(fs.hist);
  trim(fs.sval_f); trim(fs.sval_d);
}

template <typename A>
void sort_by_feature(const int64_t* idx, const A* vals, int64_t r0, int64_t r1, int64_t k,
                     int64_t d_sae, bool want_used, bool want_pos, FeatureSort& fs) {
  const int64_t M = (r1 - r0) * k;
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
  // one histogram per row part; parts only when there is enough work to share
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(nthr, M / (int64_t(1) << 18)));
  auto part_rows = [&](int64_t t) { return r0 + (r1 - r0) * t / nparts; };
  std::vector<int64_t>& hist = fs.hist;  // [part][feature]
  hist.assign(nparts * d_sae, 0);
  at::parallel_for(0, nparts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = hist.data() + t * d_sae;
      for (int64_t p = part_rows(t) * k, pe = part_rows(t + 1) * k; p < pe; ++p) ++h[idx[p]];
    }
  });
  fs.offsets.resize(d_sae + 1);
  if (want_used) fs.used.clear();
  int64_t run = 0;
  for (int64_t f = 0; f < d_sae; ++f) {  // feature-major, part-minor exclusive scan
    fs.offsets[f] = run;
    for (int64_t t = 0; t < nparts; ++t) {
      const int64_t c = hist[t * d_sae + f];
      hist[t * d_sae + f] = run;
      run += c;
    }
    if (want_used && run != fs.offsets[f]) fs.used.push_back(f);
  }
  fs.offsets[d_sae] = run;
  fs.srow.resize(M);
  if (want_pos) fs.spos.resize(M);
  std::vector<A>& sval = fs.sval<A>();
  if (vals) sval.resize(M);
  at::parallel_for(0, nparts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = hist.data() + t * d_sae;
      for (int64_t n = part_rows(t), ne = part_rows(t + 1); n < ne; ++n) {
        for (int64_t p = n * k; p < (n + 1) * k; ++p) {
          const int64_t dst = h[idx[p]]++;
          fs.srow[dst] = static_cast<int32_t>(n - r0);
          if (want_pos) fs.spos[dst] = p;
          if (vals) sval[dst] = vals[p];
        }
      }
    }
  });
}

// Large fresh outputs (the [d_sae, d] weight grad) are first written by us; on Linux ask for
// transparent huge pages on their 2 MiB-aligned interior before that first touch: with 4 KiB
// pages the page faults of a fresh 75 MiB output cost ~30 ms on the VMs this was tuned on, ~4x
// the kernel itself (THP "madvise" mode is a common default; this is what torch's own
// THP_MEM_ALLOC_ENABLE does). Only memory this call allocated is advised; smaller outputs are
// left alone (no clear gain measured). SPARSEKERN_NO_THP=1 turns it off.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* e = std::getenv("SPARSEKERN_NO_THP");
    return !(e && e[0] == '1');
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (enabled && t.nbytes() >= 16 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) / kHuge * kHuge, b = (p + t.nbytes()) / kHuge * kHuge;
    if (b > a) (void)madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // advisory only
  }
#endif
  return t;
}

// Per-thread scratch that survives calls (OpenMP threads persist): no page faults per call.
// 64-byte aligned, so that the accumulator rows (whole cache lines) never split a line.
template <typename A>
A* thread_scratch(int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(A);
  thread_local std::vector<A> buf;
  if (int64_t(buf.size()) < n + kPad) buf.resize(n + kPad);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<A*>((p + 63) & ~uintptr_t(63));
}

// Forward "scatter" path: rows are processed in chunks whose [rows x kTile] fp32 accumulator
// fits in L2; per column block the chunk's entries, sorted by feature, stream W_dec's block
// once in address order and are added into the L2-resident accumulator. W_dec is then read
// ~once per chunk from DRAM instead of ~k times per row as random rows.
constexpr int64_t kAccBytes = int64_t(512) << 10;       // accumulator block per thread (L2: 1 MiB)
constexpr int64_t kScatterMinWBytes = int64_t(8) << 20;  // smaller W_dec stays in L3: gather

template <typename T>
int64_t scatter_chunk_rows() {
  return std::max<int64_t>(1, kAccBytes / (kTile<T> * int64_t(sizeof(acc_t<T>))));
}

const char* forced_path() {  // SPARSEKERN_DECODE_PATH=gather|scatter (tests, benchmarks)
  static const char* p = std::getenv("SPARSEKERN_DECODE_PATH");
  return p ? p : "";
}

template <typename T>
bool use_scatter(int64_t N, int64_t k, int64_t d_sae, int64_t d) {
  const std::string forced = forced_path();
  if (forced == "gather") return false;
  if (d < kTile<T>) return false;  // no full column block
  if (forced == "scatter") return true;
  const int64_t rows = std::min(N, scatter_chunk_rows<T>());
  // needs W_dec past the cache, each feature reused (>= 1 entry per feature per chunk) and
  // enough column blocks to share between threads
  return d_sae * d * int64_t(sizeof(T)) > kScatterMinWBytes && rows * k >= d_sae &&
         d / kTile<T> >= std::min<int64_t>(2, at::get_num_threads());
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

// Gather path: acc (one output row, in L1) += the gathered rows G at a time, each gathered row
// read front to back. Few concurrent streams (G), so the hardware prefetcher follows each row;
// software prefetch only touches the first lines of rows kPfDist entries ahead. (Measured:
// faster than keeping a column tile in registers across all k rows, which interleaves k
// streams and needs every line prefetched.)
constexpr int kGroup = 16;
constexpr int64_t kPfDist = 32;  // entries ahead (flat over the task's rows)
constexpr int kPfRowLines = 4;   // lines prefetched per gathered row

template <typename T, int G>
inline void stream_group(const acc_t<T>* v, const T* const* rows, int64_t d, bool first,
                         const acc_t<T>* bias, acc_t<T>* acc) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr int L = S::L;
  typename S::V vb[G];
  for (int q = 0; q < G; ++q) vb[q] = S::set1(v[q]);
  int64_t c = 0;
  for (; c + L <= d; c += L) {
    typename S::V a = !first ? SA::load(acc + c) : bias ? SA::load(bias + c) : S::zero();
    for (int q = 0; q < G; ++q) a = S::fma(vb[q], S::load(rows[q] + c), a);
    SA::store(acc + c, a);
  }
  for (; c < d; ++c) {
    A a = !first ? acc[c] : bias ? bias[c] : A(0);
    for (int q = 0; q < G; ++q) a += v[q] * static_cast<A>(rows[q][c]);
    acc[c] = a;
  }
}

template <typename T>
void decode_gather(const acc_t<T>* vals, const int64_t* idx, int64_t N, int64_t k, const T* W,
                   int64_t ldw, int64_t d, const acc_t<T>* bias, T* out) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // accumulate straight into the output row
  at::parallel_for(0, N, row_grain(k, d), [&](int64_t r0, int64_t r1) {
    std::vector<A> abuf(kDirect ? 0 : d);
    const int64_t p_end = r1 * k;
    for (int64_t n = r0; n < r1; ++n) {
      A* acc = kDirect ? reinterpret_cast<A*>(out + n * d) : abuf.data();
      bool first = true;
      int64_t j = 0;
      auto group = [&](auto g) {
        constexpr int G = decltype(g)::value;
        const int64_t p = n * k + j;
        for (int64_t q = p + kPfDist, qe = std::min(p + kPfDist + G, p_end); q < qe; ++q) {
          const char* r = reinterpret_cast<const char*>(W + idx[q] * ldw);
          for (int l = 0; l < kPfRowLines; ++l) prefetch(r + 64 * l);
        }
        const T* rows[G];
        for (int q = 0; q < G; ++q) rows[q] = W + idx[p + q] * ldw;
        stream_group<T, G>(vals + p, rows, d, first, bias, acc);
        first = false;
        j += G;
      };
      while (k - j >= kGroup) group(std::integral_constant<int, kGroup>());
      if (k - j >= 8) group(std::integral_constant<int, 8>());
      if (k - j >= 4) group(std::integral_constant<int, 4>());
      if (k - j >= 2) group(std::integral_constant<int, 2>());
      if (k - j >= 1) group(std::integral_constant<int, 1>());
      if (first) {  // k == 0: bias or zeros
        for (int64_t c = 0; c < d; ++c) acc[c] = bias ? bias[c] : A(0);
      }
      if constexpr (!kDirect) {  // convert the fp32 row to the output dtype
        T* o = out + n * d;
        int64_t c = 0;
        for (; c + S::L <= d; c += S::L) S::store(o + c, SA::load(acc + c));
        for (; c < d; ++c) o[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

// One row chunk of the scatter path (see use_scatter).
template <typename T>
void decode_scatter_chunk(const acc_t<T>* vals, const int64_t* idx, int64_t r0, int64_t r1,
                          int64_t k, const T* W, int64_t ldw, int64_t d_sae, int64_t d,
                          const acc_t<T>* bias, T* out, FeatureSort& fs) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr int NV = kNV<T>, L = S::L;
  constexpr int64_t CB = kTile<T>;
  constexpr int kWLines = int(CB * sizeof(T) + 63) / 64, kALines = int(CB * sizeof(A) + 63) / 64;
  constexpr int64_t kPfFeat = 8, kPfEnt = 4;  // prefetch distances (features / entries ahead)
  const int64_t R = r1 - r0;
  sort_by_feature<A>(idx, vals, r0, r1, k, d_sae, /*want_used=*/true, /*want_pos=*/false, fs);
  const A* sval = fs.sval<A>().data();
  const int64_t* off = fs.offsets.data();
  const int32_t* srow = fs.srow.data();
  const int64_t* used = fs.used.data();
  const int64_t U = int64_t(fs.used.size()), E = int64_t(fs.srow.size());
  const int64_t nb = d / CB;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    A* acc = thread_scratch<A>(R * CB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * CB;
      std::memset(static_cast<void*>(acc), 0, sizeof(A) * R * CB);
      for (int64_t u = 0; u < U; ++u) {
        if (u + kPfFeat < U) {
          const char* q = reinterpret_cast<const char*>(W + used[u + kPfFeat] * ldw + c0);
          for (int l = 0; l < kWLines; ++l) prefetch(q + 64 * l);
        }
        const int64_t f = used[u];
        typename S::V w[NV];
        for (int i = 0; i < NV; ++i) w[i] = S::load(W + f * ldw + c0 + i * L);
        for (int64_t e = off[f], e1 = off[f + 1]; e < e1; ++e) {
          if (e + kPfEnt < E) {
            const char* q = reinterpret_cast<const char*>(acc + int64_t(srow[e + kPfEnt]) * CB);
            for (int l = 0; l < kALines; ++l) __builtin_prefetch(q + 64 * l, 1, 3);
          }
          A* o = acc + int64_t(srow[e]) * CB;
          const typename S::V v = S::set1(sval[e]);
          for (int i = 0; i < NV; ++i) SA::store(o + i * L, S::fma(v, w[i], SA::load(o + i * L)));
        }
      }
      for (int64_t n = 0; n < R; ++n) {  // + bias, convert, store the block's columns
        const A* a = acc + n * CB;
        T* o = out + (r0 + n) * d + c0;
        for (int i = 0; i < NV; ++i) {
          typename S::V x = SA::load(a + i * L);
          if (bias) x = S::add(x, SA::load(bias + c0 + i * L));
          S::store(o + i * L, x);
        }
      }
    }
  });
  if (nb * CB < d) {  // remaining columns (d not a multiple of the block): gather them
    at::parallel_for(r0, r1, row_grain(k, d - nb * CB), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        fwd_row<T>(vals + n * k, idx + n * k, nullptr, k, W, ldw, nb * CB, d, bias, out + n * d);
    });
  }
}

template <typename T>
void decode_impl(const acc_t<T>* vals, const int64_t* idx, int64_t N, int64_t k, const T* W,
                 int64_t ldw, int64_t d_sae, int64_t d, const acc_t<T>* bias, T* out) {
  if (k > 0 && use_scatter<T>(N, k, d_sae, d)) {
    FeatureSort& fs = thread_sort_scratch();
    const int64_t R = scatter_chunk_rows<T>();
    for (int64_t r0 = 0; r0 < N; r0 += R)
      decode_scatter_chunk<T>(vals, idx, r0, std::min(N, r0 + R), k, W, ldw, d_sae, d, bias, out, fs);
    trim_sort_scratch(fs);
    return;
  }
  decode_gather<T>(vals, idx, N, k, W, ldw, d, bias, out);
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

// Scatter path (same structure as the forward's, see use_scatter): per column block, the
// chunk's grad_out block is packed into an L2-resident buffer, W_dec's block is streamed once
// in feature order and each entry's partial dot product is accumulated per thread.
template <typename T>
void backward_values_scatter_chunk(const T* G, const int64_t* idx, int64_t r0, int64_t r1,
                                   int64_t k, const T* W, int64_t ldw, int64_t d_sae, int64_t d,
                                   acc_t<T>* res, FeatureSort& fs) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr int NV = kNV<T>, L = S::L;
  constexpr int64_t CB = kTile<T>;
  constexpr int kWLines = int(CB * sizeof(T) + 63) / 64, kALines = int(CB * sizeof(A) + 63) / 64;
  constexpr int64_t kPfFeat = 8, kPfEnt = 4;
  const int64_t R = r1 - r0;
  sort_by_feature<A>(idx, nullptr, r0, r1, k, d_sae, /*want_used=*/true, /*want_pos=*/true, fs);
  const int64_t* off = fs.offsets.data();
  const int32_t* srow = fs.srow.data();
  const int64_t* used = fs.used.data();
  const int64_t U = int64_t(fs.used.size()), E = int64_t(fs.srow.size());
  const int64_t nb = d / CB;
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
  std::vector<A>& part = fs.sval<A>();  // [thread][entry] partial dot products
  part.assign(nthr * E, A(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    A* gblk = thread_scratch<A>(R * CB);
    A* mine = part.data() + std::min<int64_t>(at::get_thread_num(), nthr - 1) * E;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * CB;
      for (int64_t n = 0; n < R; ++n) {  // pack (and convert) the chunk's grad_out block
        const T* g = G + (r0 + n) * d + c0;
        for (int i = 0; i < NV; ++i) SA::store(gblk + n * CB + i * L, S::load(g + i * L));
      }
      for (int64_t u = 0; u < U; ++u) {
        if (u + kPfFeat < U) {
          const char* q = reinterpret_cast<const char*>(W + used[u + kPfFeat] * ldw + c0);
          for (int l = 0; l < kWLines; ++l) prefetch(q + 64 * l);
        }
        const int64_t f = used[u];
        typename S::V w[NV];
        for (int i = 0; i < NV; ++i) w[i] = S::load(W + f * ldw + c0 + i * L);
        for (int64_t e = off[f], e1 = off[f + 1]; e < e1; ++e) {
          if (e + kPfEnt < E) {
            const char* q = reinterpret_cast<const char*>(gblk + int64_t(srow[e + kPfEnt]) * CB);
            for (int l = 0; l < kALines; ++l) prefetch(q + 64 * l);
          }
          const A* g = gblk + int64_t(srow[e]) * CB;
          typename S::V s0 = S::zero(), s1 = S::zero();  // two chains
          for (int i = 0; i < NV; i += 2) {
            s0 = S::fma(SA::load(g + i * L), w[i], s0);
            if (i + 1 < NV) s1 = S::fma(SA::load(g + (i + 1) * L), w[i + 1], s1);
          }
          mine[e] += S::hsum(S::add(s0, s1));
        }
      }
    }
  });
  const int64_t tail = nb * CB;  // columns past the last full block: plain dot products
  at::parallel_for(0, E, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      A s = 0;
      for (int64_t t = 0; t < nthr; ++t) s += part[t * E + e];
      const int64_t p = fs.spos[e];
      const T* g = G + (r0 + int64_t(srow[e])) * d;
      const T* w = W + idx[p] * ldw;
      for (int64_t c = tail; c < d; ++c) s += static_cast<A>(g[c]) * static_cast<A>(w[c]);
      res[p] = s;
    }
  });
}

template <typename T>
void backward_values_impl(const T* G, const int64_t* idx, int64_t N, int64_t k, const T* W,
                          int64_t ldw, int64_t d_sae, int64_t d, acc_t<T>* res) {
  using A = acc_t<T>;
  if (use_scatter<T>(N, k, d_sae, d)) {
    FeatureSort& fs = thread_sort_scratch();
    const int64_t R = scatter_chunk_rows<T>();
    for (int64_t r0 = 0; r0 < N; r0 += R)
      backward_values_scatter_chunk<T>(G, idx, r0, std::min(N, r0 + R), k, W, ldw, d_sae, d, res, fs);
    trim_sort_scratch(fs);
    return;
  }
  at::parallel_for(0, N, row_grain(k, d), [&](int64_t r0, int64_t r1) {
    std::vector<A> gbuf(std::is_same_v<T, A> ? 0 : d);  // grad row converted once per row
    for (int64_t n = r0; n < r1; ++n) {
      const A* g;
      if constexpr (std::is_same_v<T, A>) {
        g = G + n * d;
      } else {
        for (int64_t c = 0; c < d; ++c) gbuf[c] = static_cast<A>(G[n * d + c]);
        g = gbuf.data();
      }
      const int64_t* ix = idx + n * k;
      for (int64_t j = 0; j < k; ++j) {
        if (n + 1 < r1) prefetch(W + ix[k + j] * ldw);  // next row, same slot
        res[n * k + j] = dot<T>(g, W + ix[j] * ldw, d);
      }
    }
  });
}

// ---- backward: weight ----------------------------------------------------------------------
// grad_W[f, c:c+NV*L] = sum over the feature's segment of sval[e] * G[srow[e], c:...].
template <typename T, int NV>
inline void wgrad_tile(const acc_t<T>* sval, const int32_t* srow, int64_t e0, int64_t e1,
                       const T* G, int64_t d, int64_t c, T* out) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::V acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = S::zero();
  for (int64_t e = e0; e < e1; ++e) {
    const T* r = G + int64_t(srow[e]) * d + c;
    const typename S::V v = S::set1(sval[e]);
    for (int i = 0; i < NV; ++i) acc[i] = S::fma(v, S::load(r + i * L), acc[i]);
  }
  for (int i = 0; i < NV; ++i) S::store(out + c + i * L, acc[i]);
}

template <typename T>
void backward_weight_impl(const T* G, const acc_t<T>* vals, const int64_t* idx, int64_t N,
                          int64_t k, int64_t d_sae, int64_t d, T* out) {
  using A = acc_t<T>;
  // 1) Entries sorted by feature (stable: deterministic reduction order).
  FeatureSort& fs = thread_sort_scratch();
  sort_by_feature<A>(idx, vals, 0, N, k, d_sae, /*want_used=*/false, /*want_pos=*/false, fs);
  const std::vector<int64_t>& offsets = fs.offsets;
  const std::vector<int32_t>& srow = fs.srow;
  const std::vector<A>& sval = fs.sval<A>();
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
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
        for (int64_t e = e0; e < e1; ++e) s += sval[e] * static_cast<A>(G[int64_t(srow[e]) * d + c]);
        o[c] = static_cast<T>(s);
      }
    }
  });
  trim_sort_scratch(fs);
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
  at::Tensor out = empty_output({N, d}, W_dec.options());
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
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), fn, ": at most 2^31-1 rows, got ", N);
  at::Tensor idx = checked_indices(fn, indices, d_sae);
  const at::ScalarType acc = acc_scalar(grad_out.scalar_type());
  at::Tensor vals = values.to(acc).contiguous();
  at::Tensor G = grad_out.contiguous();
  at::Tensor out = empty_output({d_sae, d}, grad_out.options());
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
