// CUDA per-feature streaming top-k merge (contract: feature_topk.cuh).
//
// One block per feature. The block stages the feature's k state entries in shared memory, then
// each thread takes entries i of the merged list (k state entries + c candidates) and computes
// rank(i) = #{j better than i} + #{j < i with an identical key} (a permutation: the order is
// total up to identical keys), stopping as soon as rank >= k. Entries with rank < k go to slot
// rank of the row. Deterministic, no atomics, no sort; O(m * k) to O(m^2 / threads) per feature
// (m = k + c), which is small next to the encode that produced the batch. Blocks of features
// without candidates exit at once.
#include "feature_topk.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridX = 2147483647;

template <typename T>
struct Key {
  T v;
  int64_t seq, pos;
};

template <typename T>
__device__ __forceinline__ bool better(const Key<T>& a, const Key<T>& b) {
  if (a.v != b.v) return a.v > b.v;
  if (a.seq != b.seq) return a.seq < b.seq;
  return a.pos < b.pos;
}

template <typename T>
__device__ __forceinline__ bool same(const Key<T>& a, const Key<T>& b) {
  return a.v == b.v && a.seq == b.seq && a.pos == b.pos;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    feature_topk_kernel(T* __restrict__ sv, int64_t* __restrict__ sl, int64_t k,
                        const T* __restrict__ cv, const int64_t* __restrict__ cl,
                        const int64_t* __restrict__ offsets) {
  extern __shared__ int64_t smem[];  // [k] seq, [k] pos, then [k] values (int64-aligned)
  int64_t* s_seq = smem;
  int64_t* s_pos = smem + k;
  T* s_val = reinterpret_cast<T*>(smem + 2 * k);
  const int64_t f = blockIdx.x;
  const int64_t c0 = offsets[f], c1 = offsets[f + 1];
  if (c0 >= c1) return;  // the same for the whole block: no barrier is skipped by part of it
  T* row_v = sv + f * k;
  int64_t* row_l = sl + f * k * 2;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    s_val[j] = row_v[j];
    s_seq[j] = row_l[2 * j];
    s_pos[j] = row_l[2 * j + 1];
  }
  __syncthreads();  // from here the row is only written: every read comes from shared memory
  const int64_t m = k + (c1 - c0);
  auto key = [&](int64_t j) -> Key<T> {
    if (j < k) return Key<T>{s_val[j], s_seq[j], s_pos[j]};
    const int64_t e = c0 + (j - k);
    return Key<T>{cv[e], cl[2 * e], cl[2 * e + 1]};
  };
  for (int64_t i = threadIdx.x; i < m; i += kThreads) {
    const Key<T> ki = key(i);
    int64_t rank = 0;
    for (int64_t j = 0; j < m && rank < k; ++j) {
      const Key<T> kj = key(j);
      rank += (better(kj, ki) || (j < i && same(kj, ki))) ? 1 : 0;
    }
    if (rank < k) {
      row_v[rank] = ki.v;
      row_l[2 * rank] = ki.seq;
      row_l[2 * rank + 1] = ki.pos;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_feature_topk_update(T* state_values, int64_t* state_locations, int64_t d_sae,
                                       int64_t k, const T* cand_values,
                                       const int64_t* cand_locations, const int64_t* offsets,
                                       cudaStream_t stream) {
  if (d_sae == 0 || k == 0) return cudaSuccess;
  if (d_sae > kMaxGridX || k > kFeatureTopKMaxK) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(k) * (2 * sizeof(int64_t) + sizeof(T));
  feature_topk_kernel<T><<<static_cast<unsigned>(d_sae), kThreads, smem, stream>>>(
      state_values, state_locations, k, cand_values, cand_locations, offsets);
  return cudaGetLastError();
}

template cudaError_t launch_feature_topk_update<float>(float*, int64_t*, int64_t, int64_t,
                                                       const float*, const int64_t*,
                                                       const int64_t*, cudaStream_t);
template cudaError_t launch_feature_topk_update<double>(double*, int64_t*, int64_t, int64_t,
                                                        const double*, const int64_t*,
                                                        const int64_t*, cudaStream_t);

}  // namespace cuda
}  // namespace sparsekern
