// CPU kernels of sparsekern (ATen + at::parallel_for). Bound to Python in csrc/torch/bindings.cpp.
// All take 2-D inputs ([N, ...]); Python validates first, these re-check shapes and index ranges
// (TORCH_CHECK) before reading anything. float32/float64/bfloat16/float16, fp32 accumulation
// (fp64 for float64). The SIMD loops are compiled once per instruction set and the copy for this CPU is
// chosen at run time (isa.h).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace sparsekern {

// pre = (x - b_dec) @ W_enc + b_enc; per row the k largest pre (ties -> lower index), sorted
// descending, then ReLU if relu. Returns (values [N,k] x.dtype, indices [N,k] int64).
std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc,
                                                   const std::optional<at::Tensor>& b_dec,
                                                   int64_t k, bool relu);

// Keep every pre > threshold[f] (threshold [d_sae] in the accumulation dtype). Returns
// (values [N,K], indices [N,K], l0 [N]) with K = max l0, ascending feature order per row,
// padding value 0 / index 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const at::Tensor& threshold, const std::optional<at::Tensor>& b_dec);

// out[n] = sum_j values[n,j] * W_dec[indices[n,j]] (+ b_dec) -> [N, d] in W_dec.dtype.
at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec);

// grad_values[n,j] = <grad_out[n], W_dec[indices[n,j]]> -> [N, k].
at::Tensor sparse_decode_backward_values_cpu(const at::Tensor& grad_out, const at::Tensor& indices,
                                             const at::Tensor& W_dec);

// grad_W[f] = sum_{(n,j): indices[n,j]==f} values[n,j] * grad_out[n] -> [d_sae, d]; segmented
// reduction over indices sorted by feature (no atomics, no N*k*d buffer).
at::Tensor sparse_decode_backward_weight_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                             const at::Tensor& indices, int64_t d_sae);

// Per-feature streaming top-k merge, in place. state_values [d_sae, k] float32/float64 and
// state_locations [d_sae, k, 2] int64 (contiguous); values [R, kc] (state dtype), indices [R, kc]
// int64 in [0, d_sae), locations [R, 2] int64. Entries with value > 0 are candidates; every
// touched feature row becomes the k best of (row, its candidates) ordered by value desc, then
// (seq, pos) asc. Rows without candidates are not touched.
void feature_topk_update_cpu(const at::Tensor& state_values, const at::Tensor& state_locations,
                             const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& locations);

// Symmetric Gram top-k, in place, over tournament rounds [round_begin, round_end) of
// gram_topk_rounds(n, block). W [n, d] float32/float64 contiguous; values [n, cap] (W's dtype) and
// indices [n, cap] int64 (-1 = empty slot) hold each row's candidates. After all rounds every row's
// slots contain its k best G[i, j] = <W[i], W[j]>, j != i, ranked by G (or |G| if absolute) desc,
// then index asc; the values are signed.
int64_t gram_topk_rounds(int64_t n, int64_t block);
void gram_topk_update_cpu(const at::Tensor& W, const at::Tensor& values, const at::Tensor& indices,
                          int64_t k, bool absolute, int64_t block, int64_t round_begin,
                          int64_t round_end);

}  // namespace sparsekern
