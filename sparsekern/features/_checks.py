"""Argument checks of FeatureStats' configuration (feature lists, the memory budget), on top of the generic
checks of :mod:`sparsekern.ops.validate` (which every other check of ``features`` uses directly)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from ..ops.validate import int_arg

GiB = 2**30

FeatureList = Union[Sequence[int], Tensor, None]


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
