"""Argument checks of the feature helpers (geometry, FeatureStats): each raises TypeError/ValueError naming
the argument and what was expected. Kept here so ``features`` needs no private module of ``ops``."""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GiB = 2**30

FeatureList = Union[Sequence[int], Tensor, None]


def int_arg(name: str, v: Any, lo: int, hi: int = 2**62) -> int:
    """``int(v)``; TypeError unless an int (bools refused), ValueError unless ``lo <= v <= hi``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= {name} <= {hi}, got {v}")
    return int(v)


def tensor(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/bfloat16/float16, got {t.dtype}")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def feature_tuple(name: str, feats: FeatureList, d_sae: int) -> Optional[tuple[int, ...]]:
    """Distinct feature ids in ``[0, d_sae)`` as a tuple (None stays None)."""
    if feats is None:
        return None
    ids = feats.tolist() if isinstance(feats, Tensor) else list(feats)
    if not ids:
        raise ValueError(f"{name} must name at least one feature")
    for f in ids:
        int_arg(f"{name} entries", f, 0, d_sae - 1)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} has repeated feature ids")
    return tuple(int(f) for f in ids)


def memory(what: str, nbytes: int, budget: int, hint: str) -> None:
    """ValueError if ``nbytes`` exceed the ``memory_budget``."""
    if nbytes > budget:
        raise ValueError(
            f"{what} needs {nbytes / GiB:.2f} GiB > memory_budget={budget / GiB:.2f} GiB; {hint}")
