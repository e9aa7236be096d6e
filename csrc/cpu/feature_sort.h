// Stable counting sort of a sparse code's entries by feature, into per-thread buffers reused across
// calls. Used by the decode kernels' scatter paths and weight grad (decode_forward.cpp,
// decode_backward.cpp). Baseline code (scalar loops), shared by every ISA's kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// Internal to the extension (as the anonymous namespaces they replace): direct calls, no PLT.
#pragma GCC visibility push(hidden)
namespace sparsekern {

// Entry e (in sorted order) comes from row r0 + srow[e], at flat position spos[e] = row*k + j (if
// want_pos), with value sval[e] (if vals); offsets is the CSR row pointer over features ([d_sae + 1]);
// used lists the features with at least one entry (if want_used). Stable, so every reduction over a
// feature's segment runs in a fixed order: results are deterministic.
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
inline FeatureSort& thread_sort_scratch() {
  thread_local FeatureSort fs;
  return fs;
}

inline void trim_sort_scratch(FeatureSort& fs) {
  constexpr size_t kKeep = size_t(64) << 20;
  auto trim = [](auto& v) {
    if (v.capacity() * sizeof(v[0]) > kKeep) std::vector<std::decay_t<decltype(v[0])>>().swap(v);
  };
  trim(fs.offsets); trim(fs.srow); trim(fs.spos); trim(fs.used); trim(fs.hist);
  trim(fs.sval_f); trim(fs.sval_d);
}

// Sorts the flat entries of rows [r0, r1) of idx ([N, k], values in [0, d_sae), checked by the caller).
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

}  // namespace sparsekern
#pragma GCC visibility pop
