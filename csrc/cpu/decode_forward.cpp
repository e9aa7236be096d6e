// CPU sparse decode, forward (contract: kernels.h; work split: decode_plan.h):
// out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec). The kernels below the entry point are
// compiled once per instruction set (foreach_isa.h).
#ifndef SK_ISA
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "decode_plan.h"
#include "feature_sort.h"
#include "kernels.h"
#include "scratch.h"
#include "simd.h"

namespace sparsekern {

SK_PER_ISA(template <typename T> void decode_forward(const acc_t<T>* vals, const int64_t* idx, int64_t N,
                                                     int64_t k, const T* W, int64_t ldw, int64_t d_sae,
                                                     int64_t d, const acc_t<T>* bias, T* out))

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
    SK_ISA_FN(decode_forward<scalar_t>)(vals.const_data_ptr<A>(), idx.const_data_ptr<int64_t>(), N, k,
                                        W.const_data_ptr<scalar_t>(), W.stride(0), d_sae, d,
                                        bias.defined() ? bias.const_data_ptr<A>() : nullptr,
                                        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace sparsekern

#define SK_ISA_FILE "decode_forward.cpp"
#include "foreach_isa.h"

#else  // ---- per-ISA kernels ----------------------------------------------------------------------
SK_ISA_BEGIN
using simd::SK_ISA_SIMD::Simd;
namespace {

template <typename T>
constexpr int64_t kTileT = kTile<Simd<T>::L>;

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
  for (; c + kTileT<T> <= c1; c += kTileT<T>) fwd_tile<T, kNV>(vals, idx, pf_idx, k, W, ldw, c, bias, out);
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

// One row chunk of the scatter path (see use_scatter): per column block W_dec's block is streamed
// once in feature order and each entry is added into an L2-resident [rows x block] accumulator.
template <typename T>
void decode_scatter_chunk(const acc_t<T>* vals, const int64_t* idx, int64_t r0, int64_t r1,
                          int64_t k, const T* W, int64_t ldw, int64_t d_sae, int64_t d,
                          const acc_t<T>* bias, T* out, FeatureSort& fs) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr int NV = kNV, L = S::L;
  constexpr int64_t CB = kTileT<T>;
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

}  // namespace

template <typename T>
void decode_forward(const acc_t<T>* vals, const int64_t* idx, int64_t N, int64_t k, const T* W,
                    int64_t ldw, int64_t d_sae, int64_t d, const acc_t<T>* bias, T* out) {
  constexpr int L = Simd<T>::L;
  if (k > 0 && use_scatter<T, L>(N, k, d_sae, d)) {
    FeatureSort& fs = thread_sort_scratch();
    const int64_t R = scatter_chunk_rows<T, L>();
    for (int64_t r0 = 0; r0 < N; r0 += R)
      decode_scatter_chunk<T>(vals, idx, r0, std::min(N, r0 + R), k, W, ldw, d_sae, d, bias, out, fs);
    trim_sort_scratch(fs);
    return;
  }
  decode_gather<T>(vals, idx, N, k, W, ldw, d, bias, out);
}

SK_ISA_END
#endif
