// How the CPU sparse decode kernels split their work (decode_forward.cpp, decode_backward.cpp):
// register tiles, the gather / scatter choice and the row-parallel grain. Templated on the vector
// width L of the ISA copy that calls them (simd.h); baseline code.
//
// Forward and values-grad gather N*k rows of W_dec: memory bound. Two paths:
//  * gather: rows split over threads; each output tile (kTile columns) is accumulated in
//    registers over the k gathered rows (next row's gathers prefetched), then stored once.
//  * scatter (W_dec past the caches and each feature used >= once per row chunk, the
//    SAE-training case): the chunk's entries are counting-sorted by feature (feature_sort.h); per
//    column block W_dec is streamed once in address order and each entry updates an L2-resident
//    block of the output (forward) or reads an L2-resident block of grad_out (values-grad). W_dec
//    then comes from DRAM ~once per chunk as sequential-ish reads instead of N*k random rows.
// Weight-grad: the same sort, then each thread owns a range of features (= distinct output
// rows): a segmented reduction, no atomics, no N*k*d buffer.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "simd.h"

// Internal to the extension (as the anonymous namespaces they replace): direct calls, no PLT.
#pragma GCC visibility push(hidden)
namespace sparsekern {

constexpr int kNV = 8;  // accumulators per output tile: 8 ymm (+ broadcast + load) fit 16 regs
template <int L>
constexpr int64_t kTile = kNV * L;  // columns per register tile (= scatter column block)

// Forward "scatter" path: rows are processed in chunks whose [rows x kTile] accumulator fits in L2.
constexpr int64_t kAccBytes = int64_t(512) << 10;       // accumulator block per thread (L2: 1 MiB)
constexpr int64_t kScatterMinWBytes = int64_t(8) << 20;  // smaller W_dec stays in L3: gather

template <typename T, int L>
int64_t scatter_chunk_rows() {
  return std::max<int64_t>(1, kAccBytes / (kTile<L> * int64_t(sizeof(acc_t<T>))));
}

inline const char* forced_path() {  // SPARSEKERN_DECODE_PATH=gather|scatter (tests, benchmarks)
  static const char* p = std::getenv("SPARSEKERN_DECODE_PATH");
  return p ? p : "";
}

template <typename T, int L>
bool use_scatter(int64_t N, int64_t k, int64_t d_sae, int64_t d) {
  const std::string forced = forced_path();
  if (forced == "gather") return false;
  if (d < kTile<L>) return false;  // no full column block
  if (forced == "scatter") return true;
  const int64_t rows = std::min(N, scatter_chunk_rows<T, L>());
  // needs W_dec past the cache, each feature reused (>= 1 entry per feature per chunk) and
  // enough column blocks to share between threads
  return d_sae * d * int64_t(sizeof(T)) > kScatterMinWBytes && rows * k >= d_sae &&
         d / kTile<L> >= std::min<int64_t>(2, at::get_num_threads());
}

// Row-parallel grain: about 32K multiply-adds per task so tiny inputs stay on one thread.
inline int64_t row_grain(int64_t k, int64_t d) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / (std::max<int64_t>(k, 1) * std::max<int64_t>(d, 1)));
}

// W_dec with unit column stride is used in place (any row stride); otherwise copied.
inline at::Tensor rows_unit_stride(const at::Tensor& W) {
  return (W.stride(1) == 1 && W.stride(0) >= 0) ? W : W.contiguous();
}

inline at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace sparsekern
#pragma GCC visibility pop
