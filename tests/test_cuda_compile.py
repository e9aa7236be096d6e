"""Compile check of the CUDA sources (csrc/cuda/*.cu) with nvcc, no GPU needed.

The kernels cannot run without a GPU, but every .cu must at least compile for the shipped
architectures; this catches syntax/template errors on machines that only have the toolkit.
"""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH: CUDA compile check skipped")


@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu sources")
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("src", CU_FILES or [None], ids=[os.path.basename(f) for f in CU_FILES] or ["none"])
def test_nvcc_compiles(src, arch, tmp_path):
    obj = tmp_path / (os.path.basename(src) + f".sm_{arch}.o")
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O2",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-I",
        os.path.join(ROOT, "csrc"),
        src,
        "-o",
        str(obj),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"nvcc failed ({proc.returncode}) for {os.path.relpath(src, ROOT)} on sm_{arch}:\n"
        f"$ {' '.join(cmd)}\n{proc.stderr}{proc.stdout}"
    )
    assert obj.exists() and obj.stat().st_size > 0
