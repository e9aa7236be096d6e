// Torch side of the CUDA sparse decode (compiled only when setup.py builds with CUDA, which
// defines SPARSEKERN_WITH_CUDA). Same signatures/semantics as the CPU kernels in kernels.h:
// validate (indices range-checked on the device before any gather), convert, then call the raw
// launchers of csrc/cuda/sparse_decode.cuh on the current stream.
// bindings.cpp declares `namespace sparsekern { void register_cuda(pybind11::module& m); }` and
// calls it under #ifdef SPARSEKERN_WITH_CUDA.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "../cuda/feature_topk.cuh"
#include "feature_topk_args.h"
#include "../cuda/sparse_decode.cuh"

namespace sparsekern {
namespace {

// at:: element types -> the CUDA types the kernels are instantiated for (same bit layout).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) && sizeof(at::Half) == sizeof(__half));

template <typename T>
const typename CudaType<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename CudaType<T>::type* cuda_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda_float(const char* fn, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, fn, ": ", name, " is on ", t.device(), " but W_dec/grad_out is on ", dev);
  TORCH_CHECK(is_float(t.scalar_type()), fn, ": ", name,
              " must be float32/float64/bfloat16/float16, got ", t.scalar_type());
}

void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, fn, ": kernel launch failed: ", cudaGetErrorString(err));
}

// int64 contiguous indices, all in [0, d_sae): checked with one device reduction and one
// host copy (a sync) before any kernel gathers with them.
at::Tensor checked_indices(const char* fn, const at::Tensor& indices, int64_t d_sae,
                           const at::Device& dev) {
  TORCH_CHECK(indices.is_cuda() && indices.device() == dev, fn, ": indices must be on ", dev,
              ", got ", indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, fn,
              ": indices must be int64 (or int32), got ", indices.scalar_type());
  at::Tensor idx = indices.to(at::kLong).contiguous();
  if (idx.numel() > 0) {
    auto [lo_t, hi_t] = at::aminmax(idx);
    at::Tensor lohi = at::stack({lo_t, hi_t}).cpu();
    const int64_t lo = lohi[0].item<int64_t>(), hi = lohi[1].item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < d_sae, fn, ": indices must lie in [0, d_sae=", d_sae,
                "), found values in [", lo, ", ", hi, "]");
  }
  return idx;
}

// W_dec with unit column stride is used in place (any row stride); otherwise copied.
at::Tensor rows_unit_stride(const at::Tensor& W) {
  return (W.stride(1) == 1 && W.stride(0) >= 0) ? W : W.contiguous();
}

}  // namespace

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec) {
  constexpr const char* fn = "sparse_decode_cuda";
  TORCH_CHECK(W_dec.is_cuda(), fn, ": W_dec must be a CUDA tensor, got ", W_dec.device());
  const at::Device dev = W_dec.device();
  check_cuda_float(fn, "W_dec", W_dec, dev);
  check_cuda_float(fn, "values", values, dev);
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [N, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), fn, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(W_dec.dim() == 2, fn, ": W_dec must be [d_sae, d], got ", W_dec.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t N = values.size(0), k = values.size(1);
  const int64_t d_sae = W_dec.size(0), d = W_dec.size(1);
  const at::ScalarType acc = acc_scalar(W_dec.scalar_type());
  at::Tensor bias;
  if (b_dec.has_value() && b_dec->defined()) {
    check_cuda_float(fn, "b_dec", *b_dec, dev);
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == d, fn, ": b_dec must be [d=", d,
                "], got ", b_dec->sizes());
    bias = b_dec->to(acc).contiguous();
  }
  at::Tensor idx = checked_indices(fn, indices, d_sae, dev);
  at::Tensor vals = values.to(acc).contiguous();
  at::Tensor W = rows_unit_stride(W_dec);
  at::Tensor out = at::empty({N, d}, W_dec.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), fn, [&] {
    using CT = typename CudaType<scalar_t>::type;
    using A = cuda::Acc<CT>;
    check_launch(fn, cuda::launch_sparse_decode<CT>(
                         vals.const_data_ptr<A>(), idx.const_data_ptr<int64_t>(), N, k,
                         cuda_ptr<scalar_t>(W), W.stride(0), d,
                         bias.defined() ? bias.const_data_ptr<A>() : nullptr,
                         cuda_ptr_mut<scalar_t>(out), stream));
  });
  return out;
}

at::Tensor sparse_decode_backward_values_cuda(const at::Tensor& grad_out, const at::Tensor& indices,
                                              const at::Tensor& W_dec) {
  constexpr const char* fn = "sparse_decode_backward_values_cuda";
  TORCH_CHECK(W_dec.is_cuda(), fn, ": W_dec must be a CUDA tensor, got ", W_dec.device());
  const at::Device dev = W_dec.device();
  check_cuda_float(fn, "W_dec", W_dec, dev);
  check_cuda_float(fn, "grad_out", grad_out, dev);
  TORCH_CHECK(W_dec.dim() == 2, fn, ": W_dec must be [d_sae, d], got ", W_dec.sizes());
  TORCH_CHECK(indices.dim() == 2, fn, ": indices must be [N, k], got ", indices.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t N = indices.size(0), k = indices.size(1);
  const int64_t d_sae = W_dec.size(0), d = W_dec.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == d, fn,
              ": grad_out must be [N=", N, ", d=", d, "], got ", grad_out.sizes());
  at::Tensor idx = checked_indices(fn, indices, d_sae, dev);
  // grad_out normally has W_dec's dtype (it is the output's grad); convert if it does not.
  at::Tensor G = grad_out.to(W_dec.scalar_type()).contiguous();
  at::Tensor W = rows_unit_stride(W_dec);
  at::Tensor res = at::empty({N, k}, W_dec.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || k == 0) return res;
  if (d == 0) return res.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), fn, [&] {
    using CT = typename CudaType<scalar_t>::type;
    check_launch(fn, cuda::launch_sparse_decode_backward_values<CT>(
                         cuda_ptr<scalar_t>(G), idx.const_data_ptr<int64_t>(), N, k,
                         cuda_ptr<scalar_t>(W), W.stride(0), d, cuda_ptr_mut<scalar_t>(res),
                         stream));
  });
  return res;
}

at::Tensor sparse_decode_backward_weight_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                              const at::Tensor& indices, int64_t d_sae) {
  constexpr const char* fn = "sparse_decode_backward_weight_cuda";
  TORCH_CHECK(grad_out.is_cuda(), fn, ": grad_out must be a CUDA tensor, got ", grad_out.device());
  const at::Device dev = grad_out.device();
  check_cuda_float(fn, "grad_out", grad_out, dev);
  check_cuda_float(fn, "values", values, dev);
  TORCH_CHECK(d_sae >= 0, fn, ": d_sae must be >= 0, got ", d_sae);
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [N, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), fn, ": indices ", indices.sizes(),
              " must have the shape of values ", values.sizes());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == values.size(0), fn,
              ": grad_out must be [N=", values.size(0), ", d], got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t k = values.size(1), d = grad_out.size(1);
  at::Tensor idx = checked_indices(fn, indices, d_sae, dev);
  const at::ScalarType acc = acc_scalar(grad_out.scalar_type());
  at::Tensor G = grad_out.contiguous();
  at::Tensor out = at::empty({d_sae, d}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  if (d_sae == 0 || d == 0) return out;
  // Stable sort of the flat (n, j) entries by feature; CSR offsets from the per-feature counts.
  at::Tensor flat = idx.reshape({-1});
  at::Tensor sorted_feat, perm;
  std::tie(sorted_feat, perm) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor sorted_rows = k > 0 ? at::div(perm, k, "floor") : perm;
  at::Tensor sorted_vals = values.reshape({-1}).index_select(0, perm).to(acc).contiguous();
  // offsets[f] = #entries with feature < f (no host sync, unlike bincount)
  at::Tensor offsets = at::searchsorted(sorted_feat, at::arange(d_sae + 1, idx.options()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), fn, [&] {
    using CT = typename CudaType<scalar_t>::type;
    using A = cuda::Acc<CT>;
    check_launch(fn, cuda::launch_sparse_decode_backward_weight<CT>(
                         cuda_ptr<scalar_t>(G), sorted_vals.const_data_ptr<A>(),
                         sorted_rows.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                         d_sae, d, cuda_ptr_mut<scalar_t>(out), stream));
  });
  return out;
}

// In place, same contract as feature_topk_update_cpu (kernels.h). Candidates are grouped by
// feature with one stable device sort: non-candidates (value <= 0 or NaN) get the key d_sae and
// sort last; offsets come from searchsorted (no host sync besides the index range check).
void feature_topk_update_cuda(const at::Tensor& state_values, const at::Tensor& state_locations,
                              const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& locations) {
  constexpr const char* fn = "feature_topk_update_cuda";
  TORCH_CHECK(state_values.is_cuda(), fn, ": state_values must be a CUDA tensor, got ",
              state_values.device());
  const at::Device dev = state_values.device();
  for (const at::Tensor* t : {&state_locations, &values, &locations})
    TORCH_CHECK(t->is_cuda() && t->device() == dev, fn, ": every tensor must be on ", dev,
                ", got one on ", t->device());
  const FeatureTopKDims dims =
      check_feature_topk_args(fn, state_values, state_locations, values, indices, locations);
  const int64_t d_sae = dims.d_sae, k = dims.k, R = dims.rows, kc = dims.kc;
  TORCH_CHECK(k <= cuda::kFeatureTopKMaxK, fn, ": k must be <= ", cuda::kFeatureTopKMaxK, ", got ", k);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor idx = checked_indices(fn, indices, d_sae, dev);
  if (R == 0 || kc == 0 || d_sae == 0) return;
  at::Tensor flat_v = values.reshape({-1}).contiguous();
  at::Tensor keys = at::where(flat_v > 0, idx.reshape({-1}), at::full({}, d_sae, idx.options()));
  at::Tensor sorted_keys, perm;
  std::tie(sorted_keys, perm) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor offsets = at::searchsorted(sorted_keys, at::arange(d_sae + 1, idx.options()));
  at::Tensor cand_v = flat_v.index_select(0, perm).contiguous();
  at::Tensor cand_l = locations.index_select(0, at::div(perm, kc, "floor")).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(state_values.scalar_type(), fn, [&] {
    check_launch(fn, cuda::launch_feature_topk_update<scalar_t>(
                         state_values.mutable_data_ptr<scalar_t>(),
                         state_locations.mutable_data_ptr<int64_t>(), d_sae, k,
                         cand_v.const_data_ptr<scalar_t>(), cand_l.const_data_ptr<int64_t>(),
                         offsets.const_data_ptr<int64_t>(), stream));
  });
}

void register_cuda(pybind11::module& m) {
  m.attr("has_cuda") = true;
  m.def("sparse_decode_cuda", &sparse_decode_cuda, "sparse decode (CUDA)");
  m.def("sparse_decode_backward_values_cuda", &sparse_decode_backward_values_cuda,
        "sparse decode: grad of values (CUDA)");
  m.def("sparse_decode_backward_weight_cuda", &sparse_decode_backward_weight_cuda,
        "sparse decode: grad of W_dec (CUDA)");
  m.def("feature_topk_update_cuda", &feature_topk_update_cuda,
        "per-feature streaming top-k merge, in place (CUDA)");
}

}  // namespace sparsekern
