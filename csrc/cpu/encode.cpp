// Fused SAE encoders: pre = (x - b_dec) @ W_enc + b_enc, reduced to a sparse code (running top-k,
// or threshold lists) without ever materialising the [N, d_sae] pre-activations.
//
// Tiling: each worker takes a chunk of rows (handed out dynamically), centres/upcasts those rows
// of x once, then walks d_sae in column blocks; per block it runs single-threaded GEMMs
// (at::mm_out -> MKL) of `sub` rows into a small reused tile and immediately scans the tile while
// it is cache-hot, adding b_enc inside the scan (no separate bias pass). No barrier separates
// GEMM and scan, and the tiles are a few MiB per worker. Measured on the 2-core target against one
// multi-threaded GEMM per tile followed by a parallel scan, this layout was at least as fast
// (within noise) from N = 16 rows up and needs several times less scratch memory; the
// multi-threaded form is kept only for tiny batches, where per-worker chunks would be too thin.
// bf16/fp16 inputs are upcast per block (x rows / W columns) into fp32 buffers before the GEMM.
// The scans and the centring of x are compiled once per instruction set (foreach_isa.h); the rest,
// GEMMs (MKL) and the final sort included, is compiled once.
#ifndef SK_ISA
#include "kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace sparsekern {
namespace {

// Tile shape. 2048 columns keep each GEMM call large enough for MKL to run near peak, while a
// worker's tile (kSubRows x kColBlock fp32 = 2 MiB) stays in L2/L3 between GEMM and scan.
constexpr int64_t kColBlock = 2048;
constexpr int64_t kSubRows = 256;        // rows per GEMM call in a worker
constexpr int64_t kChunkRows = 512;      // rows per worker chunk: W is streamed once per chunk
constexpr int64_t kMinWorkerRows = 16;   // fewer rows per worker -> one multi-threaded GEMM
constexpr int64_t kXBufBytes = 4 << 20;  // cap on a worker's centred x chunk (large d_in)
constexpr int64_t kWBufBytes = 4 << 20;  // cap on a worker's upcast W block (bf16/fp16)

template <typename acc_t>
struct Cand {
  acc_t v;
  int32_t i;
};

// Total order (value desc, index asc). NaN ranks above every number, as in
// torch.sort(descending=True); keeping this a strict weak order keeps nth_element in bounds.
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  const bool an = std::isnan(a.v), bn = std::isnan(b.v);
  if (an || bn) return an && (!bn || a.i < b.i);
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// Keep the k best of buf[0, cnt) in buf[0, k); returns the k-th best value, the new admission
// threshold (a later candidate equal to it has a higher index and so loses).
template <typename acc_t>
inline acc_t prune(Cand<acc_t>* buf, int32_t cnt, int32_t k) {
  std::nth_element(buf, buf + (k - 1), buf + cnt, better<acc_t>);
  return buf[k - 1].v;
}

// Running top-k of one row: a candidate buffer of capacity cap > k and the admission threshold.
template <typename acc_t>
struct TopKRow {
  Cand<acc_t>* buf;
  int32_t cnt;
  acc_t thr;
  int32_t k, cap;

  // !(v <= thr) rather than v > thr so NaN (which ranks highest) is admitted too.
  inline void push(acc_t v, int32_t i) {
    if (!(v <= thr)) {
      buf[cnt++] = {v, i};
      if (cnt == cap) {
        thr = prune(buf, cnt, k);
        cnt = k;
      }
    }
  }
};

}  // namespace

// Scans of one tile row (below, per ISA): p = GEMM output, b = b_enc, th = threshold, each offset to
// column j0; len columns. scan_topk feeds the row's running top-k, scan_threshold appends every
// feature with p + b > th (ascending index). center_rows: out = x - b_dec (or x) in the acc dtype.
SK_PER_ISA(template <typename acc_t> void scan_topk(const acc_t* p, const acc_t* b, int64_t len, int32_t j0,
                                                    TopKRow<acc_t>& st))
SK_PER_ISA(template <typename acc_t> void scan_threshold(const acc_t* p, const acc_t* b, const acc_t* th,
                                                         int64_t len, int32_t j0,
                                                         std::vector<Cand<acc_t>>& out))
SK_PER_ISA(template <typename scalar_t> void center_rows(const scalar_t* x,
                                                         const at::opmath_type<scalar_t>* bd, int64_t rows,
                                                         int64_t d, at::opmath_type<scalar_t>* out))

namespace {

// Shared inputs of both encoders, already validated; b_enc / b_dec upcast to acc_t.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor x;    // [N, d_in] contiguous, input dtype
  at::Tensor W;    // [d_in, d_sae] any strides, input dtype
  at::Tensor benc; // [d_sae] acc_t contiguous
  at::Tensor bdec; // [d_in] acc_t contiguous, or undefined
  int64_t N, d_in, d_sae, col_block, chunk_rows;
  at::ScalarType acc_type;
  bool x_direct;  // x already in acc dtype and nothing to subtract: GEMM reads it in place
  bool w_direct;  // W already in acc dtype: GEMM reads the strided column block in place
};

// Per-worker scratch, reused across tiles.
struct Scratch {
  at::Tensor xbuf, wbuf, tile;
};

template <typename scalar_t>
Scratch make_scratch(const Problem<scalar_t>& P, int64_t rows, int64_t sub) {
  auto opt = at::TensorOptions().dtype(P.acc_type);
  Scratch s;
  if (!P.x_direct) s.xbuf = at::empty({rows, P.d_in}, opt);
  if (!P.w_direct) s.wbuf = at::empty({P.d_in * P.col_block}, opt);
  s.tile = at::empty({sub * P.col_block}, opt);
  return s;
}

// (x[r0 : r0+rows] - b_dec) in acc dtype, as a [rows, d_in] contiguous tensor.
template <typename scalar_t>
at::Tensor centered_rows(const Problem<scalar_t>& P, Scratch& s, int64_t r0, int64_t rows) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  if (P.x_direct) return P.x.narrow(0, r0, rows);
  at::Tensor xr = s.xbuf.narrow(0, 0, rows);
  const scalar_t* xp = P.x.template data_ptr<scalar_t>() + r0 * P.d_in;
  acc_t* out = xr.template data_ptr<acc_t>();
  const acc_t* bd = P.bdec.defined() ? P.bdec.template data_ptr<acc_t>() : nullptr;
  const int64_t d = P.d_in;
  const auto center = SK_ISA_FN(center_rows<scalar_t>);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)),
                   [&](int64_t a, int64_t e) { center(xp + a * d, bd, e - a, d, out + a * d); });
  return xr;
}

// W[:, j0 : j0+cols] in acc dtype: the strided view itself (MKL takes the leading dimension or a
// transposed layout), or an upcast copy into the worker's buffer for bf16/fp16.
template <typename scalar_t>
at::Tensor weight_block(const Problem<scalar_t>& P, Scratch& s, int64_t j0, int64_t cols) {
  at::Tensor wc = P.W.narrow(1, j0, cols);
  if (P.w_direct) return wc;
  at::Tensor wb = s.wbuf.narrow(0, 0, P.d_in * cols).view({P.d_in, cols});
  wb.copy_(wc);
  return wb;
}

// Drives the tiling for both encoders:
//   st = begin(r0, rows)                      per row chunk, its running state
//   scan(st, r, tile_row, j0, cols)           row r of the chunk, pre[j0 : j0+cols] - b_enc
//   end(st, r0, rows)                         after the chunk's last column block
// Column blocks are visited in increasing order, so each row sees its features in index order.
template <typename scalar_t, typename Begin, typename Scan, typename End>
void run_tiles(const Problem<scalar_t>& P, const Begin& begin, const Scan& scan, const End& end) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  if (P.N == 0) return;
  // Chunk of `rows` rows: centre x once, then per column block (upcast once) GEMM `sub` rows at a
  // time so the tile stays small and cache-resident between the GEMM and the scan.
  auto process = [&](int64_t r0, int64_t rows, int64_t sub, Scratch& s) {
    auto st = begin(r0, rows);
    const at::Tensor xr = centered_rows(P, s, r0, rows);
    for (int64_t j0 = 0; j0 < P.d_sae; j0 += P.col_block) {
      const int64_t cols = std::min(P.col_block, P.d_sae - j0);
      const at::Tensor wc = weight_block(P, s, j0, cols);
      for (int64_t s0 = 0; s0 < rows; s0 += sub) {
        const int64_t m = std::min(sub, rows - s0);
        at::Tensor t = s.tile.narrow(0, 0, m * cols).view({m, cols});
        at::mm_out(t, xr.narrow(0, s0, m), wc);
        const acc_t* tile = t.template data_ptr<acc_t>();
        // Runs inline when we are already inside a per-worker parallel region.
        at::parallel_for(0, m, 8, [&](int64_t a, int64_t e) {
          for (int64_t r = a; r < e; ++r) scan(st, s0 + r, tile + r * cols, j0, cols);
        });
      }
    }
    end(st, r0, rows);
  };

  const int64_t nt = at::get_num_threads();
  if (nt > 1 && P.N < nt * kMinWorkerRows) {
    // Tiny batch: one chunk, multi-threaded GEMM per tile, rows scanned in parallel.
    Scratch s = make_scratch(P, P.N, P.N);
    process(0, P.N, P.N, s);
    return;
  }
  // Chunks are handed out dynamically so a worker that gets descheduled (shared machine) does not
  // hold up the others; nested at::parallel_for / MKL calls inside a worker run single-threaded.
  const int64_t chunk = std::min(P.chunk_rows, at::divup(P.N, nt));
  const int64_t sub = std::min(kSubRows, chunk);
  const int64_t nchunks = at::divup(P.N, chunk);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nt, nchunks), 1, [&](int64_t, int64_t) {
    Scratch s = make_scratch(P, chunk, sub);
    for (int64_t c; (c = next.fetch_add(1)) < nchunks;) {
      const int64_t r0 = c * chunk;
      process(r0, std::min(chunk, P.N - r0), sub, s);
    }
  });
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& x, const at::Tensor& W_enc,
                               const at::Tensor& b_enc, const std::optional<at::Tensor>& b_dec) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  Problem<scalar_t> P;
  P.acc_type = c10::CppTypeToScalarType<typename Problem<scalar_t>::acc_t>::value;
  P.x = x.contiguous();
  P.W = W_enc;
  P.N = x.size(0);
  P.d_in = x.size(1);
  P.d_sae = W_enc.size(1);
  const int64_t row_bytes = std::max<int64_t>(1, P.d_in) * int64_t(sizeof(acc_t));
  // Upcast W blocks are d_in x col_block; keep them <= kWBufBytes unless that would make the
  // GEMMs too narrow. fp32/fp64 W is read in place, so its blocks cost no memory.
  int64_t cb = kColBlock;
  if (W_enc.scalar_type() != P.acc_type)
    cb = std::clamp<int64_t>(kWBufBytes / row_bytes / 256 * 256, 256, kColBlock);
  P.col_block = std::max<int64_t>(1, std::min(cb, P.d_sae));
  P.chunk_rows = std::clamp<int64_t>(kXBufBytes / row_bytes, kSubRows, kChunkRows);
  P.benc = b_enc.to(P.acc_type).contiguous();
  if (b_dec.has_value() && b_dec->defined()) P.bdec = b_dec->to(P.acc_type).contiguous();
  P.x_direct = x.scalar_type() == P.acc_type && !P.bdec.defined();
  P.w_direct = W_enc.scalar_type() == P.acc_type;
  return P;
}

template <typename scalar_t>
void topk_impl(const Problem<scalar_t>& P, int64_t k, bool relu, at::Tensor& values,
               at::Tensor& indices) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  // Room for k survivors plus a batch of newcomers; pruning costs O(cap), so a batch >= k
  // amortises it to O(1) per admitted candidate.
  const int64_t cap = k + std::min<int64_t>(std::max<int64_t>(k, 32), 4096);
  scalar_t* vout = values.data_ptr<scalar_t>();
  int64_t* iout = indices.data_ptr<int64_t>();
  const acc_t* benc = P.benc.template data_ptr<acc_t>();

  struct Chunk {
    std::vector<Cand<acc_t>> cand;
    std::vector<TopKRow<acc_t>> rows;
  };
  auto begin = [&](int64_t, int64_t rows) {
    Chunk c{std::vector<Cand<acc_t>>(rows * cap), std::vector<TopKRow<acc_t>>(rows)};
    for (int64_t r = 0; r < rows; ++r)
      c.rows[r] = {c.cand.data() + r * cap, 0, -std::numeric_limits<acc_t>::infinity(),
                   int32_t(k), int32_t(cap)};
    return c;
  };
  const auto scan_row = SK_ISA_FN(scan_topk<acc_t>);
  auto scan = [&](Chunk& c, int64_t r, const acc_t* tile_row, int64_t j0, int64_t cols) {
    scan_row(tile_row, benc + j0, cols, int32_t(j0), c.rows[r]);
  };
  auto end = [&](Chunk& c, int64_t r0, int64_t rows) {
    at::parallel_for(0, rows, 8, [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) {
        TopKRow<acc_t>& st = c.rows[r];
        if (st.cnt > k) prune(st.buf, st.cnt, int32_t(k));
        std::sort(st.buf, st.buf + k, better<acc_t>);
        scalar_t* vo = vout + (r0 + r) * k;
        int64_t* io = iout + (r0 + r) * k;
        for (int64_t q = 0; q < k; ++q) {
          const acc_t v = st.buf[q].v;
          vo[q] = scalar_t(relu && v < acc_t(0) ? acc_t(0) : v);
          io[q] = st.buf[q].i;
        }
      }
    });
  };
  run_tiles(P, begin, scan, end);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_impl(const Problem<scalar_t>& P,
                                                              const at::Tensor& threshold) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const acc_t* benc = P.benc.template data_ptr<acc_t>();
  const acc_t* thr = threshold.data_ptr<acc_t>();
  // Per-row (value, index) lists, filled in ascending feature order since column blocks are
  // visited left to right; the output is written once K = max L0 is known.
  std::vector<std::vector<Cand<acc_t>>> lists(P.N);
  const auto scan_row = SK_ISA_FN(scan_threshold<acc_t>);

  run_tiles(
      P, [](int64_t r0, int64_t) { return r0; },
      [&](int64_t r0, int64_t r, const acc_t* tile_row, int64_t j0, int64_t cols) {
        scan_row(tile_row, benc + j0, thr + j0, cols, int32_t(j0), lists[r0 + r]);
      },
      [](int64_t, int64_t, int64_t) {});

  at::Tensor l0 = at::empty({P.N}, at::TensorOptions().dtype(at::kLong));
  int64_t* l0p = l0.data_ptr<int64_t>();
  int64_t K = 0;
  for (int64_t r = 0; r < P.N; ++r) {
    l0p[r] = int64_t(lists[r].size());
    K = std::max(K, l0p[r]);
  }
  at::Tensor values = at::zeros({P.N, K}, P.x.options());
  at::Tensor indices = at::zeros({P.N, K}, at::TensorOptions().dtype(at::kLong));
  if (K > 0) {
    scalar_t* vo = values.data_ptr<scalar_t>();
    int64_t* io = indices.data_ptr<int64_t>();
    at::parallel_for(0, P.N, 64, [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) {
        const auto& L = lists[r];
        for (size_t q = 0; q < L.size(); ++q) {
          vo[r * K + q] = scalar_t(L[q].v);
          io[r * K + q] = L[q].i;
        }
      }
    });
  }
  return {values, indices, l0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc,
                                                   const std::optional<at::Tensor>& b_dec,
                                                   int64_t k, bool relu) {
  check_encoder_args("topk_encode_cpu", x, W_enc, b_enc, b_dec);
  TORCH_CHECK(k >= 1 && k <= W_enc.size(1), "topk_encode_cpu: k must be in [1, d_sae=",
              W_enc.size(1), "], got ", k);
  const int64_t N = x.size(0);
  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, at::TensorOptions().dtype(at::kLong));
  if (N == 0) return {values, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_cpu", [&] {
    const auto P = make_problem<scalar_t>(x, W_enc, b_enc, b_dec);
    topk_impl<scalar_t>(P, k, relu, values, indices);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const at::Tensor& threshold, const std::optional<at::Tensor>& b_dec) {
  check_encoder_args("threshold_encode_cpu", x, W_enc, b_enc, b_dec);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == W_enc.size(1),
              "threshold_encode_cpu: threshold must be [", W_enc.size(1), "], got ",
              threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == acc, "threshold_encode_cpu: threshold must be ", acc,
              ", got ", threshold.scalar_type());
  TORCH_CHECK(threshold.device().is_cpu(), "threshold_encode_cpu: CPU tensors expected");
  const at::Tensor thr = threshold.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "threshold_encode_cpu",
                                  [&] {
                                    const auto P = make_problem<scalar_t>(x, W_enc, b_enc, b_dec);
                                    out = threshold_impl<scalar_t>(P, thr);
                                  });
  return out;
}

}  // namespace sparsekern

#define SK_ISA_FILE "encode.cpp"
#include "foreach_isa.h"

#else  // ---- per-ISA scans --------------------------------------------------------------------------
SK_ISA_BEGIN
using simd::SK_ISA_SIMD::Simd;

template <typename acc_t>
void scan_topk(const acc_t* p, const acc_t* b, int64_t len, int32_t j0, TopKRow<acc_t>& st) {
  using S = Simd<acc_t>;
  constexpr int L = S::L;
  int64_t j = 0;
  if (st.cnt < st.k) {  // first k features of the row: admitted unconditionally
    for (; j < len && st.cnt < st.k; ++j) st.buf[st.cnt++] = {p[j] + b[j], int32_t(j0 + j)};
    if (st.cnt < st.k) return;
    st.thr = prune(st.buf, st.cnt, st.k);
  }
  if constexpr (L > 1) {
    // two vectors a step; one mask test, then the lanes above the threshold in index order
    typename S::V t = S::set1(st.thr);
    for (; j + 2 * L <= len; j += 2 * L) {
      const typename S::V v0 = S::add(S::load(p + j), S::load(b + j));
      const typename S::V v1 = S::add(S::load(p + j + L), S::load(b + j + L));
      unsigned m = S::mask_nle(v0, t) | (S::mask_nle(v1, t) << L);  // !(v <= thr): NaN admitted
      if (m) {
        alignas(64) acc_t tmp[2 * L];
        S::store(tmp, v0);
        S::store(tmp + L, v1);
        do {
          const int q = __builtin_ctz(m);
          m &= m - 1;
          st.push(tmp[q], int32_t(j0 + j + q));
        } while (m);
        t = S::set1(st.thr);
      }
    }
  } else {
    // Portable path: branch-free "anything here?" test over 16 lanes, which gcc vectorises.
    for (; j + 16 <= len; j += 16) {
      const acc_t thr = st.thr;
      int any = 0;
      for (int q = 0; q < 16; ++q) any |= !(p[j + q] + b[j + q] <= thr);
      if (any)
        for (int q = 0; q < 16; ++q) st.push(p[j + q] + b[j + q], int32_t(j0 + j + q));
    }
  }
  for (; j < len; ++j) st.push(p[j] + b[j], int32_t(j0 + j));
}

template <typename acc_t>
void scan_threshold(const acc_t* p, const acc_t* b, const acc_t* th, int64_t len, int32_t j0,
                    std::vector<Cand<acc_t>>& out) {
  using S = Simd<acc_t>;
  constexpr int L = S::L;
  int64_t j = 0;
  if constexpr (L > 1) {
    for (; j + 2 * L <= len; j += 2 * L) {
      const typename S::V v0 = S::add(S::load(p + j), S::load(b + j));
      const typename S::V v1 = S::add(S::load(p + j + L), S::load(b + j + L));
      unsigned m = S::mask_gt(v0, S::load(th + j)) | (S::mask_gt(v1, S::load(th + j + L)) << L);
      if (m) {
        alignas(64) acc_t tmp[2 * L];
        S::store(tmp, v0);
        S::store(tmp + L, v1);
        do {
          const int q = __builtin_ctz(m);
          m &= m - 1;
          out.push_back({tmp[q], int32_t(j0 + j + q)});
        } while (m);
      }
    }
  } else {
    for (; j + 16 <= len; j += 16) {
      int any = 0;
      for (int q = 0; q < 16; ++q) any |= (p[j + q] + b[j + q] > th[j + q]);
      if (any)
        for (int q = 0; q < 16; ++q) {
          const acc_t v = p[j + q] + b[j + q];
          if (v > th[j + q]) out.push_back({v, int32_t(j0 + j + q)});
        }
    }
  }
  for (; j < len; ++j) {
    const acc_t v = p[j] + b[j];
    if (v > th[j]) out.push_back({v, int32_t(j0 + j)});
  }
}

template <typename scalar_t>
void center_rows(const scalar_t* x, const at::opmath_type<scalar_t>* bd, int64_t rows, int64_t d,
                 at::opmath_type<scalar_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xi = x + r * d;
    acc_t* o = out + r * d;
    if (bd) {
      for (int64_t c = 0; c < d; ++c) o[c] = acc_t(xi[c]) - bd[c];
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = acc_t(xi[c]);
    }
  }
}

SK_ISA_END
#endif
