// Standalone check of the CPU per-feature streaming top-k merge against a naive per-feature
// sort (no gtest, no Python). Exit status 0 = all passed. Built and run by CMake/ctest.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
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

using Key = std::tuple<double, int64_t, int64_t>;  // (value, seq, pos)

bool better(const Key& a, const Key& b) {
  if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
  return std::make_pair(std::get<1>(a), std::get<2>(a)) < std::make_pair(std::get<1>(b), std::get<2>(b));
}

// Streams `batches` batches of [R, kc] codes (values from a small set: many ties, some <= 0)
// through the kernel and compares with sorting every feature's candidates at the end.
void check_stream(at::ScalarType dt, int64_t d_sae, int64_t k, int64_t R, int64_t kc, int batches,
                  uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor sv = at::full({d_sae, k}, -std::numeric_limits<double>::infinity(), at::dtype(dt));
  at::Tensor sl = at::full({d_sae, k, 2}, -1, at::kLong);
  std::vector<std::vector<Key>> all(d_sae);
  for (int b = 0; b < batches; ++b) {
    at::Tensor idx = at::randint(0, d_sae, {R, kc}, at::kLong);
    at::Tensor val = (at::randint(-2, 6, {R, kc}, at::kLong).to(at::kDouble) * 0.25).to(dt);
    at::Tensor loc = at::stack({at::arange(R, at::kLong) + b * R, at::randint(0, 7, {R}, at::kLong)}, 1);
    sparsekern::feature_topk_update_cpu(sv, sl, val, idx, loc);
    auto ia = idx.accessor<int64_t, 2>();
    auto la = loc.accessor<int64_t, 2>();
    at::Tensor vd = val.to(at::kDouble);
    auto va = vd.accessor<double, 2>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < kc; ++j)
        if (va[r][j] > 0) all[ia[r][j]].emplace_back(va[r][j], la[r][0], la[r][1]);
  }
  at::Tensor svd = sv.to(at::kDouble);
  auto sva = svd.accessor<double, 2>();
  auto sla = sl.accessor<int64_t, 3>();
  bool ok = true;
  for (int64_t f = 0; f < d_sae && ok; ++f) {
    std::sort(all[f].begin(), all[f].end(), better);
    for (int64_t j = 0; j < k && ok; ++j) {
      const bool filled = j < int64_t(all[f].size());
      const Key want = filled ? all[f][j] : Key{-std::numeric_limits<double>::infinity(), -1, -1};
      ok = sva[f][j] == std::get<0>(want) && sla[f][j][0] == std::get<1>(want) &&
           sla[f][j][1] == std::get<2>(want);
      if (!ok) std::printf("  feature %lld slot %lld differs\n", (long long)f, (long long)j);
    }
  }
  expect(ok, "stream " + std::string(c10::toString(dt)) + " d_sae=" + std::to_string(d_sae) +
                 " k=" + std::to_string(k) + " R=" + std::to_string(R) + " kc=" + std::to_string(kc));
}

void check_rejects_out_of_range() {
  at::Tensor sv = at::full({4, 2}, -INFINITY, at::kFloat);
  at::Tensor sl = at::full({4, 2, 2}, -1, at::kLong);
  at::Tensor val = at::ones({1, 1}, at::kFloat);
  at::Tensor loc = at::zeros({1, 2}, at::kLong);
  bool threw = false;
  try {
    sparsekern::feature_topk_update_cpu(sv, sl, val, at::full({1, 1}, 4, at::kLong), loc);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "index == d_sae must be rejected");
  threw = false;
  try {
    sparsekern::feature_topk_update_cpu(sv, sl, val, at::zeros({1, 1}, at::kLong), at::zeros({1, 3}, at::kLong));
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "locations [R, 3] must be rejected");
}

}  // namespace

int main() {
  check_stream(at::kFloat, 50, 4, 64, 6, 5, 1);
  check_stream(at::kDouble, 7, 9, 30, 3, 3, 2);  // k larger than most features' counts
  check_stream(at::kFloat, 3000, 16, 512, 32, 3, 3);  // several parallel chunks of features
  check_rejects_out_of_range();
  if (g_failures == 0) std::printf("test_feature_topk: all passed\n");
  return g_failures == 0 ? 0 : 1;
}
