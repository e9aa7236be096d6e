// CUDA per-feature streaming top-k merge ("top activating examples"): raw pointers + a host
// launcher, no torch headers. Torch side (validation, grouping candidates by feature):
// csrc/torch/cuda_bindings.cpp. Semantics: sparsekern/ops/feature_topk.py.
//
// T is float or double. The state is updated in place: state_values [d_sae, k] and
// state_locations [d_sae, k, 2] (seq, pos), both dense row-major. The caller groups the batch's
// candidates by feature: for feature f they are entries [offsets[f], offsets[f+1]) of
// cand_values [E] / cand_locations [E, 2]; offsets is [d_sae + 1] with offsets[0] = 0. Every
// feature with at least one candidate gets the k best of (its state row, its candidates) in the
// order (value desc, seq asc, pos asc), written sorted; other rows are not touched.
// k <= kFeatureTopKMaxK (a state row is staged in shared memory). Returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsekern {
namespace cuda {

constexpr int64_t kFeatureTopKMaxK = 2048;  // 2048 * 24 B = 48 KiB of shared memory

template <typename T>
cudaError_t launch_feature_topk_update(T* state_values, int64_t* state_locations, int64_t d_sae,
                                       int64_t k, const T* cand_values,
                                       const int64_t* cand_locations, const int64_t* offsets,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
