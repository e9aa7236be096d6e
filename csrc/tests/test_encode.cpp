// Unit test of topk_encode_cpu / threshold_encode_cpu against a naive dense computation
// (float64 pre-activations, stable descending sort). Plain main(): prints each failure and
// exits non-zero if any check failed.
#include <ATen/ATen.h>

#include <cstdio>
#include <optional>
#include <string>

#include "../cpu/kernels.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  const double scale = std::max(bd.abs().max().item<double>(), 1e-30);
  return (ad - bd).abs().max().item<double>() / scale;
}

at::Tensor dense_pre64(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
                       const std::optional<at::Tensor>& b_dec) {
  at::Tensor xc = x.to(at::kDouble);
  if (b_dec) xc = xc - b_dec->to(at::kDouble);
  return at::matmul(xc, W.to(at::kDouble)) + b.to(at::kDouble);
}

struct Problem {
  at::Tensor x, W, b;
  std::optional<at::Tensor> b_dec;
};

Problem make(int64_t n, int64_t d_in, int64_t d_sae, at::ScalarType dt, bool with_bdec) {
  auto o = at::TensorOptions().dtype(at::kDouble);
  Problem p;
  p.x = at::randn({n, d_in}, o).to(dt);
  p.W = (at::randn({d_in, d_sae}, o) / std::sqrt(double(std::max<int64_t>(d_in, 1)))).to(dt);
  p.b = (at::randn({d_sae}, o) * 0.1).to(dt);
  if (with_bdec) p.b_dec = (at::randn({d_in}, o) * 0.1).to(dt);
  return p;
}

// exact_idx: indices must equal the stable dense sort. Otherwise (fp32 on random data, where GEMMs
// of different shapes round differently) only swaps between values equal within tol are allowed.
void check_topk(const Problem& p, int64_t k, bool relu, double tol, const std::string& tag,
                bool exact_idx) {
  auto [v, i] = sparsekern::topk_encode_cpu(p.x, p.W, p.b, p.b_dec, k, relu);
  at::Tensor pre = dense_pre64(p.x, p.W, p.b, p.b_dec);
  auto sorted = at::sort(pre, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  at::Tensor rv = std::get<0>(sorted).narrow(1, 0, k);
  at::Tensor ri = std::get<1>(sorted).narrow(1, 0, k);
  if (relu) rv = rv.clamp_min(0);
  const std::string name = "topk " + tag + " k=" + std::to_string(k) + (relu ? " relu" : "");
  expect(v.sizes() == rv.sizes() && i.sizes() == ri.sizes(), name + ": shape");
  expect(v.scalar_type() == p.x.scalar_type(), name + ": values dtype");
  expect(i.scalar_type() == at::kLong, name + ": indices dtype");
  if (v.sizes() != rv.sizes() || i.sizes() != ri.sizes()) return;
  if (exact_idx || at::equal(i, ri)) {
    expect(at::equal(i, ri), name + ": indices differ from the stable dense sort");
  } else {
    at::Tensor unclamped = std::get<0>(sorted).narrow(1, 0, k);
    expect(max_rel(pre.gather(1, i), unclamped) <= tol, name + ": indices are not a top-k");
    at::Tensor si = std::get<0>(at::sort(i, 1));
    expect(k < 2 || (si.narrow(1, 1, k - 1) > si.narrow(1, 0, k - 1)).all().item<bool>(),
           name + ": repeated index in a row");
  }
  const double err = max_rel(v, rv);
  expect(err <= tol, name + ": values rel err " + std::to_string(err));
}

void check_threshold(const Problem& p, const at::Tensor& thr, double tol, const std::string& tag) {
  auto [v, i, l0] = sparsekern::threshold_encode_cpu(p.x, p.W, p.b, thr, p.b_dec);
  const std::string name = "threshold " + tag;
  at::Tensor pre = dense_pre64(p.x, p.W, p.b, p.b_dec);
  at::Tensor mask = pre > thr.to(at::kDouble);
  at::Tensor rl0 = mask.sum(1).to(at::kLong);
  expect(l0.scalar_type() == at::kLong && at::equal(l0, rl0), name + ": l0");
  const int64_t K = rl0.numel() ? rl0.max().item<int64_t>() : 0;
  expect(v.dim() == 2 && v.size(0) == p.x.size(0) && v.size(1) == K, name + ": values shape");
  expect(i.sizes() == v.sizes(), name + ": indices shape");
  expect(v.scalar_type() == p.x.scalar_type(), name + ": values dtype");
  if (v.dim() != 2 || v.size(1) != K || i.sizes() != v.sizes()) return;
  // Dense re-expansion: ascending slots hold exactly the firing features, padding is (0, 0).
  at::Tensor ref_v = at::zeros({p.x.size(0), K}, at::kDouble);
  at::Tensor ref_i = at::zeros({p.x.size(0), K}, at::kLong);
  for (int64_t r = 0; r < p.x.size(0); ++r) {
    at::Tensor idx = mask[r].nonzero().view({-1});
    const int64_t n = idx.numel();
    if (n == 0) continue;
    ref_i[r].narrow(0, 0, n).copy_(idx);
    ref_v[r].narrow(0, 0, n).copy_(pre[r].index_select(0, idx));
  }
  expect(at::equal(i, ref_i), name + ": indices");
  const double err = max_rel(v, ref_v);
  expect(err <= tol, name + ": values rel err " + std::to_string(err));
}

}  // namespace

int main() {
  at::manual_seed(1234);
  // Small enough that random data has no near-ties at fp32 precision.
  const struct { int64_t n, d_in, d_sae; } shapes[] = {{1, 5, 9}, {7, 13, 50}, {33, 24, 300},
                                                       {20, 16, 4500}};  // > 2 column blocks
  for (auto dt : {at::kDouble, at::kFloat}) {
    const double tol = dt == at::kDouble ? 1e-12 : 1e-5;
    const auto acc = dt;
    for (const auto& s : shapes)
      for (bool with_bdec : {false, true}) {
        Problem p = make(s.n, s.d_in, s.d_sae, dt, with_bdec);
        const std::string tag = std::string(c10::toString(dt)) + " " + std::to_string(s.n) + "x" +
                                std::to_string(s.d_in) + "x" + std::to_string(s.d_sae) +
                                (with_bdec ? " b_dec" : "");
        for (int64_t k : {int64_t(1), std::min<int64_t>(5, s.d_sae), s.d_sae})
          for (bool relu : {true, false}) check_topk(p, k, relu, tol, tag, dt == at::kDouble);
        at::Tensor thr = at::rand({s.d_sae}, at::TensorOptions().dtype(acc)) * 0.3;
        check_threshold(p, thr, tol, tag);
        check_threshold(p, at::full({s.d_sae}, 1e6, at::TensorOptions().dtype(acc)), tol,
                        tag + " nothing fires");
        // Strided weights: W stored transposed, and a column slice of a wider matrix.
        Problem q = p;
        q.W = p.W.t().contiguous().t();
        check_topk(q, std::min<int64_t>(3, s.d_sae), true, tol, tag + " W col-major", dt == at::kDouble);
        check_threshold(q, thr, tol, tag + " W col-major");
        at::Tensor wide = at::zeros({s.d_in, s.d_sae + 7}, p.W.options());
        wide.narrow(1, 4, s.d_sae).copy_(p.W);
        q.W = wide.narrow(1, 4, s.d_sae);
        check_topk(q, std::min<int64_t>(3, s.d_sae), false, tol, tag + " W slice", dt == at::kDouble);
        // Non-contiguous x.
        at::Tensor xw = at::zeros({s.n, 2 * s.d_in}, p.x.options());
        xw.narrow(1, 0, s.d_in).copy_(p.x);
        q = p;
        q.x = xw.narrow(1, 0, s.d_in);
        check_topk(q, std::min<int64_t>(4, s.d_sae), true, tol, tag + " x strided", dt == at::kDouble);
      }
  }

  // Low precision: computed in fp32, so compare against fp32 pre-activations.
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    Problem p = make(9, 32, 200, dt, true);
    auto [v, i] = sparsekern::topk_encode_cpu(p.x, p.W, p.b, p.b_dec, 6, true);
    expect(v.scalar_type() == dt, "topk low precision: values dtype");
    at::Tensor pre = dense_pre64(p.x, p.W, p.b, p.b_dec);
    at::Tensor picked = pre.gather(1, i).clamp_min(0);
    expect(max_rel(v, picked) < 1e-2, "topk low precision: values do not match their indices");
    at::Tensor best = std::get<0>(at::sort(pre, true, 1, true)).narrow(1, 0, 6).clamp_min(0);
    expect(max_rel(picked, best) < 1e-2, "topk low precision: not the top values");
    auto [tv, ti, tl] = sparsekern::threshold_encode_cpu(p.x, p.W, p.b,
                                                         at::zeros({200}, at::kFloat), p.b_dec);
    expect(tv.scalar_type() == dt && tl.numel() == 9, "threshold low precision: dtype/shape");
  }

  // Ties: identical columns (and biases) give bit-identical pre-activations; the lower feature
  // index must win and come first, also across column blocks (block size 2048).
  for (auto dt : {at::kFloat, at::kDouble}) {
    Problem p = make(6, 8, 5000, dt, false);
    p.x = p.x * 1e-3;
    for (int64_t c : {5, 2047, 2048, 2049, 4999}) {
      p.W.select(1, c).copy_(p.W.select(1, 3));
      p.b[c].fill_(50.0);
    }
    p.b[3].fill_(50.0);
    for (int64_t k : {1, 2, 3, 6, 7})
      check_topk(p, k, false, dt == at::kDouble ? 1e-12 : 1e-5, "ties", true);
    // All-equal rows keep the first k features.
    Problem z{at::zeros({3, 4}, dt), at::zeros({4, 50}, dt), at::zeros({50}, dt), std::nullopt};
    auto [zv, zi] = sparsekern::topk_encode_cpu(z.x, z.W, z.b, z.b_dec, 6, true);
    expect(at::equal(zi, at::arange(6, at::kLong).expand({3, 6})), "all-equal row keeps first k");
  }

  // N = 0.
  {
    Problem p = make(0, 8, 40, at::kFloat, true);
    auto [v, i] = sparsekern::topk_encode_cpu(p.x, p.W, p.b, p.b_dec, 5, true);
    expect(v.sizes() == at::IntArrayRef({0, 5}) && i.sizes() == at::IntArrayRef({0, 5}),
           "topk N=0 shape");
    auto [tv, ti, tl] =
        sparsekern::threshold_encode_cpu(p.x, p.W, p.b, at::zeros({40}, at::kFloat), p.b_dec);
    expect(tv.sizes() == at::IntArrayRef({0, 0}) && ti.sizes() == at::IntArrayRef({0, 0}) &&
               tl.sizes() == at::IntArrayRef({0}),
           "threshold N=0 shape");
  }

  // Bad arguments raise instead of reading out of bounds.
  {
    Problem p = make(3, 4, 10, at::kFloat, false);
    auto raises = [](auto&& f) {
      try {
        f();
      } catch (const c10::Error&) {
        return true;
      }
      return false;
    };
    expect(raises([&] { sparsekern::topk_encode_cpu(p.x, p.W, p.b, p.b_dec, 11, true); }),
           "k > d_sae must raise");
    expect(raises([&] { sparsekern::topk_encode_cpu(p.x, p.W, p.b, p.b_dec, 0, true); }),
           "k = 0 must raise");
    expect(raises([&] {
             sparsekern::topk_encode_cpu(p.x, p.W.narrow(0, 0, 3), p.b, p.b_dec, 2, true);
           }),
           "d_in mismatch must raise");
    expect(raises([&] {
             sparsekern::threshold_encode_cpu(p.x, p.W, p.b, at::zeros({10}, at::kDouble),
                                              p.b_dec);
           }),
           "threshold dtype mismatch must raise");
    expect(raises([&] {
             sparsekern::threshold_encode_cpu(p.x, p.W, p.b, at::zeros({9}, at::kFloat), p.b_dec);
           }),
           "threshold shape mismatch must raise");
  }

  if (failures) {
    std::printf("test_encode: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_encode: all checks passed\n");
  return 0;
}
