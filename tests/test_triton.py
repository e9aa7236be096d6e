"""Triton backend on CPU: the kernels under TRITON_INTERPRET=1, plus registry/import behaviour.

The kernel checks live in ``triton_interp_cases.py`` and run in a child pytest process, because
triton reads TRITON_INTERPRET when it is imported and when kernels are decorated: setting it in
this process would leak interpreted kernels (and a "cpu" triton backend) into other test modules.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern import backends

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
needs_triton = pytest.mark.skipif(not backends.has_triton(), reason="triton is not installed")


def _run(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    env.pop("SPARSEKERN_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_triton
@pytest.mark.parametrize("group", [("triton_interp_cases.py", "topk or threshold"),
                                   ("triton_interp_cases.py", "decode or dispatch"),
                                   ("triton_interp_strategies.py", "topk"),
                                   ("triton_interp_strategies.py", "not topk"),
                                   ("triton_interp_encode_grad.py", "")],
                         ids=lambda g: f"{g[0]}:{g[1]}")
def test_triton_kernels_under_interpreter(group):
    path, expr = group
    r = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / path), "-k", expr],
        {"TRITON_INTERPRET": "1"},
    )
    tail = (r.stdout[-6000:] + r.stderr[-3000:])
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail


def test_import_does_not_import_triton():
    r = _run([sys.executable, "-c", "import sys, sparsekern, sparsekern.ops; print('triton' in sys.modules)"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_without_triton_the_backend_is_not_registered():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes find_spec('triton') return None
        "import torch, sparsekern\n"
        "from sparsekern import backends, ops\n"
        "assert all('triton' not in backends._IMPLS[op] for op in backends._IMPLS), backends._IMPLS\n"
        "assert 'triton' not in sparsekern.backends()\n"
        "try:\n"
        "    with sparsekern.use_backend('triton'):\n"
        "        ops.sparse_decode(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.ones(3, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e); print('ok')\n"
    )
    r = _run([sys.executable, "-c", code], {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


@needs_triton
def test_cpu_triton_needs_interpreter_and_is_never_auto(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in backends.implementations("topk_encode", "cpu")
    with pytest.raises(RuntimeError, match="triton"):
        with backends.use_backend("triton"):
            backends.select("topk_encode", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # select() itself never imports triton
    assert "triton" in backends.implementations("topk_encode", "cpu")
    for op in ("topk_encode", "threshold_encode", "sparse_decode", "sparse_decode_backward_weight"):
        assert backends.select(op, torch.device("cpu"))[0] != "triton"
    with backends.use_backend("triton"):
        assert backends.select("topk_encode", torch.device("cpu"))[0] == "triton"


def _has_nvidia_backend() -> bool:
    if not backends.has_triton() or os.environ.get("TRITON_INTERPRET") == "1":
        return False  # interpreted kernels cannot be lowered
    from triton.backends import backends as triton_backends

    return "nvidia" in triton_backends


needs_nvidia_compiler = pytest.mark.skipif(
    not _has_nvidia_backend(), reason="needs triton's NVIDIA backend (and TRITON_INTERPRET unset)"
)


def _compile(arch, names=None):
    import triton_compile as C

    done = []
    for name, fn, sig, ce, warps in C.variants():
        if names is None or name in names:
            kernel = C.compile_one(fn, sig, ce, warps, arch)
            assert kernel.asm.get("cubin"), name
            done.append(name)
    assert done and (names is None or len(done) == len(names)), done


@needs_nvidia_compiler
@pytest.mark.parametrize("arch", [90])
def test_kernels_compile_for_cuda(arch):
    """No GPU needed: Triton lowers to PTX/cubin with its bundled ptxas (one variant per kernel;
    sm_80 and every variant: the slow test below)."""
    from triton_compile import REPRESENTATIVE

    _compile(arch, REPRESENTATIVE)


@needs_nvidia_compiler
@pytest.mark.slow
def test_kernels_compile_for_sm80():
    """The same variants for sm_80 (A100). Every dtype x k x pass, both archs, with registers and
    spills: ``python tests/triton_compile.py 80`` / ``90`` (a minute or two of CPU each)."""
    from triton_compile import REPRESENTATIVE

    _compile(80, REPRESENTATIVE)
