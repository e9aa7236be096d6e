// Shape/dtype checks of feature_topk_update's arguments, shared by the CPU kernel and the CUDA
// binding (devices, index dtype and index range are each backend's own checks).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsekern {

struct FeatureTopKDims {
  int64_t d_sae, k;  // state: [d_sae, k]
  int64_t rows, kc;  // batch: values/indices [rows, kc]
};

inline FeatureTopKDims check_feature_topk_args(const char* fn, const at::Tensor& state_values,
                                               const at::Tensor& state_locations, const at::Tensor& values,
                                               const at::Tensor& indices, const at::Tensor& locations) {
  TORCH_CHECK(state_values.dim() == 2, fn, ": state_values must be [d_sae, k], got ", state_values.sizes());
  const int64_t d_sae = state_values.size(0), k = state_values.size(1);
  TORCH_CHECK(state_values.scalar_type() == at::kFloat || state_values.scalar_type() == at::kDouble, fn,
              ": state_values must be float32 or float64, got ", state_values.scalar_type());
  TORCH_CHECK(state_locations.scalar_type() == at::kLong && state_locations.dim() == 3 &&
                  state_locations.size(0) == d_sae && state_locations.size(1) == k &&
                  state_locations.size(2) == 2,
              fn, ": state_locations must be int64 [d_sae=", d_sae, ", k=", k, ", 2], got ",
              state_locations.scalar_type(), " ", state_locations.sizes());
  TORCH_CHECK(state_values.is_contiguous() && state_locations.is_contiguous(), fn,
              ": the state tensors must be contiguous (they are updated in place)");
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [R, kc], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == state_values.scalar_type(), fn, ": values dtype ",
              values.scalar_type(), " must equal state_values dtype ", state_values.scalar_type());
  TORCH_CHECK(indices.sizes() == values.sizes(), fn, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  const int64_t R = values.size(0), kc = values.size(1);
  TORCH_CHECK(locations.scalar_type() == at::kLong && locations.dim() == 2 && locations.size(0) == R &&
                  locations.size(1) == 2,
              fn, ": locations must be int64 [R=", R, ", 2], got ", locations.scalar_type(), " ",
              locations.sizes());
  return {d_sae, k, R, kc};
}

}  // namespace sparsekern
