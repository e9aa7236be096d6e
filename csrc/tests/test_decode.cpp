// Standalone check of the CPU sparse decode kernels against naive loops (no gtest, no Python).
// Exit status 0 = all passed. Built and run by CMake/ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Tolerance relative to the largest reference magnitude: rounding of the output dtype plus
// fp32 (fp64) accumulation.
double tol(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 1e-5;
    case at::kHalf: return 2e-3;
    default: return 1e-2;  // bfloat16
  }
}

void expect_close(const at::Tensor& got, const at::Tensor& ref, at::ScalarType dt, const std::string& what) {
  if (got.sizes() != ref.sizes() || got.scalar_type() != dt) {
    expect(false, what + ": shape/dtype mismatch");
    return;
  }
  if (ref.numel() == 0) return;
  const at::Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  const double scale = std::max(1.0, r.abs().max().item<double>());
  const double err = (g - r).abs().max().item<double>();
  const bool finite = at::isfinite(g).all().item<bool>();
  expect(finite && err <= tol(dt) * scale,
         what + ": max err " + std::to_string(err) + " (scale " + std::to_string(scale) + ")");
}

// Naive fp64 versions of the three ops, on the (already rounded) inputs.
at::Tensor naive_decode(const at::Tensor& v, const at::Tensor& idx, const at::Tensor& W,
                        const std::optional<at::Tensor>& b) {
  const int64_t N = v.size(0), k = v.size(1), d = W.size(1);
  at::Tensor vd = v.to(at::kDouble).contiguous(), Wd = W.to(at::kDouble).contiguous();
  at::Tensor ix = idx.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({N, d}, at::kDouble);
  auto o = out.accessor<double, 2>();
  auto va = vd.accessor<double, 2>();
  auto wa = Wd.accessor<double, 2>();
  auto ia = ix.accessor<int64_t, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) o[n][c] += va[n][j] * wa[ia[n][j]][c];
  if (b) out += b->to(at::kDouble);
  return out;
}

at::Tensor naive_bwd_values(const at::Tensor& g, const at::Tensor& idx, const at::Tensor& W) {
  const int64_t N = idx.size(0), k = idx.size(1), d = W.size(1);
  at::Tensor gd = g.to(at::kDouble).contiguous(), Wd = W.to(at::kDouble).contiguous();
  at::Tensor ix = idx.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({N, k}, at::kDouble);
  auto o = out.accessor<double, 2>();
  auto ga = gd.accessor<double, 2>();
  auto wa = Wd.accessor<double, 2>();
  auto ia = ix.accessor<int64_t, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) o[n][j] += ga[n][c] * wa[ia[n][j]][c];
  return out;
}

at::Tensor naive_bwd_weight(const at::Tensor& g, const at::Tensor& v, const at::Tensor& idx, int64_t d_sae) {
  const int64_t N = idx.size(0), k = idx.size(1), d = g.size(1);
  at::Tensor gd = g.to(at::kDouble).contiguous(), vd = v.to(at::kDouble).contiguous();
  at::Tensor ix = idx.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({d_sae, d}, at::kDouble);
  auto o = out.accessor<double, 2>();
  auto ga = gd.accessor<double, 2>();
  auto va = vd.accessor<double, 2>();
  auto ia = ix.accessor<int64_t, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) o[ia[n][j]][c] += va[n][j] * ga[n][c];
  return out;
}

struct Case {
  int64_t N, k, d, d_sae;
};

void run_case(const Case& cs, at::ScalarType dt, bool noncontig, bool bias) {
  const auto opt = at::TensorOptions().dtype(dt);
  const std::string name = std::string(c10::toString(dt)) + " N=" + std::to_string(cs.N) +
                           " k=" + std::to_string(cs.k) + " d=" + std::to_string(cs.d) +
                           " d_sae=" + std::to_string(cs.d_sae) + (noncontig ? " noncontig" : "") +
                           (bias ? " bias" : "");
  at::Tensor W, v, idx, g;
  if (noncontig) {  // transposed / strided views of larger buffers
    W = at::randn({cs.d_sae, 2 * cs.d}, opt).slice(1, 0, 2 * cs.d, 2);
    v = at::randn({cs.k, cs.N}, opt).t();
    idx = at::randint(cs.d_sae, {cs.k, cs.N}, at::kLong).t();
    g = at::randn({cs.d, cs.N}, opt).t();
  } else {
    W = at::randn({cs.d_sae, cs.d}, opt);
    v = at::randn({cs.N, cs.k}, opt);
    idx = at::randint(cs.d_sae, {cs.N, cs.k}, at::kLong);
    g = at::randn({cs.N, cs.d}, opt);
  }
  if (cs.N > 0 && cs.k > 1) idx.select(0, 0).fill_(idx[0][0].item<int64_t>());  // duplicates
  std::optional<at::Tensor> b;
  if (bias) b = at::randn({cs.d}, opt);
  try {
    expect_close(sparsekern::sparse_decode_cpu(v, idx, W, b), naive_decode(v, idx, W, b), dt,
                 "forward " + name);
    expect_close(sparsekern::sparse_decode_backward_values_cpu(g, idx, W),
                 naive_bwd_values(g, idx, W), dt, "backward_values " + name);
    expect_close(sparsekern::sparse_decode_backward_weight_cpu(g, v, idx, cs.d_sae),
                 naive_bwd_weight(g, v, idx, cs.d_sae), dt, "backward_weight " + name);
  } catch (const c10::Error& e) {
    expect(false, name + ": unexpected error " + e.what_without_backtrace());
  }
}

void expect_throws(const std::function<void()>& f, const std::string& what) {
  try {
    f();
  } catch (const c10::Error&) {
    return;
  }
  expect(false, what + ": no c10::Error raised");
}

void bad_index_cases() {
  const at::Tensor W = at::randn({10, 8});
  const at::Tensor v = at::randn({3, 2});
  const at::Tensor g = at::randn({3, 8});
  for (int64_t bad : {int64_t(-1), int64_t(10), int64_t(1) << 40}) {
    at::Tensor idx = at::zeros({3, 2}, at::kLong);
    idx[2][1] = bad;
    const std::string s = " index " + std::to_string(bad);
    expect_throws([&] { sparsekern::sparse_decode_cpu(v, idx, W, std::nullopt); }, "forward" + s);
    expect_throws([&] { sparsekern::sparse_decode_backward_values_cpu(g, idx, W); }, "backward_values" + s);
    expect_throws([&] { sparsekern::sparse_decode_backward_weight_cpu(g, v, idx, 10); }, "backward_weight" + s);
  }
  // shape mismatches are errors too, not crashes
  expect_throws([&] { sparsekern::sparse_decode_cpu(v, at::zeros({3, 3}, at::kLong), W, std::nullopt); },
                "forward shape mismatch");
  expect_throws([&] { sparsekern::sparse_decode_cpu(v, at::zeros({3, 2}, at::kLong), W, at::randn({7})); },
                "forward bad b_dec");
  expect_throws([&] { sparsekern::sparse_decode_backward_values_cpu(at::randn({3, 7}), at::zeros({3, 2}, at::kLong), W); },
                "backward_values bad grad_out");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {0, 4, 16, 10},  {5, 0, 16, 10},   {1, 1, 1, 1},      {7, 3, 13, 5},
      {33, 17, 100, 40}, {9, 5, 67, 3},  {64, 32, 256, 300},
      // W_dec > 8 MiB and N*k >= d_sae: the sorted "scatter" path (fp32/fp64; bf16 for the
      // second), with a column tail past the last full block, and several row chunks (third)
      {130, 40, 800, 5000}, {160, 40, 1000, 6000}, {2100, 2, 1100, 2000},
  };
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (const Case& cs : cases) {
      const bool big = cs.d_sae >= 2000;  // keep the run short: one variant of the big cases
      if (!big) run_case(cs, dt, /*noncontig=*/false, /*bias=*/false);
      run_case(cs, dt, /*noncontig=*/false, /*bias=*/true);
      if (!big) run_case(cs, dt, /*noncontig=*/true, /*bias=*/true);
    }
  }
  // int32 indices are widened
  {
    const at::Tensor W = at::randn({50, 24}), v = at::randn({6, 4});
    const at::Tensor idx = at::randint(50, {6, 4}, at::kLong);
    expect_close(sparsekern::sparse_decode_cpu(v, idx.to(at::kInt), W, std::nullopt),
                 naive_decode(v, idx, W, std::nullopt), at::kFloat, "forward int32 indices");
  }
  bad_index_cases();
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_decode: all checks passed\n");
  return 0;
}
