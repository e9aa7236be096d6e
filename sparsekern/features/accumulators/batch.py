"""One batch of a sparse code, checked and flattened once, as every FeatureStats accumulator reads it.

**Firing.** A slot fires iff its value is ``> 0`` (SAELens's ``acts > 0``); zeros (padding), negative
values and NaN count nowhere, so each statistic equals that of the dense code ``relu(acts)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ...sparse_acts import SparseActs, dense_to_sparse
from .._pairs import sorted_live


class FiringBatch(NamedTuple):
    """The firing slots of ``N`` rows (tokens) of a code over ``F`` features.

    values, indices: ``[N, k]`` the code (any float dtype; int64 ids in ``[0, F)``).
    live:    ``[N, k]`` bool, ``values > 0``.
    key:     ``[N, L]`` int64: each row's firing ids ascending, then ``F`` (L = most firing slots in a row).
    feature, value, row: ``[M]`` the firing slots: id, value (in the state's float dtype), row.
    counts:  ``[F]`` int64 firing count of each feature in the batch.
    y:       ``[N, d_y]`` the activation the conditioned statistics read, or None.
    """

    values: Tensor
    indices: Tensor
    live: Tensor
    key: Tensor
    feature: Tensor
    value: Tensor
    row: Tensor
    counts: Tensor
    y: Optional[Tensor]

    @property
    def n_rows(self) -> int:
        return self.values.shape[0]

    @classmethod
    def build(cls, values: Tensor, indices: Tensor, y: Optional[Tensor], d_sae: int,
              float_dtype: torch.dtype) -> "FiringBatch":
        """From checked ``[N, k]`` rows (see :func:`check_code`); ValueError if a feature fires twice in a
        row."""
        live = values > 0
        key = sorted_live(indices, live, d_sae)
        if key.shape[1] > 1:
            dup = (key[:, 1:] == key[:, :-1]) & (key[:, 1:] < d_sae)
            if bool(dup.any()):
                row = int(dup.any(1).nonzero()[0])
                raise ValueError(f"acts row {row} has a feature firing in two slots: each feature may appear "
                                 "at most once per row with a value > 0 (padding slots must have value 0)")
        flat = live.reshape(-1)
        feature = indices.reshape(-1)[flat]
        value = values.reshape(-1)[flat].to(float_dtype)
        row = flat.nonzero().squeeze(1).div_(max(1, values.shape[1]), rounding_mode="floor")
        counts = torch.bincount(feature, minlength=d_sae)
        return cls(values, indices, live, key, feature, value, row, counts, y)


def check_code(acts: Union[SparseActs, Tensor], d_sae: int,
               device: Optional[torch.device]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``(values [N, k], indices [N, k], leading dims)`` of a :class:`SparseActs` ``[..., k]`` or a dense
    ``[..., d_sae]`` code; ``device``: where the state lives (None: not fixed yet)."""
    if isinstance(acts, Tensor):
        if acts.dim() < 1 or acts.shape[-1] != d_sae:
            raise ValueError(f"a dense code must be [..., d_sae={d_sae}], got {tuple(acts.shape)}")
        acts = dense_to_sparse(acts)
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be SparseActs or a dense [..., d_sae] tensor, got {type(acts).__name__}")
    if not acts.values.is_floating_point():
        raise TypeError(f"acts.values must be floating point, got {acts.values.dtype}")
    if device is not None and acts.device != device:
        raise ValueError(f"acts are on {acts.device} but this FeatureStats lives on {device}; "
                         f"move them with acts.to({str(device)!r})")
    lead = tuple(acts.shape[:-1])
    n = math.prod(lead)
    values, indices = acts.values.reshape(n, acts.k), acts.indices.reshape(n, acts.k)
    if indices.numel():
        lo, hi = torch.stack((indices.min(), indices.max())).tolist()
        if lo < 0 or hi >= d_sae:
            raise ValueError(f"acts.indices lie in [{lo}, {hi}], outside [0, d_sae={d_sae}): "
                             "codes of an SAE with a different d_sae?")
    return values, indices, lead


def check_y(y: Optional[Tensor], d_y: Optional[int], lead: tuple[int, ...],
            device: torch.device) -> Optional[Tensor]:
    """``y`` as ``[N, d_y]`` rows aligned with the code's, or None; ValueError/TypeError on a mismatch."""
    if d_y is None:
        if y is not None:
            raise ValueError("y was given but this FeatureStats has no conditioned_on=d_y")
        return None
    if y is None:
        raise ValueError(f"y [..., d_y={d_y}] is required: this FeatureStats has conditioned_on={d_y}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"y must be floating point, got {y.dtype}")
    if tuple(y.shape) != (*lead, d_y):
        raise ValueError(
            f"y must be [..., d_y] = {(*lead, d_y)} (the code's leading dims), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"y is on {y.device} but acts are on {device}; they must match")
    return y.reshape(-1, d_y)
