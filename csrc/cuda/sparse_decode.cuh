// CUDA sparse decode and its backward kernels: raw pointers + host launchers, no torch headers
// (so nvcc compiles this anywhere). Torch-side validation/sorting: csrc/torch/cuda_bindings.cpp.
//
// T is float, double, __nv_bfloat16 or __half; Acc<T> (double for double, float otherwise) is
// the accumulation type, also used for values/bias/sorted values passed in. Row-major, unit
// column stride: element (r, c) of W is W[r * ldw + c]; out and grad tensors are dense.
// Launchers enqueue on `stream` and return the launch error (cudaSuccess on empty problems).
// Indices must already be validated in [0, d_sae): the kernels do not check them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sparsekern {
namespace cuda {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// out[n, :] = bias + sum_j values[n, j] * W[indices[n, j], :]   -> out [N, d]
template <typename T>
cudaError_t launch_sparse_decode(const Acc<T>* values, const int64_t* indices, int64_t N,
                                 int64_t k, const T* W, int64_t ldw, int64_t d,
                                 const Acc<T>* bias /* nullable */, T* out, cudaStream_t stream);

// grad_values[n, j] = <grad_out[n, :], W[indices[n, j], :]>   -> grad_values [N, k]
template <typename T>
cudaError_t launch_sparse_decode_backward_values(const T* grad_out, const int64_t* indices,
                                                 int64_t N, int64_t k, const T* W, int64_t ldw,
                                                 int64_t d, T* grad_values, cudaStream_t stream);

// grad_W[f, :] = sum_{e in [offsets[f], offsets[f+1])} sorted_values[e] * grad_out[sorted_rows[e], :]
// for f < d_sae (every row written; empty segments give zeros). The caller sorts the flattened
// (n, j) entries by feature (stable), so sorted_rows[e] = n and offsets is the CSR row pointer
// ([d_sae + 1], offsets[0] = 0).
template <typename T>
cudaError_t launch_sparse_decode_backward_weight(const T* grad_out, const Acc<T>* sorted_values,
                                                 const int64_t* sorted_rows,
                                                 const int64_t* offsets, int64_t d_sae,
                                                 int64_t d, T* grad_W, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
