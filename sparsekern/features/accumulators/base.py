"""The contract of every FeatureStats accumulator: state declared once, mergeable, saved by name.

An accumulator declares its state as named tensors (:meth:`Accumulator.layout`: shape, dtype, initial
value, and how two states combine). Written once here on that declaration: the empty state, ``state_dict``
(the tensors by name, as ``FeatureStats.save`` writes them), ``from_state_dict`` (checked against the
layout) and the element-wise part of ``merge`` (sum / max / min). A subclass writes ``_update`` (one
:class:`~.batch.FiringBatch`) and any merge that is not element-wise (``_merge``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from .batch import FiringBatch
from .config import FeatureStatsConfig

Device = Union[str, torch.device, None]


@dataclass(frozen=True)
class Field:
    """One named state tensor.

    shape: its shape. dtype: ``"float"`` (float64; float32 on MPS, which has no float64), ``"int64"``, or
    ``"count"`` (int32, promoted to int64 by its accumulator; both are read back). fill: initial value.
    merge: how ``merge`` combines two states: element-wise ``"sum"`` / ``"max"`` / ``"min"``, or
    ``"custom"`` (the accumulator's ``_merge`` does it).
    """

    shape: tuple[int, ...]
    dtype: str = "float"
    fill: float = 0.0
    merge: str = "sum"


def float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _empty(f: Field, device: torch.device) -> Tensor:
    dtype = {"float": float_dtype(device), "int64": torch.int64, "count": torch.int32}[f.dtype]
    return torch.full(f.shape, f.fill, dtype=dtype, device=device) if f.fill else \
        torch.zeros(f.shape, dtype=dtype, device=device)


class Accumulator:
    """Base of the mergeable parts of a :class:`~sparsekern.features.FeatureStats`.

    ``Accumulator(config, device=None, **options)`` is an empty state on ``device`` (default CPU).

    * ``update(batch)``: add one :class:`~.batch.FiringBatch`;
    * ``merge(other)``: add the state of ``other`` (same class and configuration) in place;
    * ``state_dict()``: ``{name: Tensor}`` as in :meth:`layout` (the state's own tensors, no copies);
    * ``from_state_dict(config, state, n_tokens=..., device=None, copy=True, **options)``: the inverse.

    ``n_tokens`` counts the rows (tokens) the state has seen; ``config`` is its
    :class:`~.config.FeatureStatsConfig`.
    """

    def __init__(self, config: FeatureStatsConfig, device: Device = None, **options: Any) -> None:
        dev = torch.device("cpu") if device is None else torch.device(device)
        self._init(config, {k: _empty(f, dev) for k, f in self.layout(config).items()}, 0, options)

    @classmethod
    def layout(cls, config: FeatureStatsConfig) -> dict[str, Field]:
        """The state tensors this accumulator keeps under ``config``, by name."""
        raise NotImplementedError

    def _init(self, config: FeatureStatsConfig, state: dict[str, Tensor], n_tokens: int,
              options: Mapping[str, Any]) -> None:
        self.config = config
        self._layout = self.layout(config)
        self._state = state
        self.n_tokens = int(n_tokens)
        self._setup(**options)

    def _setup(self) -> None:
        """Derived (not saved) attributes once the state is in place; subclasses take their options here."""

    # ---- the contract --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self._state.values())).device

    @property
    def float_dtype(self) -> torch.dtype:
        return float_dtype(self.device)

    @torch.no_grad()
    def update(self, batch: FiringBatch) -> None:
        """Add one batch (on this state's device)."""
        self._update(batch)
        self.n_tokens += batch.n_rows

    def _update(self, batch: FiringBatch) -> None:
        raise NotImplementedError

    def reserve(self, batch: FiringBatch) -> None:
        """Raise now (before any accumulator adds ``batch``) if this one could not add it."""

    def _settled(self) -> dict[str, Tensor]:
        """The state with any buffered work folded in (what ``merge`` reads of ``other``)."""
        return self._state

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: Tensor}`` of :meth:`layout`: the state's own tensors (clone before modifying them)."""
        return dict(self._settled())

    @classmethod
    def from_state_dict(cls, config: FeatureStatsConfig, state: Mapping[str, Tensor], *, n_tokens: int = 0,
                        device: Device = None, copy: bool = True, **options: Any) -> "Accumulator":
        """An accumulator holding ``state`` (the keys of :meth:`layout`, checked: names, shapes, dtypes).

        ``device``: where it lives (default: the tensors' device). Float tensors are converted to float64
        (float32 on MPS). ``copy=False`` takes tensors that need no conversion as its storage (no copy):
        the caller must not use them afterwards. ``options`` as the constructor's.
        """
        layout = cls.layout(config)
        names = set(state)
        if names != set(layout):
            raise ValueError(f"{cls.__name__} under this configuration keeps {sorted(layout)}; the state "
                             f"misses {sorted(set(layout) - names)} and holds unknown "
                             f"{sorted(names - set(layout))}")
        if device is None:
            device = next(iter(state.values())).device if state else torch.device("cpu")
        dev = torch.device(device)
        out = {}
        for name, f in layout.items():
            t = state[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"state[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != f.shape:
                raise ValueError(f"state[{name!r}] must have shape {f.shape}, got {tuple(t.shape)}")
            want = {"float": float_dtype(dev), "int64": torch.int64,
                    "count": t.dtype if t.dtype in (torch.int32, torch.int64) else None}[f.dtype]
            if want is None or t.is_floating_point() != (f.dtype == "float"):
                kind = "floating point" if f.dtype == "float" else "an int"
                raise TypeError(f"state[{name!r}] must be {kind} tensor, got {t.dtype}")
            out[name] = t.to(dev, want, copy=copy)
        obj = cls.__new__(cls)
        obj._init(config, out, n_tokens, options)
        return obj

    @torch.no_grad()
    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add the state of ``other`` (another split of the data; read on this state's device) in place;
        returns ``self``. TypeError for another class, ValueError naming configuration fields that differ."""
        if type(other) is not type(self):
            raise TypeError(f"{type(self).__name__}.merge expects a {type(self).__name__}, got "
                            f"{type(other).__name__}")
        self.config.check_same(other.config, type(self).__name__)
        theirs = {k: v.to(self.device) for k, v in other._settled().items()}
        self._merge(other, theirs)
        for name, f in self._layout.items():
            mine = self._state[name]
            if f.merge == "sum":
                mine.add_(theirs[name])
            elif f.merge == "max":
                torch.maximum(mine, theirs[name], out=mine)
            elif f.merge == "min":
                torch.minimum(mine, theirs[name], out=mine)
        self.n_tokens += other.n_tokens
        return self

    def _merge(self, other: "Accumulator", theirs: dict[str, Tensor]) -> None:
        """Combine the ``"custom"`` fields (and prepare the element-wise ones); ``theirs`` is ``other``'s
        state on this device. Runs before the element-wise merge and before ``n_tokens`` is added."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state.values())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_tokens={self.n_tokens}, tensors={sorted(self._state)}, "
                f"device={self.device})")


def need(flag: str, t: Optional[Tensor]) -> Tensor:
    """``t``, or ValueError naming the FeatureStats option that would have kept it."""
    if t is None:
        raise ValueError(f"not tracked: build FeatureStats with {flag}=...")
    return t


def nan_like(t: Tensor) -> Tensor:
    return torch.full_like(t, math.nan)
