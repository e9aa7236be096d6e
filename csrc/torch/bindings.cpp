// pybind11 bindings: plain functions; the op schemas live in Python (sparsekern/ops).
#include <torch/extension.h>

#include "../cpu/isa.h"
#include "../cpu/kernels.h"

#ifdef SPARSEKERN_WITH_CUDA
namespace sparsekern {
void register_cuda(pybind11::module& m);  // csrc/torch/cuda_bindings.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern native kernels (C++ CPU)";
#ifdef SPARSEKERN_WITH_CUDA
  m.attr("has_cuda") = true;
  sparsekern::register_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
  m.def(
      "build_info",
      [] {
        const sparsekern::BuildInfo b = sparsekern::build_info();
        pybind11::dict d;
        d["isa"] = b.isa;
        d["compiled_isas"] = b.compiled;
        d["supported_isas"] = b.supported;
        d["baseline_features"] = b.baseline_features;
        d["dispatch"] = b.dispatch;
        d["native_arch"] = b.native_arch;
        d["cxx_flags"] = b.cxx_flags;
        d["compiler"] = b.compiler;
        pybind11::dict targets;
        for (const auto& [isa, target] : b.targets) targets[pybind11::str(isa)] = target;
        d["isa_targets"] = targets;
        return d;
      },
      "how the CPU kernels were compiled and which instruction set runs: {isa: the active one, "
      "compiled_isas, supported_isas (this CPU), baseline_features (ISA macros of the objects outside "
      "the per-ISA kernels), dispatch, native_arch, cxx_flags, compiler, isa_targets}");
  m.def("set_cpu_isa", &sparsekern::set_active_isa, pybind11::arg("name"),
        "run the CPU kernels with `name` (auto, baseline, avx2, avx512; RuntimeError if not compiled or "
        "not supported here); returns the previous one. For tests and benchmarks: SPARSEKERN_CPU_ISA "
        "sets the first choice.");
  m.def("topk_encode", &sparsekern::topk_encode_cpu, "fused top-k encode (CPU)");
  m.def("threshold_encode", &sparsekern::threshold_encode_cpu, "JumpReLU encode to sparse (CPU)");
  m.def("sparse_decode", &sparsekern::sparse_decode_cpu, "sparse decode (CPU)");
  m.def("sparse_decode_backward_values", &sparsekern::sparse_decode_backward_values_cpu,
        "sparse decode: grad of values (CPU)");
  m.def("sparse_decode_backward_weight", &sparsekern::sparse_decode_backward_weight_cpu,
        "sparse decode: grad of W_dec (CPU)");
  m.def("feature_topk_update", &sparsekern::feature_topk_update_cpu,
        "per-feature streaming top-k merge, in place (CPU)");
  m.def("gram_topk_rounds", &sparsekern::gram_topk_rounds, "tournament rounds of gram_topk_update");
  m.def("gram_topk_update", &sparsekern::gram_topk_update_cpu,
        "symmetric Gram-matrix top-k over tournament rounds, in place (CPU)");
}
