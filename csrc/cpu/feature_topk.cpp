// CPU per-feature streaming top-k merge (contract: kernels.h, semantics: sparsekern/ops/feature_topk.py).
//
// The batch's candidates (value > 0) are counting-sorted by feature (stable, flat order); then
// features are split over threads. Each touched feature drops the candidates that are not better
// than its current k-th entry, sorts the rest by (value desc, seq asc, pos asc) and merges them
// with its (already sorted) row, written back in place; a row that is not sorted (a state built
// by hand) gets a full partial sort instead. Untouched features are not read. Work
// O(M + sum_f (k + c_f log c_f)), extra memory O(M + threads * k).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "../torch/feature_topk_args.h"

namespace sparsekern {
namespace {

template <typename T>
struct Entry {
  T v;
  int64_t seq, pos;
};

// Strict total order on distinct keys: larger value first, then smaller (seq, pos).
template <typename T>
inline bool better(const Entry<T>& a, const Entry<T>& b) {
  if (a.v != b.v) return a.v > b.v;
  if (a.seq != b.seq) return a.seq < b.seq;
  return a.pos < b.pos;
}

template <typename T>
void merge_impl(T* sv, int64_t* sl, int64_t d_sae, int64_t k, const T* vals, const int64_t* idx,
                const int64_t* loc, int64_t R, int64_t kc) {
  const int64_t M = R * kc;
  // counting sort of candidates by feature
  std::vector<int64_t> offsets(d_sae + 1, 0);
  for (int64_t p = 0; p < M; ++p)
    if (vals[p] > T(0)) ++offsets[idx[p] + 1];
  for (int64_t f = 0; f < d_sae; ++f) offsets[f + 1] += offsets[f];
  const int64_t E = offsets[d_sae];
  if (E == 0) return;
  std::vector<Entry<T>> cand(E);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < M; ++p) {
      if (!(vals[p] > T(0))) continue;
      const int64_t r = p / kc;
      cand[fill[idx[p]]++] = Entry<T>{vals[p], loc[2 * r], loc[2 * r + 1]};
    }
  }
  // 256 features per task: most features of a batch have no candidates and cost one compare
  at::parallel_for(0, d_sae, 256, [&](int64_t f0, int64_t f1) {
    std::vector<Entry<T>> row(k), pass, merged(k);
    for (int64_t f = f0; f < f1; ++f) {
      const int64_t c0 = offsets[f], c1 = offsets[f + 1];
      if (c0 == c1) continue;
      T* rv = sv + f * k;
      int64_t* rl = sl + f * k * 2;
      bool sorted = true;
      for (int64_t j = 0; j < k; ++j) {
        row[j] = Entry<T>{rv[j], rl[2 * j], rl[2 * j + 1]};
        if (j > 0 && better(row[j], row[j - 1])) sorted = false;
      }
      if (!sorted) {  // a state not written by this op: sort everything once
        std::vector<Entry<T>> all(row);
        all.insert(all.end(), cand.begin() + c0, cand.begin() + c1);
        std::partial_sort(all.begin(), all.begin() + k, all.end(), better<T>);
        std::copy(all.begin(), all.begin() + k, merged.begin());
      } else {
        // only candidates strictly better than the current k-th can enter (an identical key
        // would be indistinguishable); in a warm state that is few of them
        pass.clear();
        for (int64_t e = c0; e < c1; ++e)
          if (better(cand[e], row[k - 1])) pass.push_back(cand[e]);
        if (pass.empty()) continue;
        std::sort(pass.begin(), pass.end(), better<T>);
        // merge two sorted lists, keep the first k (row first on identical keys: same values)
        size_t a = 0, b = 0;
        for (int64_t j = 0; j < k; ++j)
          merged[j] = (b < pass.size() && better(pass[b], row[a])) ? pass[b++] : row[a++];
      }
      for (int64_t j = 0; j < k; ++j) {
        rv[j] = merged[j].v;
        rl[2 * j] = merged[j].seq;
        rl[2 * j + 1] = merged[j].pos;
      }
    }
  });
}

}  // namespace

void feature_topk_update_cpu(const at::Tensor& state_values, const at::Tensor& state_locations,
                             const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& locations) {
  constexpr const char* fn = "feature_topk_update_cpu";
  TORCH_CHECK(state_values.device().is_cpu() && state_locations.device().is_cpu() &&
                  values.device().is_cpu() && indices.device().is_cpu() && locations.device().is_cpu(),
              fn, ": all tensors must be on the CPU");
  const FeatureTopKDims dims =
      check_feature_topk_args(fn, state_values, state_locations, values, indices, locations);
  const int64_t d_sae = dims.d_sae, k = dims.k, R = dims.rows, kc = dims.kc;
  TORCH_CHECK(indices.scalar_type() == at::kLong, fn, ": indices must be int64, got ", indices.scalar_type());
  at::Tensor V = values.contiguous(), I = indices.contiguous(), L = locations.contiguous();
  const int64_t* ip = I.const_data_ptr<int64_t>();
  check_index_range(fn, ip, I.numel(), d_sae);
  if (R == 0 || kc == 0 || k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(state_values.scalar_type(), fn, [&] {
    merge_impl<scalar_t>(state_values.mutable_data_ptr<scalar_t>(), state_locations.mutable_data_ptr<int64_t>(),
                         d_sae, k, V.const_data_ptr<scalar_t>(), ip, L.const_data_ptr<int64_t>(), R, kc);
  });
}

}  // namespace sparsekern
