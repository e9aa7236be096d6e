// CPU sparse decode, backward (contract: kernels.h; work split: decode_plan.h):
//   values: grad_values[n, j] = <grad_out[n], W_dec[indices[n, j]]>
//   weight: grad_W[f] = sum over the entries (n, j) of feature f of values[n, j] * grad_out[n], a
//           segmented reduction over the entries sorted by feature (no atomics, no N*k*d buffer).
// The kernels below the entry points are compiled once per instruction set (foreach_isa.h).
#ifndef SK_ISA
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "decode_plan.h"
#include "feature_sort.h"
#include "kernels.h"
#include "scratch.h"
#include "simd.h"

namespace sparsekern {

SK_PER_ISA(template <typename T> void decode_backward_values(const T* G, const int64_t* idx, int64_t N,
                                                             int64_t k, const T* W, int64_t ldw,
                                                             int64_t d_sae, int64_t d, acc_t<T>* res))
SK_PER_ISA(template <typename T> void decode_backward_weight(const T* G, const acc_t<T>* vals,
                                                             const int64_t* idx, int64_t N, int64_t k,
                                                             int64_t d_sae, int64_t d, T* out))

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
        SK_ISA_FN(decode_backward_values<scalar_t>)(G.const_data_ptr<scalar_t>(),
                                                    idx.const_data_ptr<int64_t>(), N, k,
                                                    W.const_data_ptr<scalar_t>(), W.stride(0), d_sae, d,
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
    SK_ISA_FN(decode_backward_weight<scalar_t>)(G.const_data_ptr<scalar_t>(), vals.const_data_ptr<A>(),
                                                idx.const_data_ptr<int64_t>(), N, k, d_sae, d,
                                                out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace sparsekern

#define SK_ISA_FILE "decode_backward.cpp"
#include "foreach_isa.h"

#else  // ---- per-ISA kernels ----------------------------------------------------------------------
SK_ISA_BEGIN
using simd::SK_ISA_SIMD::Simd;
namespace {

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

// Values-grad scatter path (same structure as the forward's, see use_scatter): per column block, the
// chunk's grad_out block is packed into an L2-resident buffer, W_dec's block is streamed once
// in feature order and each entry's partial dot product is accumulated per thread.
template <typename T>
void backward_values_scatter_chunk(const T* G, const int64_t* idx, int64_t r0, int64_t r1,
                                   int64_t k, const T* W, int64_t ldw, int64_t d_sae, int64_t d,
                                   acc_t<T>* res, FeatureSort& fs) {
  using A = acc_t<T>;
  using S = Simd<T>;
  using SA = Simd<A>;
  constexpr int NV = kNV, L = S::L;
  constexpr int64_t CB = kTile<L>;
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

}  // namespace

template <typename T>
void decode_backward_values(const T* G, const int64_t* idx, int64_t N, int64_t k, const T* W,
                            int64_t ldw, int64_t d_sae, int64_t d, acc_t<T>* res) {
  using A = acc_t<T>;
  constexpr int L = Simd<T>::L;
  if (use_scatter<T, L>(N, k, d_sae, d)) {
    FeatureSort& fs = thread_sort_scratch();
    const int64_t R = scatter_chunk_rows<T, L>();
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

template <typename T>
void decode_backward_weight(const T* G, const acc_t<T>* vals, const int64_t* idx, int64_t N,
                            int64_t k, int64_t d_sae, int64_t d, T* out) {
  using A = acc_t<T>;
  constexpr int L = Simd<T>::L;
  constexpr int64_t kT = kTile<L>;
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
      for (; c + kT <= d; c += kT) wgrad_tile<T, kNV>(sval.data(), srow.data(), e0, e1, G, d, c, o);
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

SK_ISA_END
#endif
