"""Build sparsekern against the torch that is already installed (use --no-build-isolation).

- C++ CPU extension ``sparsekern._C`` always (OpenMP when torch was built with it);
- CUDA sources join it only when torch has CUDA and ``nvcc`` is on the PATH;
- ``SPARSEKERN_NO_EXT=1`` installs pure Python (every op runs the reference);
- portable by default: no ``-march`` flag; the SIMD kernels are compiled for baseline x86-64, AVX2 and
  AVX-512 and chosen at run time (csrc/cpu/isa.h; ``sparsekern._C.build_info()`` says which), so every
  build, editable or wheel, uses the same flags and objects;
- ``SPARSEKERN_NATIVE_ARCH=1`` (developers only) compiles one copy with ``-march=native`` instead: such a
  build runs only on CPUs like the one that built it.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("SPARSEKERN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/torch/bindings.cpp"]
    cxx = ["-O3", "-std=c++17", "-fno-math-errno"]
    macros = []
    if os.environ.get("SPARSEKERN_NATIVE_ARCH", "0") == "1":
        cxx.append("-march=native")
        macros.append(("SPARSEKERN_NATIVE_ARCH", "1"))
    link = []
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # what build_info() reports, hex-encoded: one preprocessor number that no quoting or macro can change
    macros.append(("SPARSEKERN_CXX_FLAGS_HEX", " ".join(cxx).encode().hex()))
    with_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if with_cuda and os.environ.get("SPARSEKERN_NO_CUDA") != "1":
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/torch/cuda_bindings.cpp"]
        ext = CUDAExtension(
            "sparsekern._C",
            sources,
            define_macros=[("SPARSEKERN_WITH_CUDA", "1"), *macros],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("sparsekern._C", sources, define_macros=macros, extra_compile_args=cxx,
                           extra_link_args=link)

    class BuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
        """Editable installs compile into build/temp.<platform>-<python> too, where a wheel build does.

        setuptools gives an editable build a throwaway temporary folder; keeping its objects lets ninja
        reuse them, so `pip wheel --no-build-isolation .` after `pip install -e .` (scripts/wheel_check.sh
        in CI) only links (seconds instead of minutes). ninja still recompiles what changed, flags included.
        """

        def finalize_options(self):
            super().finalize_options()
            explicit = "build_temp" in self.distribution.get_option_dict("build_ext")  # --build-temp given
            if (getattr(self, "editable_mode", False) or self.inplace) and not explicit:
                tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
                self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = extensions()

setup(
    name="sparsekern",
    version="0.1.0",
    description="Sparse SAE/transcoder kernels and fused patching for mechanistic interpretability",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    # every non-Python file the package reads (tests/test_wheel_contents.py checks; scripts/wheel_check.sh
    # checks the built wheel): the toy model's weights (sparsekern.toy.load(): safetensors + JSON, SAELens
    # folders for the SAEs) and the measured Triton encode strategies
    package_data={"sparsekern.toy": ["weights/*.json", "weights/*.safetensors", "weights/*/*.json",
                                     "weights/*/*.safetensors"],
                  "sparsekern.triton": ["encode_strategy.json"]},
    python_requires=">=3.10",
    # every package a public module imports at module level (tests/test_install_requires.py checks)
    install_requires=["torch>=2.4", "jaxtyping", "tqdm", "safetensors", "numpy", "transformer-lens>=2.16",
                      "einops", "pandas", "transformers", "tokenizers",
                      "plotly>=5"],  # `sparsekern demo` and the bench's HTML page draw with plotly
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "sae-lens", "plotly>=5"],
        "bench": ["sae-lens", "plotly>=5"],
        "report": ["plotly>=5"],  # kept for old install lines; plotly is now a runtime dependency
    },
    entry_points={"console_scripts": ["sparsekern=sparsekern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
