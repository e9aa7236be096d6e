// Symmetric top-k of a Gram matrix: for every row i of W [n, d], the k largest G[i, j] = <W[i], W[j]>
// over j != i (or the k largest |G[i, j]|), never building the [n, n] matrix
// (contract: kernels.h, semantics and state: sparsekern/ops/gram_topk.py).
//
// Why a kernel of its own: G is symmetric, so each tile W[I] @ W[J]^T (one single-threaded MKL GEMM)
// serves the rows of I (read along tile rows) and the rows of J (read along tile columns) in one scan.
// That halves the GEMM work of the row-by-row top-k encoder, which is what bounds it on CPU.
//
// Scheduling: a tile updates the running top-k of two row blocks, so two tiles that share a block must
// not run at once. Blocks are paired by the circle method (round-robin tournament): every round is a
// set of disjoint block pairs, so its tiles run in parallel without locks and the rounds run in
// sequence. Round 0 pairs each block with itself (the upper triangle of the diagonal tile).
//
// Running top-k per row: up to `cap` candidates in the state row, admitted when they beat the row's
// k-th best so far (key desc, index asc); a full row is pruned to k with nth_element. Rows see their
// columns in no particular order, so an equal key is admitted when its index is lower than the k-th's.
// The tile scan is compiled once per instruction set (foreach_isa.h); the rest once.
#ifndef SK_ISA
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace sparsekern {
namespace {

template <typename T>
struct Rows {
  T* val;          // [n, cap] signed values
  int64_t* idx;    // [n, cap] column indices, -1 = empty slot
  int64_t cap, k;
  bool absolute;
  std::vector<int32_t> cnt;  // filled slots (a prefix of the row during a call)
  std::vector<T> thr;        // key of the row's k-th best (-inf until it has k)
  std::vector<int64_t> thr_i;

  inline T key(T v) const { return absolute ? std::abs(v) : v; }

  // Keep the k best of row r's slots in [0, k); set its admission bound to the k-th.
  void prune(int64_t r) {
    T* v = val + r * cap;
    int64_t* ix = idx + r * cap;
    const int32_t c = cnt[r];
    std::vector<int32_t> order(c);
    std::iota(order.begin(), order.end(), 0);
    auto better = [&](int32_t a, int32_t b) {
      const T ka = key(v[a]), kb = key(v[b]);
      return ka > kb || (ka == kb && ix[a] < ix[b]);
    };
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
    std::vector<std::pair<T, int64_t>> kept(k);
    for (int64_t s = 0; s < k; ++s) kept[s] = {v[order[s]], ix[order[s]]};
    for (int64_t s = 0; s < k; ++s) std::tie(v[s], ix[s]) = kept[s];
    cnt[r] = int32_t(k);
    thr[r] = key(v[k - 1]);
    thr_i[r] = ix[k - 1];
  }

  // Offer column j with value g to row r (the prefilter `key >= thr[r]` has passed).
  inline void offer(int64_t r, T g, int64_t j) {
    const T kg = key(g);
    if (kg == thr[r] && j > thr_i[r]) return;
    T* v = val + r * cap;
    v[cnt[r]] = g;
    idx[r * cap + cnt[r]] = j;
    if (++cnt[r] == cap) prune(r);
  }
};

}  // namespace

// Scans the [bi, bj] tile t = W[i0:i0+bi] @ W[j0:j0+bj]^T into S's rows (both directions; a diagonal
// tile, i0 == j0, only its strict upper triangle). Per ISA, below.
SK_PER_ISA(template <typename T> void gram_scan_tile(Rows<T>& S, const T* t, int64_t i0, int64_t j0,
                                                     int64_t bi, int64_t bj))

namespace {

// Disjoint block pairs of round r (see the file comment); blocks >= nb (the odd dummy) are skipped.
void round_pairs(int64_t nb, int64_t r, std::vector<std::pair<int64_t, int64_t>>& out) {
  out.clear();
  if (r == 0) {
    for (int64_t b = 0; b < nb; ++b) out.emplace_back(b, b);
    return;
  }
  const int64_t m = nb + (nb & 1), q = r - 1;
  auto add = [&](int64_t a, int64_t b) {
    if (a < nb && b < nb) out.emplace_back(a, b);
  };
  add(m - 1, q);
  for (int64_t t = 1; t < m / 2; ++t) add((q + t) % (m - 1), (q - t + (m - 1)) % (m - 1));
}

template <typename T>
void gram_impl(const at::Tensor& W, at::Tensor& values, at::Tensor& indices, int64_t k, bool absolute,
               int64_t block, int64_t r_begin, int64_t r_end) {
  const int64_t n = W.size(0), cap = values.size(1);
  Rows<T> S{values.data_ptr<T>(), indices.data_ptr<int64_t>(), cap, k, absolute, {}, {}, {}};
  S.cnt.assign(n, 0);
  S.thr.assign(n, -std::numeric_limits<T>::infinity());
  S.thr_i.assign(n, std::numeric_limits<int64_t>::max());
  // compact each row's filled slots to a prefix and restore its bound
  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      T* v = S.val + r * cap;
      int64_t* ix = S.idx + r * cap;
      int32_t c = 0;
      for (int64_t s = 0; s < cap; ++s)
        if (ix[s] >= 0) {
          v[c] = v[s];
          ix[c++] = ix[s];
        }
      S.cnt[r] = c;
      if (c >= k) S.prune(r);
    }
  });

  const int64_t nb = at::divup(n, block);
  const auto scan_tile = SK_ISA_FN(gram_scan_tile<T>);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t r = r_begin; r < r_end; ++r) {
    round_pairs(nb, r, pairs);
    const int64_t np = int64_t(pairs.size());
    // tiles handed out dynamically: a worker that gets descheduled (shared machine) does not hold the
    // round's barrier for the others
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), np), 1, [&](int64_t, int64_t) {
      const int64_t side = std::min(block, n);  // a block larger than n is one tile of n rows
      at::Tensor tile = at::empty({side, side}, W.options());
      for (int64_t p; (p = next.fetch_add(1)) < np;) {
        const int64_t i0 = pairs[p].first * block, j0 = pairs[p].second * block;
        const int64_t bi = std::min(block, n - i0), bj = std::min(block, n - j0);
        at::Tensor t = tile.view({-1}).narrow(0, 0, bi * bj).view({bi, bj});
        // runs single-threaded inside a parallel region (as the encoders' per-worker GEMMs)
        at::mm_out(t, W.narrow(0, i0, bi), W.narrow(0, j0, bj).t());
        scan_tile(S, t.data_ptr<T>(), i0, j0, bi, bj);
      }
    });
  }

  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r)
      for (int64_t s = S.cnt[r]; s < cap; ++s) {
        S.val[r * cap + s] = T(0);
        S.idx[r * cap + s] = -1;
      }
  });
}

}  // namespace

int64_t gram_topk_rounds(int64_t n, int64_t block) {
  TORCH_CHECK(n >= 1 && block >= 1, "gram_topk_rounds: n and block must be >= 1, got ", n, ", ", block);
  const int64_t nb = at::divup(n, block);
  return nb + (nb & 1);  // round 0 (diagonal tiles) + m - 1 tournament rounds
}

void gram_topk_update_cpu(const at::Tensor& W, const at::Tensor& values, const at::Tensor& indices,
                          int64_t k, bool absolute, int64_t block, int64_t round_begin,
                          int64_t round_end) {
  TORCH_CHECK(W.dim() == 2 && W.device().is_cpu(), "gram_topk_update: W must be a 2-D CPU tensor [n, d]");
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "gram_topk_update: W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(W.is_contiguous(), "gram_topk_update: W must be contiguous");
  const int64_t n = W.size(0);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "gram_topk_update: n too large");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == n && values.scalar_type() == W.scalar_type() &&
                  values.is_contiguous() && values.device().is_cpu(),
              "gram_topk_update: values must be a contiguous [n, cap] CPU tensor of W's dtype, got ",
              values.sizes(), " ", values.scalar_type());
  const int64_t cap = values.size(1);
  TORCH_CHECK(indices.sizes() == values.sizes() && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indices.device().is_cpu(),
              "gram_topk_update: indices must be a contiguous int64 [n, cap] CPU tensor");
  TORCH_CHECK(k >= 1 && k <= n - 1 && cap >= k + 1,
              "gram_topk_update: need 1 <= k <= n - 1 and cap > k; got k=", k, ", n=", n, ", cap=", cap);
  TORCH_CHECK(block >= 1, "gram_topk_update: block must be >= 1, got ", block);
  const int64_t rounds = gram_topk_rounds(n, block);
  TORCH_CHECK(0 <= round_begin && round_begin <= round_end && round_end <= rounds,
              "gram_topk_update: rounds [", round_begin, ", ", round_end, ") outside [0, ", rounds, ")");
  // indices are only compared, never dereferenced; still reject a state that is not ours
  const bool ok = indices.ge(-1).logical_and(indices.lt(n)).all().item<bool>();
  TORCH_CHECK(ok, "gram_topk_update: indices must lie in [-1, n)");
  at::Tensor v = values, ix = indices;
  if (W.scalar_type() == at::kFloat)
    gram_impl<float>(W, v, ix, k, absolute, block, round_begin, round_end);
  else
    gram_impl<double>(W, v, ix, k, absolute, block, round_begin, round_end);
}

}  // namespace sparsekern

#define SK_ISA_FILE "gram_topk.cpp"
#include "foreach_isa.h"

#else  // ---- per-ISA tile scan ----------------------------------------------------------------------
SK_ISA_BEGIN
namespace {

// Scan a tile row: columns [c0, c1) of `t` belong to rows j0 + c; the tile row is row i.
template <typename T>
inline void scan_row(Rows<T>& S, const T* t, int64_t i, int64_t j0, int64_t c0, int64_t c1) {
  constexpr int64_t kStrip = 16;
  const T* thr = S.thr.data();
  int64_t c = c0;
  for (; c + kStrip <= c1; c += kStrip) {
    // branch-free prefilter over a strip (vectorised by the compiler); almost every strip is skipped
    const T ti = thr[i];
    bool any = false;
    for (int64_t u = 0; u < kStrip; ++u) {
      const T kg = S.key(t[c + u]);
      any |= (kg >= ti) | (kg >= thr[j0 + c + u]);
    }
    if (!any) continue;
    for (int64_t u = 0; u < kStrip; ++u) {
      const T g = t[c + u], kg = S.key(g);
      if (kg >= thr[i]) S.offer(i, g, j0 + c + u);
      if (kg >= thr[j0 + c + u]) S.offer(j0 + c + u, g, i);
    }
  }
  for (; c < c1; ++c) {
    const T g = t[c], kg = S.key(g);
    if (kg >= thr[i]) S.offer(i, g, j0 + c);
    if (kg >= thr[j0 + c]) S.offer(j0 + c, g, i);
  }
}

}  // namespace

template <typename T>
void gram_scan_tile(Rows<T>& S, const T* t, int64_t i0, int64_t j0, int64_t bi, int64_t bj) {
  const bool diag = i0 == j0;
  // diagonal tile: the strict upper triangle only (each pair once, the row itself never)
  for (int64_t r = 0; r < bi; ++r) scan_row(S, t + r * bj, i0 + r, j0, diag ? r + 1 : 0, bj);
}

SK_ISA_END
#endif
