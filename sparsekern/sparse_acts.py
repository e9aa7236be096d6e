"""`SparseActs`: the sparse code every sparsekern encoder returns and every decoder accepts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._tracing import has_data


@dataclass(frozen=True)
class SparseActs:
    """A sparse SAE code as a dense pair of `[..., k]` tensors.

    values:  Float[..., k]  activation of each kept feature; padding slots hold exactly 0.
    indices: Int64[..., k]  feature id of each slot, always in ``[0, d_sae)`` (padding slots too).

    Leading dims are preserved: an encoder fed ``[batch, pos, d_in]`` returns ``[batch, pos, k]``.
    """

    values: Float[Tensor, "*batch k"]
    indices: Int[Tensor, "*batch k"]

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor) or not isinstance(self.indices, Tensor):
            raise TypeError("SparseActs: values and indices must be torch.Tensor")
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"SparseActs: values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape [..., k]"
            )
        if self.indices.dtype != torch.int64:
            raise TypeError(f"SparseActs: indices must be int64, got {self.indices.dtype}")
        if self.values.dim() < 1:
            raise ValueError("SparseActs: values/indices need at least one dim ([..., k])")

    # tuple-like so `values, indices = acts` works
    def __iter__(self):
        return iter((self.values, self.indices))

    @property
    def shape(self) -> torch.Size:
        """Shape ``[..., k]`` of the pair."""
        return self.values.shape

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, *args, **kwargs) -> "SparseActs":
        """Move/cast like ``Tensor.to``; a dtype applies to ``values`` only (indices stay int64)."""
        values = self.values.to(*args, **kwargs)
        indices = self.indices.to(device=values.device)
        return SparseActs(values, indices)

    def l0(self) -> Int[Tensor, "*batch"]:
        """Number of non-zero activations per row, shape ``[...]`` (int64)."""
        return (self.values != 0).sum(-1)

    def to_dense(self, d_sae: int) -> Float[Tensor, "*batch d_sae"]:
        """Scatter into a dense ``[..., d_sae]`` tensor (padding slots add 0)."""
        if d_sae <= 0:
            raise ValueError(f"to_dense: d_sae must be positive, got {d_sae}")
        idx = self.indices
        if idx.numel() and has_data(idx):
            lo, hi = torch.stack((idx.min(), idx.max())).tolist()
            if lo < 0 or hi >= d_sae:
                raise ValueError(
                    f"to_dense: indices in [{lo}, {hi}] are out of range for d_sae={d_sae} "
                    f"(they must lie in [0, {d_sae}))"
                )
        elif idx.numel() and torch.compiler.is_compiling() and idx.device.type == "cpu":
            # traced: no host sync, the assert runs with the graph (CPU only: on CUDA it would be
            # a device-side assert, no better than scatter's own)
            ok = ((idx >= 0) & (idx < d_sae)).all()
            msg = f"to_dense: indices out of range for d_sae={d_sae} (must lie in [0, {d_sae}))"
            torch._assert_async(ok, msg)
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        # scatter_add so duplicate padding indices (value 0) never overwrite a real value
        return out.scatter_add_(-1, self.indices, self.values)

    def __repr__(self) -> str:
        return f"SparseActs(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
