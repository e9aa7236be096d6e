"""`SparseActs`: the sparse code every sparsekern encoder returns and every decoder accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .tracing import has_data


@dataclass(frozen=True)
class SparseActs:
    """A sparse SAE code as a dense pair of `[..., k]` tensors.

    values:  Float[..., k]  activation of each kept feature; padding slots hold exactly 0.
    indices: Int64[..., k]  feature id of each slot, always in ``[0, d_sae)`` (padding slots too).

    Leading dims are preserved: an encoder fed ``[batch, pos, d_in]`` returns ``[batch, pos, k]``.
    Tensor-like where TransformerLens's ``ActivationCache`` utilities need it: ``shape``/``ndim``/
    ``size()``/``dim()`` (k included), indexing of the leading dims, ``to``/``cpu``/``cuda``/
    ``detach``/``clone``.
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

    @property
    def ndim(self) -> int:
        """Number of dims of ``[..., k]`` (the k dim included, as ``shape``)."""
        return self.values.dim()

    def dim(self) -> int:
        return self.values.dim()

    def size(self, dim: Optional[int] = None) -> Union[torch.Size, int]:
        """``shape`` (or ``shape[dim]``), as ``Tensor.size``."""
        return self.values.size() if dim is None else self.values.size(dim)

    def __getitem__(self, key: Any) -> "SparseActs":
        """Index the leading dims, as a tensor of shape ``[...]`` would be: ``acts[0, -1]`` is the
        ``SparseActs [k]`` of sequence 0, last position. Ints, slices, ``None``, ``...``, int/bool
        tensors, lists and numpy arrays work as in torch; an ``...`` spans leading dims only.

        The k dim holds unordered slots, not features, so it cannot be indexed: a key may reach it
        only with a full ``:`` (what TransformerLens's ``Slice.apply`` passes for untouched dims).
        """
        key = key if isinstance(key, tuple) else (key,)
        lead = self.values.dim() - 1
        if any(k is Ellipsis for k in key):
            # the ellipsis must not swallow the k dim: pin k with a trailing full slice
            key = (*key, slice(None))
            if _consumed(key) > lead + 1:
                raise IndexError(
                    f"SparseActs: too many indices for leading dims {tuple(self.values.shape[:-1])}"
                )
        else:
            used = _consumed(key)
            if used == lead + 1 and _is_full_slice(key[-1]):
                key = key[:-1]  # an explicit ':' on the k dim
            elif used > lead:
                raise IndexError(
                    f"SparseActs: the key indexes {used} dims but only the {lead} leading dims "
                    f"{tuple(self.values.shape[:-1])} can be indexed (the last, k, only with ':'); "
                    "index .values / .indices directly to select slots"
                )
        return SparseActs(self.values[key], self.indices[key])

    def to(self, *args, **kwargs) -> "SparseActs":
        """Move/cast like ``Tensor.to``; a dtype applies to ``values`` only (indices stay int64)."""
        values = self.values.to(*args, **kwargs)
        indices = self.indices.to(device=values.device)
        return SparseActs(values, indices)

    def cpu(self) -> "SparseActs":
        return SparseActs(self.values.cpu(), self.indices.cpu())

    def cuda(
        self, device: Union[None, int, str, torch.device] = None, non_blocking: bool = False
    ) -> "SparseActs":
        return SparseActs(self.values.cuda(device, non_blocking), self.indices.cuda(device, non_blocking))

    def detach(self) -> "SparseActs":
        return SparseActs(self.values.detach(), self.indices.detach())

    def clone(self) -> "SparseActs":
        return SparseActs(self.values.clone(), self.indices.clone())

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


def _is_full_slice(k: Any) -> bool:
    return isinstance(k, slice) and k == slice(None)


def _consumed(key: tuple) -> int:
    """How many dims of the indexed tensor ``key`` uses up (torch rules: a bool mask uses its ndim)."""
    n = 0
    for k in key:
        if k is None or k is Ellipsis or isinstance(k, bool):  # these add or span dims
            continue
        dtype = getattr(k, "dtype", None)
        is_bool = dtype == torch.bool or str(dtype) == "bool"  # a bool tensor or numpy mask
        n += getattr(k, "ndim", 1) if is_bool else 1
    return n


def dense_to_sparse(acts: Float[Tensor, "*batch d_sae"]) -> SparseActs:
    """Non-zeros of a dense code as :class:`SparseActs` (k = max row L0, ascending feature order)."""
    nz = acts != 0
    k = int(nz.sum(-1).max()) if acts.numel() else 0
    # stable sort puts the non-zero positions first, in index order; padding points at zeros
    idx = torch.sort((~nz).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    vals = acts.gather(-1, idx)
    return SparseActs(torch.where(vals != 0, vals, torch.zeros_like(vals)), idx)
