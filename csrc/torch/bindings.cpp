// pybind11 bindings: plain functions; the op schemas live in Python (sparsekern/ops).
#include <torch/extension.h>

#include "../cpu/kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern native kernels (C++ CPU)";
  m.attr("has_cuda") = false;
  m.def("topk_encode", &sparsekern::topk_encode_cpu, "fused top-k encode (CPU)");
  m.def("threshold_encode", &sparsekern::threshold_encode_cpu, "JumpReLU encode to sparse (CPU)");
  m.def("sparse_decode", &sparsekern::sparse_decode_cpu, "sparse decode (CPU)");
  m.def("sparse_decode_backward_values", &sparsekern::sparse_decode_backward_values_cpu,
        "sparse decode: grad of values (CPU)");
  m.def("sparse_decode_backward_weight", &sparsekern::sparse_decode_backward_weight_cpu,
        "sparse decode: grad of W_dec (CPU)");
}
