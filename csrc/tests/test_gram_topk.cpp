// Standalone check of the CPU symmetric Gram top-k against a naive per-row sort (no gtest, no Python).
// Small-integer rows make every Gram entry exact, so ties (lower index first) are checked exactly.
// Exit status 0 = all passed. Built and run by CMake/ctest.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
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

void check(at::ScalarType dt, int64_t n, int64_t d, int64_t k, int64_t block, bool absolute, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor W = at::randint(-1, 2, {n, d}, at::kLong).to(dt);
  const int64_t cap = k + std::max<int64_t>(k, 4);
  at::Tensor vals = at::zeros({n, cap}, at::dtype(dt));
  at::Tensor idx = at::full({n, cap}, -1, at::kLong);
  sparsekern::gram_topk_update_cpu(W, vals, idx, k, absolute, block, 0, sparsekern::gram_topk_rounds(n, block));

  const at::Tensor G = at::mm(W.to(at::kDouble), W.to(at::kDouble).t()).contiguous();
  const at::Tensor vd = vals.to(at::kDouble).contiguous();
  auto ga = G.accessor<double, 2>();
  auto va = vd.accessor<double, 2>();
  auto ia = idx.accessor<int64_t, 2>();
  auto key = [&](double v) { return absolute ? std::abs(v) : v; };
  auto better = [&](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return key(a.first) > key(b.first) || (key(a.first) == key(b.first) && a.second < b.second);
  };
  bool ok = true;
  for (int64_t i = 0; i < n && ok; ++i) {
    std::vector<std::pair<double, int64_t>> want, got;
    for (int64_t j = 0; j < n; ++j)
      if (j != i) want.emplace_back(ga[i][j], j);
    for (int64_t s = 0; s < cap; ++s)
      if (ia[i][s] >= 0) got.emplace_back(va[i][s], ia[i][s]);
    std::sort(want.begin(), want.end(), better);
    std::sort(got.begin(), got.end(), better);
    ok = int64_t(got.size()) >= k;
    for (int64_t s = 0; ok && s < k; ++s) ok = got[s] == want[s];
  }
  expect(ok, "gram_topk n=" + std::to_string(n) + " block=" + std::to_string(block) + " k=" +
                 std::to_string(k) + (absolute ? " abs" : "") + (dt == at::kFloat ? " f32" : " f64"));
}

}  // namespace

int main() {
  for (bool absolute : {false, true}) {
    check(at::kFloat, 2, 3, 1, 1, absolute, 1);
    check(at::kFloat, 37, 4, 5, 8, absolute, 2);     // 5 blocks: odd, dummy block skipped
    check(at::kDouble, 64, 5, 12, 16, absolute, 3);  // 4 blocks
    check(at::kFloat, 50, 3, 49, 7, absolute, 4);    // k = n - 1
    check(at::kDouble, 300, 6, 20, 512, absolute, 5);  // one diagonal tile
  }
  // bad state is rejected before anything is read
  bool threw = false;
  try {
    at::Tensor W = at::zeros({4, 2});
    sparsekern::gram_topk_update_cpu(W, at::zeros({4, 3}), at::full({4, 3}, 7, at::kLong), 1, false, 2, 0, 1);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "out-of-range state indices raise");
  std::printf(g_failures ? "%d failure(s)\n" : "all gram_topk checks passed\n", g_failures);
  return g_failures ? 1 : 0;
}
