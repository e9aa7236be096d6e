// Argument checks of the CPU entry points (TORCH_CHECK, so Python sees a RuntimeError naming the function
// and the argument). Each entry point runs them before any kernel reads its inputs; indices are
// range-checked in full before any kernel dereferences one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "isa.h"

// Internal to the extension (as the anonymous namespaces they replace): direct calls, no PLT.
#pragma GCC visibility push(hidden)
namespace sparsekern {

// min and max of p[0, n) (n >= 1) into *lo, *hi: the scan of checked_indices, per ISA (checks.cpp).
SK_PER_ISA(void index_bounds(const int64_t* p, int64_t n, int64_t* lo, int64_t* hi))

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_cpu_float(const char* fn, const char* name, const at::Tensor& t) {
  check_cpu(fn, name, t);
  TORCH_CHECK(is_float(t.scalar_type()), fn, ": ", name,
              " must be float32/float64/bfloat16/float16, got ", t.scalar_type());
}

// Every p[0, m) in [0, d_sae).
inline void check_index_range(const char* fn, const int64_t* p, int64_t m, int64_t d_sae) {
  if (m == 0) return;
  int64_t lo = 0, hi = 0;
  SK_ISA_FN(index_bounds)(p, m, &lo, &hi);
  TORCH_CHECK(lo >= 0 && hi < d_sae, fn, ": indices must lie in [0, d_sae=", d_sae,
              "), found values in [", lo, ", ", hi, "]");
}

// int64 contiguous copy of indices ([N, k] int64/int32), every entry checked in [0, d_sae).
inline at::Tensor checked_indices(const char* fn, const at::Tensor& indices, int64_t d_sae) {
  TORCH_CHECK(indices.device().is_cpu(), fn, ": indices must be a CPU tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, fn,
              ": indices must be int64 (or int32), got ", indices.scalar_type());
  at::Tensor idx = indices.to(at::kLong).contiguous();
  check_index_range(fn, idx.const_data_ptr<int64_t>(), idx.numel(), d_sae);
  return idx;
}

// The encoders' inputs: x [N, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in] or none; one
// float dtype, CPU tensors, d_sae below 2^31 (feature ids are int32 inside).
inline void check_encoder_args(const char* fn, const at::Tensor& x, const at::Tensor& W_enc,
                               const at::Tensor& b_enc, const std::optional<at::Tensor>& b_dec) {
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D [N, d_in], got ", x.sizes());
  TORCH_CHECK(W_enc.dim() == 2, fn, ": W_enc must be 2-D [d_in, d_sae], got ", W_enc.sizes());
  TORCH_CHECK(x.size(1) == W_enc.size(0), fn, ": x is ", x.sizes(), " but W_enc is ", W_enc.sizes());
  TORCH_CHECK(b_enc.dim() == 1 && b_enc.size(0) == W_enc.size(1), fn, ": b_enc must be [",
              W_enc.size(1), "], got ", b_enc.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(is_float(st), fn, ": unsupported dtype ", st);
  TORCH_CHECK(W_enc.scalar_type() == st && b_enc.scalar_type() == st, fn,
              ": x, W_enc, b_enc must share a dtype");
  TORCH_CHECK(x.device().is_cpu() && W_enc.device().is_cpu() && b_enc.device().is_cpu(), fn,
              ": CPU tensors expected");
  if (b_dec.has_value() && b_dec->defined()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == x.size(1), fn, ": b_dec must be [",
                x.size(1), "], got ", b_dec->sizes());
    TORCH_CHECK(b_dec->scalar_type() == st, fn, ": b_dec must have x's dtype");
    TORCH_CHECK(b_dec->device().is_cpu(), fn, ": CPU tensors expected");
  }
  TORCH_CHECK(W_enc.size(1) < std::numeric_limits<int32_t>::max(), fn, ": d_sae too large");
}

}  // namespace sparsekern
#pragma GCC visibility pop
