"""Argument checks shared by the public ops and the analysis on top of them (``sparsekern.features``):
each raises a clear TypeError/ValueError naming the argument and what was expected, never a native crash.

Generic checks: :func:`tensor` (type, optional rank), :func:`floating`, :func:`same_dtype`,
:func:`same_device`, :func:`shape`, :func:`companion`, :func:`int_arg`. The ops' own: :func:`indices`,
:func:`index_range` (called in op bodies, skipped under :func:`own_indices`), :func:`threshold`,
:func:`finite_threshold`, :func:`encoder_args`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Iterator

import torch
from torch import Tensor

from ..tracing import has_data  # noqa: F401  (re-exported: V.has_data)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor(name: str, t, *, dim: int | None = None, min_dim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    return t


def floating(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/bfloat16/float16, got {t.dtype}")


def same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def shape(name: str, t: Tensor, expected: tuple[int, ...], desc: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {desc}={tuple(expected)}, got {tuple(t.shape)}")


def companion(name: str, t, ref_name: str, ref: Tensor, expected: tuple[int, ...], desc: str) -> Tensor:
    """A parameter tensor that must match ``ref`` in dtype/device and have an exact shape."""
    tensor(name, t)
    shape(name, t, expected, desc)
    same_dtype(name, t, ref_name, ref)
    same_device(name, t, ref_name, ref)
    return t


def int_arg(name: str, v, lo: int, hi: int = 2**62) -> int:
    """``int(v)``; TypeError unless an int (bools refused), ValueError unless ``lo <= v <= hi``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= {name} <= {hi}, got {v}")
    return v


_own = threading.local()


@contextlib.contextmanager
def own_indices() -> Iterator[None]:
    """Skip :func:`index_range` in this thread for indices an encoder just produced (its backward
    reuses ``sparse_decode``): they are in range by construction, and the check costs a GPU sync."""
    prev = getattr(_own, "on", False)
    _own.on = True
    try:
        yield
    finally:
        _own.on = prev


def index_range(name: str, idx: Tensor, d_sae: int) -> None:
    """ValueError unless every index is in [0, d_sae). Called from the custom-op bodies (one sync)."""
    if idx.numel() and has_data(idx) and not getattr(_own, "on", False):
        lo, hi = torch.stack((idx.min(), idx.max())).tolist()
        if lo < 0 or hi >= d_sae:
            raise ValueError(f"{name} must lie in [0, d_sae={d_sae}), found values in [{lo}, {hi}]")


def finite_threshold(thr: Tensor) -> None:
    """ValueError on NaN/inf thresholds. Called from the threshold_encode op body (needs data)."""
    if has_data(thr) and not bool(torch.isfinite(thr).all()):
        raise ValueError("threshold must be finite everywhere (found NaN or inf)")


def indices(name: str, idx, values_shape: torch.Size, d_sae: int, device: torch.device) -> Tensor:
    """int64 (or int32, widened) indices of the same shape as values.

    The value range [0, d_sae) is checked by :func:`index_range` in the op body: a check here
    would be a data-dependent branch that breaks ``torch.compile(fullgraph=True)`` and meta tensors.
    """
    tensor(name, idx)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {idx.dtype}")
    if idx.shape != values_shape:
        raise ValueError(
            f"{name} has shape {tuple(idx.shape)} but values has {tuple(values_shape)}; "
            "they must match ([..., k])"
        )
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but values is on {device}")
    return idx.long()


def threshold(thr, d_sae: int, ref: Tensor) -> Tensor:
    """Scalar or [d_sae] threshold -> [d_sae] tensor in the accumulation dtype.

    Finiteness of a tensor threshold is checked in the op body (:func:`finite_threshold`).
    """
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    if isinstance(thr, Tensor):
        # one-element tensors too: a silent cross-device copy would hide a misplaced tensor (and sync)
        if thr.device != ref.device:
            raise ValueError(
                f"threshold is on {thr.device} but x is on {ref.device}; pass a float or a tensor on "
                f"{ref.device}"
            )
        if thr.dim() == 0 or thr.numel() == 1 and thr.dim() <= 1:
            thr = thr.reshape(()).to(dtype=acc).expand(d_sae)
        else:
            shape("threshold", thr, (d_sae,), "[d_sae]")
            floating("threshold", thr)
            thr = thr.to(acc)
    elif isinstance(thr, numbers.Real) and not isinstance(thr, bool):
        if not math.isfinite(float(thr)):
            raise ValueError(f"threshold must be finite, got {thr}")
        thr = torch.full((d_sae,), float(thr), dtype=acc, device=ref.device)
    else:
        raise TypeError(f"threshold must be a float or a [d_sae] tensor, got {type(thr).__name__}")
    return thr.contiguous()


def encoder_args(x, W_enc, b_enc, b_dec) -> tuple[Tensor, int, int]:
    """Check x [..., d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in]|None.

    Returns (x flattened to [N, d_in], d_in, d_sae).
    """
    tensor("x", x, min_dim=1)
    floating("x", x)
    tensor("W_enc", W_enc, dim=2)
    d_in, d_sae = W_enc.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x has last dim {x.shape[-1]} but W_enc is [d_in, d_sae]={tuple(W_enc.shape)}; "
            "x must be [..., d_in]"
        )
    if d_sae == 0:
        raise ValueError("W_enc has d_sae=0 features")
    same_dtype("W_enc", W_enc, "x", x)
    same_device("W_enc", W_enc, "x", x)
    companion("b_enc", b_enc, "x", x, (d_sae,), "[d_sae]")
    if b_dec is not None:
        companion("b_dec", b_dec, "x", x, (d_in,), "[d_in]")
    return x.reshape(math.prod(x.shape[:-1]), d_in), d_in, d_sae
