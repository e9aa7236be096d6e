"""feature_topk_update: per-feature streaming top-k ("top activating examples").

For every SAE feature keep the k largest activations seen so far with their (sequence, position),
one batch of :class:`SparseActs` at a time, in O(d_sae * k) memory.

Semantics (identical on every backend, bit for bit):
  * candidates are the code entries with value > 0 after casting to the state's dtype (padding
    zeros of ``threshold_encode``, ReLU-clamped zeros of ``topk_encode`` and NaN never enter);
  * entries are ordered by (value desc, seq asc, pos asc): on equal values the smaller location
    wins, whatever the order the batches came in, so splitting a stream into batches never
    changes the result;
  * each touched feature row ends sorted in that order; a feature with fewer than k candidates
    so far keeps value -inf / location (-1, -1) in its remaining slots.

Custom op ``sparsekern::feature_topk_update_`` mutates the state tensors; the public function
is functional unless ``inplace=True``. No autograd (it is a selection over observed data).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import backends, ref
from ..sparse_acts import SparseActs
from . import validate as V

STATE_DTYPES = (torch.float32, torch.float64)
CUDA_MAX_K = 2048  # the CUDA kernel stages a state row in 48 KiB of shared memory


def _device_memory(dev: torch.device) -> int | None:
    """Total memory of ``dev`` in bytes (physical RAM for cpu/mps), or None if unknown."""
    try:
        if dev.type in ("cpu", "mps"):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if dev.type == "cuda" and torch.cuda.is_available():
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            return torch.cuda.get_device_properties(index).total_memory
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf (Windows), bad index
        pass
    return None


@dataclass(frozen=True)
class FeatureTopKState:
    """The k best examples of every feature.

    values:    Float[d_sae, k]    float32 (or float64), -inf in empty slots; rows sorted descending.
    locations: Int64[d_sae, k, 2] (seq, pos) of each value, (-1, -1) in empty slots.
    """

    values: Float[Tensor, "d_sae k"]
    locations: Int[Tensor, "d_sae k 2"]

    def __post_init__(self) -> None:
        V.tensor("FeatureTopKState.values", self.values, dim=2)
        V.tensor("FeatureTopKState.locations", self.locations, dim=3)
        if self.values.dtype not in STATE_DTYPES:
            raise TypeError(f"FeatureTopKState.values must be float32 or float64, got {self.values.dtype}")
        if self.locations.dtype != torch.int64:
            raise TypeError(f"FeatureTopKState.locations must be int64, got {self.locations.dtype}")
        d_sae, k = self.values.shape
        V.shape("FeatureTopKState.locations", self.locations, (d_sae, k, 2), "[d_sae, k, 2]")
        V.same_device("FeatureTopKState.locations", self.locations, "FeatureTopKState.values", self.values)
        if k < 1:
            raise ValueError("FeatureTopKState: k must be >= 1")

    @classmethod
    def empty(
        cls,
        d_sae: int,
        k: int,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "FeatureTopKState":
        """A state with nothing seen yet: values -inf, locations -1. (float64 is not available on MPS.)"""
        d_sae = V.int_arg("d_sae", d_sae, 1, 2**62)
        k = V.int_arg("k", k, 1, 2**31 - 1)
        if dtype not in STATE_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

        def full() -> tuple[Tensor, Tensor]:
            values = torch.full((d_sae, k), -math.inf, dtype=dtype, device=device)
            return values, torch.full((d_sae, k, 2), -1, dtype=torch.int64, device=device)

        if torch.compiler.is_compiling():  # traced: no host memory queries
            return cls(*full())
        dev = torch.device(device) if device is not None else torch.get_default_device()
        nbytes = d_sae * k * (dtype.itemsize + 16)  # values + int64 (seq, pos) locations
        what = (
            f"FeatureTopKState.empty(d_sae={d_sae}, k={k}) needs {nbytes / 2**30:,.1f} GiB "
            f"(values + locations) on {dev}"
        )
        # over the device's total memory it cannot work; checked before allocating because with
        # Linux overcommit the allocation may "succeed" and filling it gets the process killed
        limit = _device_memory(dev)
        if limit is not None and nbytes > limit:
            raise MemoryError(
                f"{what}, more than its {limit / 2**30:,.1f} GiB of memory; use a smaller d_sae or k"
            )
        try:
            values, locations = full()
        except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's c10::Error
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
                raise
            raise MemoryError(f"{what}; the allocator refused: {e}") from e
        return cls(values, locations)

    @property
    def d_sae(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def clone(self) -> "FeatureTopKState":
        """A contiguous copy."""
        fmt = torch.contiguous_format
        return FeatureTopKState(self.values.clone(memory_format=fmt), self.locations.clone(memory_format=fmt))

    def to(self, device: Union[str, torch.device]) -> "FeatureTopKState":
        return FeatureTopKState(self.values.to(device), self.locations.to(device))

    def count(self) -> Int[Tensor, "d_sae"]:
        """Filled slots per feature ``[d_sae]`` (0 for a feature never active)."""
        return (self.locations[..., 0] >= 0).sum(1)

    def __repr__(self) -> str:
        return f"FeatureTopKState(d_sae={self.d_sae}, k={self.k}, dtype={self.values.dtype}, device={self.device})"


# ---- backend implementations -------------------------------------------------------------
backends.register("feature_topk_update", "ref")(ref.feature_topk_update_)


@backends.register("feature_topk_update", "cpp", ("cpu",))
def _cpp(state_values, state_locations, values, indices, locations):
    backends.native().feature_topk_update(state_values, state_locations, values, indices, locations)


@backends.register("feature_topk_update", "cuda", ("cuda",))
def _cuda(state_values, state_locations, values, indices, locations):
    backends.native().feature_topk_update_cuda(state_values, state_locations, values, indices, locations)


# ---- custom op -----------------------------------------------------------------------------
@torch.library.custom_op("sparsekern::feature_topk_update_", mutates_args=("state_values", "state_locations"))
def _feature_topk_update_(
    state_values: Tensor, state_locations: Tensor, values: Tensor, indices: Tensor, locations: Tensor
) -> None:
    # value checks here, not in the public fn: op bodies see real tensors even under torch.compile
    V.index_range("acts.indices", indices, state_values.shape[0])
    if locations.numel() and V.has_data(locations) and int(locations.min()) < 0:
        raise ValueError("locations must be >= 0 ((-1, -1) marks an empty slot)")
    _, impl = backends.select("feature_topk_update", state_values.device)
    impl(state_values, state_locations, values, indices, locations)


@_feature_topk_update_.register_fake
def _(state_values, state_locations, values, indices, locations):
    return None


# ---- public API ----------------------------------------------------------------------------
def _locations(acts: SparseActs, locations, seq_offset: int, rows: int) -> Tensor:
    lead = tuple(acts.shape[:-1])
    if locations is None:
        if len(lead) != 2:
            raise ValueError(
                "locations=None needs acts of shape [batch, pos, k] (location = (seq_offset + b, p)); "
                f"got acts {tuple(acts.shape)}: pass locations [rows, 2] instead"
            )
        seq_offset = V.int_arg("seq_offset", seq_offset, 0, 2**62)
        b, p = lead
        seq = torch.arange(seq_offset, seq_offset + b, device=acts.device).repeat_interleave(p)
        pos = torch.arange(p, device=acts.device).repeat(b)
        return torch.stack([seq, pos], 1)
    V.tensor("locations", locations)
    if locations.dtype != torch.int64:
        raise TypeError(f"locations must be int64 (seq, pos) pairs, got {locations.dtype}")
    if tuple(locations.shape) not in ((rows, 2), lead + (2,)):
        raise ValueError(
            f"locations must have shape [rows, 2]=({rows}, 2) or [*lead, 2]={lead + (2,)} for acts "
            f"{tuple(acts.shape)}, got {tuple(locations.shape)}"
        )
    V.same_device("locations", locations, "acts", acts.values)
    return locations.reshape(rows, 2).contiguous()  # values >= 0: checked in the op body


def feature_topk_update(
    state: FeatureTopKState,
    acts: SparseActs,
    locations: Optional[Int[Tensor, "rows 2"]] = None,
    *,
    seq_offset: int = 0,
    inplace: bool = False,
) -> FeatureTopKState:
    """Merge one batch of sparse codes into the per-feature top-k ``state``.

    Args:
        state: :class:`FeatureTopKState` ``values [d_sae, k]``, ``locations [d_sae, k, 2]``.
        acts: :class:`SparseActs` ``[..., k_code]`` on the state's device, indices in ``[0, d_sae)``;
            leading dims flatten to rows.
        locations: int64 ``[rows, 2]`` (or ``[..., 2]`` matching acts' leading dims): the
            (seq, pos) of each row, all >= 0. If None, acts must be ``[batch, pos, k_code]`` and
            row (b, p) gets location ``(seq_offset + b, p)``.
        seq_offset: first sequence number of this batch when ``locations`` is None.
        inplace: update ``state``'s tensors in place (and return it) instead of a copy.

    Returns the updated state. Candidates are entries with value > 0; ties go to the smaller
    (seq, pos) (see the module docstring). Values are compared after casting to the state's dtype.
    On CUDA, k <= 2048 (a state row is staged in shared memory).
    """
    if not isinstance(state, FeatureTopKState):
        raise TypeError(f"state must be a FeatureTopKState, got {type(state).__name__}")
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be a SparseActs, got {type(acts).__name__}")
    V.floating("acts.values", acts.values)
    V.same_device("acts", acts.values, "state", state.values)
    if state.device.type == "cuda" and state.k > CUDA_MAX_K:
        raise ValueError(f"state.k={state.k}: the CUDA kernel supports k <= {CUDA_MAX_K}")
    kc = acts.k
    rows = math.prod(acts.shape[:-1])
    indices = V.indices("acts.indices", acts.indices, acts.shape, state.d_sae, state.device)
    loc = _locations(acts, locations, seq_offset, rows)
    values = acts.values.reshape(rows, kc).to(state.values.dtype).contiguous()
    indices = indices.reshape(rows, kc).contiguous()
    if inplace and not (state.values.is_contiguous() and state.locations.is_contiguous()):
        raise ValueError("inplace=True needs contiguous state tensors (use state.clone())")
    out = state if inplace else state.clone()
    if rows and kc:
        _feature_topk_update_(out.values, out.locations, values, indices, loc)
    return out
