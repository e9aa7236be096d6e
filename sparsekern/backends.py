"""Backend registry: which implementation of each op runs for a tensor's device.

Ops are defined once (``sparsekern/ops``); backends only register implementations here, through the
public extension point :func:`register` (and :func:`prefer` for a per-op ``auto`` order)::

    import sparsekern.backends as B

    @B.register("sparse_decode", "triton", ("cuda",))
    def my_decode(values, indices, W_dec, b_dec): ...

Priority for ``auto`` is per device type; ``SPARSEKERN_BACKEND`` or :func:`use_backend` forces one.
The module is also callable: ``sparsekern.backends()`` lists the backends usable here (:func:`available`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import warnings
from typing import Callable, Iterator

import torch

BACKEND_NAMES = ("cpp", "cuda", "triton", "metal", "ref")
# "mps": Metal kernels where they exist (sparse_decode forward), the reference for the rest
_AUTO_PRIORITY = {"cpu": ("cpp", "ref"), "cuda": ("cuda", "triton", "ref"), "mps": ("metal", "ref")}
# per-op exceptions: op -> device type -> order (e.g. a Triton kernel that beats the CUDA C++ path)
_OP_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {}

# op name -> backend -> (implementation, device types it accepts; None = any)
_IMPLS: dict[str, dict[str, tuple[Callable, frozenset[str] | None]]] = {}
_local = threading.local()
_native_error: str | None = None
_native = None


def _load_native():
    """Import the compiled extension once; remember why it failed if it did."""
    global _native, _native_error
    if _native is not None or _native_error is not None:
        return _native
    try:
        if os.environ.get("SPARSEKERN_NO_EXT") == "1":
            raise ImportError("disabled by SPARSEKERN_NO_EXT=1")
        import importlib

        _native = importlib.import_module("sparsekern._C")
    except ImportError as e:  # not built, disabled, or built against another torch
        _native_error = str(e)
        warnings.warn(
            "sparsekern: the C++ extension is not available "
            f"({_native_error}); every op falls back to the pure-PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _native


def native():
    """The compiled ``sparsekern._C`` module, or None."""
    return _load_native()


def prefer(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Set ``op``'s ``auto`` order on ``device_type`` (``"cpu"``, ``"cuda"``, ``"mps"``) instead of the
    device's default order; ``order`` names backends of :data:`BACKEND_NAMES` (ValueError otherwise)."""
    bad = [b for b in order if b not in BACKEND_NAMES]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; expected names from {BACKEND_NAMES}")
    _OP_PRIORITY.setdefault(op, {})[device_type] = tuple(order)


def register(op: str, backend: str, devices: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` and return ``fn`` unchanged.

    Args:
        op: the op's registry name (e.g. ``"sparse_decode"``, ``"sparse_decode_backward_weight"``); ``fn``
            takes the arguments the op's custom-op body passes (see ``sparsekern/ops/<op>.py``).
        backend: one of :data:`BACKEND_NAMES` (ValueError otherwise); registering again replaces it.
        devices: the device types ``fn`` accepts (e.g. ``("cuda",)``); None: any device.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = (fn, frozenset(devices) if devices else None)
        return fn

    return deco


def available() -> list[str]:
    """Backends usable in this process (built and importable), best first."""
    out = []
    if _load_native() is not None:
        out.append("cpp")
        if getattr(_native, "has_cuda", False) and torch.cuda.is_available():
            out.append("cuda")
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is not None and (
            torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        ):
            out.append("triton")
    except (ImportError, ValueError):
        pass
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and hasattr(torch.mps, "compile_shader"):
        out.append("metal")
    out.append("ref")
    return out


def forced_backend() -> str:
    """The backend forced by :func:`use_backend` or ``SPARSEKERN_BACKEND`` ('auto' if none)."""
    name = getattr(_local, "forced", None) or os.environ.get("SPARSEKERN_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(
            f"SPARSEKERN_BACKEND={name!r} is not a backend; expected auto or one of {BACKEND_NAMES}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` ('auto', 'cpp', 'cuda', 'triton', 'metal', 'ref') for ops called in this thread."""
    name = name.lower()
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected auto or one of {BACKEND_NAMES}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def has_triton() -> bool:
    """Whether triton is installed (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# The Triton backend registers for ("cuda", "cpu"); CPU tensors only run through Triton's
# interpreter, so "cpu" counts only while TRITON_INTERPRET=1 (read at call time, never in auto).
def _usable(backend: str, entry, device_type: str) -> bool:
    _, devices = entry
    if devices is not None and device_type not in devices:
        return False
    if backend == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return backend in available()


def select(op: str, device: torch.device) -> tuple[str, Callable]:
    """Pick (backend name, implementation) of ``op`` for tensors on ``device``."""
    impls = _IMPLS.get(op, {})
    forced = forced_backend()
    if forced != "auto":
        entry = impls.get(forced)
        if entry is None or not _usable(forced, entry, device.type):
            why = "not built or not importable" if forced not in available() else (
                f"it has no {op} for {device.type} tensors"
            )
            raise RuntimeError(
                f"sparsekern: backend {forced!r} was forced (SPARSEKERN_BACKEND/use_backend) "
                f"but {why}; available: {available()}"
            )
        return forced, entry[0]
    order = _OP_PRIORITY.get(op, {}).get(device.type) or _AUTO_PRIORITY.get(device.type, ("ref",))
    for name in order:
        entry = impls.get(name)
        if entry is not None and _usable(name, entry, device.type):
            return name, entry[0]
    return "ref", impls["ref"][0]


def implementations(op: str, device_type: str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device_type`` here (used by tests and benchmarks)."""
    return [n for n, e in _IMPLS.get(op, {}).items() if _usable(n, e, device_type)]


backends = available  # the name this function had before the module was public


class _CallableModule(types.ModuleType):
    """``sparsekern.backends()`` keeps working now that ``sparsekern.backends`` is this module."""

    def __call__(self) -> list[str]:
        return available()


sys.modules[__name__].__class__ = _CallableModule
