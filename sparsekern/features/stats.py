"""Streaming per-feature statistics of SAE codes (``FeatureStats``) and a driver over a model/SAE.

Everything is a segmented reduction over the sparse code of one batch at a time:

* per feature: firing count, sum, sum of squares, max and min of the activation, and a histogram on
  log-spaced bins (quantiles);
* co-occurrence: exact counts of features firing on the same token, in a dense ``[F, F]`` int32 table,
  a ``[S, S]`` table over a feature subset, or a per-feature sketch of the heaviest partners;
* conditioned statistics of another activation ``y`` (MLP neurons, another SAE's code, ...):
  ``sum_t a_f(t) y(t)`` and ``#{t: f fires, y(t) > 0}`` (``[F, d_y]``, through the ``sparse_decode``
  weight-gradient kernel), optionally ``sum_{t: f fires} y(t)``, second moments of ``y`` given chosen
  features, and the overall mean/covariance of ``y``.

**Firing.** A slot fires iff its value is ``> 0`` (SAELens's ``acts > 0``). Zeros (padding), negative
values (a JumpReLU with a negative threshold) and NaN are ignored by *every* statistic, so each one
equals the same statistic of the dense code ``relu(acts)``. States merge exactly (``merge``), which is
how a dataset is split across processes, and save/load with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hook_names import stop_layer
from ..ops.sparse_decode import _backward_weight
from ..sparse_acts import SparseActs, dense_to_sparse
from ._pairs import (
    MIRROR_BLOCK,
    Sketch,
    mirror_upper,
    pair_ids,
    sketch_combine,
    sketch_empty,
    sketch_entries,
    sorted_live,
)

__all__ = ["FeatureStats", "PartnerCounts", "feature_stats", "sae_fingerprint"]

INT32_MAX = 2**31 - 1
_FORMAT = "sparsekern.FeatureStats"
_VERSION = 1
_FLUSH_SLOTS_PER_FEATURE = 8  # conditioned stats: reduce pending rows once they hold 8 F slots ...
_PENDING_BYTES = 64 << 20  # ... or 64 MiB
_ADD_BLOCK = 1 << 20  # elements per block when adding a kernel output into the state
_COUNT_ROWS = 1 << 24  # rows per float32 count kernel call: float32 counts are exact below 2^24
_GiB = 2**30

Device = Union[str, torch.device, None]
FeatureList = Union[Sequence[int], Tensor, None]
Rows = Union[Tensor, Sequence[int], slice, None]


class PartnerCounts(NamedTuple):
    """Heaviest co-firing partners of each row feature (see :meth:`FeatureStats.top_partners`).

    features:       Int64[R]     feature id of each row.
    partners:       Int64[R, n]  partner feature ids, by ``upper`` descending (ties: lower id); -1 = none.
    lower, upper:   Int64[R, n]  bounds on the pair count C[i, j]: ``lower <= C <= upper`` (exact iff equal).
    unlisted_bound: Int64[R]     every partner not listed co-fired at most this many times with the row.
    """

    features: Tensor
    partners: Tensor
    lower: Tensor
    upper: Tensor
    unlisted_bound: Tensor


@dataclass(frozen=True)
class _Config:
    """Everything that fixes the meaning and layout of the state; two states merge iff these are equal."""

    d_sae: int
    histogram: bool
    hist_range: tuple[float, float]
    hist_bins: int
    cooccurrence: str  # "none" | "dense" | "subset" | "sketch"
    cooccurrence_features: Optional[tuple[int, ...]]
    partner_capacity: int
    conditioned_on: Optional[int]
    conditioned_counts: bool
    conditioned_sum: bool
    y_moments: bool
    second_moment_features: Optional[tuple[int, ...]]
    second_moment_weighting: str
    source: Optional[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "_Config":
        d = json.loads(s)
        d["hist_range"] = tuple(d["hist_range"])
        for key in ("cooccurrence_features", "second_moment_features"):
            if d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# ---- argument checks ---------------------------------------------------------------------------
def _int(name: str, v: Any, lo: int, hi: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= {name} <= {hi}, got {v}")
    return int(v)


def _feature_tuple(name: str, feats: FeatureList, d_sae: int) -> Optional[tuple[int, ...]]:
    if feats is None:
        return None
    ids = feats.tolist() if isinstance(feats, Tensor) else list(feats)
    if not ids:
        raise ValueError(f"{name} must name at least one feature")
    for f in ids:
        _int(f"{name} entries", f, 0, d_sae - 1)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} has repeated feature ids")
    return tuple(int(f) for f in ids)


def _budget_check(what: str, nbytes: int, budget: int, hint: str) -> None:
    if nbytes > budget:
        raise ValueError(
            f"{what} needs {nbytes / _GiB:.2f} GiB > memory_budget={budget / _GiB:.2f} GiB; {hint}"
        )


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    """Per-batch partial sums: float64 stays float64 (the oracle dtype), anything else accumulates in
    float32; the running state is float64 either way (see the module docstring of FeatureStats)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ---- the accumulator --------------------------------------------------------------------------------
class FeatureStats:
    """Streaming statistics of a sparse code with ``d_sae`` features; ``update`` with batches, ``merge``
    states of disjoint splits (exact), ``save``/``load`` with safetensors.

    Args:
        d_sae: number of features F.
        histogram: keep ``hist_counts [F, hist_bins + 2]``: per feature, counts of firing values in
            ``[0, lo)`` (underflow), ``hist_bins`` log-spaced bins over ``hist_range = (lo, hi)``, and
            ``[hi, inf)`` (overflow). Bin edges: :attr:`hist_edges`. Gives :meth:`quantiles`.
        cooccurrence: count pairs of features firing on the same token in a dense ``[F, F]`` table
            (int32; refused if ``4 F^2`` bytes exceed ``memory_budget``).
        cooccurrence_features: ``[S]`` feature ids: count pairs only among these (``[S, S]`` table). Implies
            co-occurrence.
        top_partners: n: per feature keep a sketch of its heaviest partners instead of a table (for F
            whose ``[F, F]`` table does not fit); ``partner_capacity`` m >= n slots per feature (default
            4 n). See :meth:`top_partners` for what is exact. Implies co-occurrence.
        memory_budget: bytes allowed for the co-occurrence state (default 4 GiB).
        conditioned_on: d_y: ``update`` then takes ``y [..., d_y]`` aligned with the code's rows and keeps
            ``cond_act_sum [F, d_y] = sum_t a_f(t) y(t)`` (float64) and
            ``cond_pos_count [F, d_y] = #{t: f fires, y(t) > 0}`` (int64).
        conditioned_counts: keep ``cond_pos_count`` (default; it costs as much again as ``cond_act_sum``).
        conditioned_sum: also keep ``cond_sum [F, d_y] = sum_{t: f fires} y(t)`` (float64).
        y_moments: also keep the mean and covariance of ``y`` over all tokens (:meth:`y_mean`,
            :meth:`y_covariance`), merged with Chan's formula (no catastrophic cancellation).
        second_moment_features: ``[S]`` feature ids: keep ``cond_second_moment [S, d_y, d_y] =
            sum_{t: f_s fires} w_s(t) y(t) y(t)^T`` with ``w_s = a_{f_s}`` (``second_moment_weighting=
            "activation"``) or ``w_s = 1`` (``"indicator"``).
        source: free text naming what produced the codes (``feature_stats`` sets it to the SAE's
            fingerprint and hooks); ``merge`` refuses states with different sources.
        device: where the state lives; default: the device of the first ``update``.

    State (read-only attributes; derived quantities are methods):
        n_tokens: rows seen. counts [F] int64: tokens on which each feature fires. act_sum, act_sq_sum [F]:
        sums of a and a^2 over those tokens. act_max [F] (0 if never fired), act_min [F] (inf if never
        fired). hist_counts [F, hist_bins + 2] int64. cooccurrence [R, R] (pair tables) or
        :meth:`top_partners` (sketch). cond_act_sum, cond_pos_count, cond_sum [F, d_y]; cond_second_moment
        [S, d_y, d_y] for :attr:`second_moment_features`.

    Dtypes: per-feature counts int64, float sums float64 (float32 on MPS, which has no float64), pair
    tables int32 (promoted to int64 in place once a count could pass 2^31 - 1, or OverflowError if the
    promoted table would exceed ``memory_budget``). Per-batch partial sums of float32/bf16/fp16 inputs
    are taken in float32 and added to the float64 state (float64 inputs stay float64 throughout).
    """

    def __init__(
        self,
        d_sae: int,
        *,
        histogram: bool = True,
        hist_range: tuple[float, float] = (1e-4, 1e4),
        hist_bins: int = 128,
        cooccurrence: bool = False,
        cooccurrence_features: FeatureList = None,
        top_partners: Optional[int] = None,
        partner_capacity: Optional[int] = None,
        memory_budget: int = 4 * _GiB,
        conditioned_on: Optional[int] = None,
        conditioned_counts: bool = True,
        conditioned_sum: bool = False,
        y_moments: bool = False,
        second_moment_features: FeatureList = None,
        second_moment_weighting: str = "activation",
        source: Optional[str] = None,
        device: Device = None,
    ) -> None:
        d_sae = _int("d_sae", d_sae, 1)
        memory_budget = _int("memory_budget", memory_budget, 0)
        lo, hi = (float(x) for x in hist_range)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"hist_range must be (lo, hi) with 0 < lo < hi < inf, got {hist_range}")
        hist_bins = _int("hist_bins", hist_bins, 1, 1 << 16)
        co_feats = _feature_tuple("cooccurrence_features", cooccurrence_features, d_sae)
        if co_feats is not None and top_partners is not None:
            raise ValueError("pass cooccurrence_features (a subset table) or top_partners (a sketch), "
                             "not both")
        mode, capacity = "none", 0
        if top_partners is not None:
            top_partners = _int("top_partners", top_partners, 1)
            capacity = 4 * top_partners if partner_capacity is None else partner_capacity
            capacity = _int("partner_capacity", capacity, top_partners)
            mode = "sketch"
            _budget_check(f"a partner sketch [F={d_sae}, m={capacity}] (3 int64 each)", 24 * d_sae * capacity,
                          memory_budget, "lower top_partners/partner_capacity or raise memory_budget")
        elif co_feats is not None:
            mode = "subset"
            s = len(co_feats)
            _budget_check(f"a [{s}, {s}] int32 co-occurrence table", 4 * s * s, memory_budget,
                          "pass fewer cooccurrence_features or raise memory_budget")
        elif cooccurrence:
            mode = "dense"
            _budget_check(
                f"a dense [{d_sae}, {d_sae}] int32 co-occurrence table", 4 * d_sae * d_sae, memory_budget,
                "pass cooccurrence_features=[...] (exact counts on a subset), top_partners=n (each "
                "feature's heaviest partners) or a larger memory_budget",
            )
        elif partner_capacity is not None:
            raise ValueError("partner_capacity needs top_partners")
        if conditioned_on is not None:
            conditioned_on = _int("conditioned_on", conditioned_on, 1)
        elif conditioned_sum or y_moments or second_moment_features is not None:
            raise ValueError("conditioned_sum, y_moments and second_moment_features need conditioned_on=d_y")
        if second_moment_weighting not in ("activation", "indicator"):
            raise ValueError(
                "second_moment_weighting must be 'activation' or 'indicator', "
                f"got {second_moment_weighting!r}"
            )
        if source is not None and not isinstance(source, str):
            raise TypeError(f"source must be a str or None, got {type(source).__name__}")
        cfg = _Config(
            d_sae=d_sae, histogram=bool(histogram), hist_range=(lo, hi), hist_bins=hist_bins,
            cooccurrence=mode, cooccurrence_features=co_feats, partner_capacity=capacity,
            conditioned_on=conditioned_on,
            conditioned_counts=bool(conditioned_counts) and conditioned_on is not None,
            conditioned_sum=bool(conditioned_sum), y_moments=bool(y_moments),
            second_moment_features=_feature_tuple("second_moment_features", second_moment_features, d_sae),
            second_moment_weighting=second_moment_weighting, source=source,
        )
        self._setup(cfg, memory_budget, top_partners or 0)
        self._alloc(torch.device("cpu") if device is None else torch.device(device))
        self._bound = device is not None

    # ---- state layout --------------------------------------------------------------------------------
    def _setup(self, cfg: _Config, memory_budget: int, top_n: int) -> None:
        self._cfg = cfg
        self.memory_budget = memory_budget
        self._top_n = top_n or 10  # the default n of top_partners()
        self.n_tokens = 0
        self._pairs_synced = True

    def _alloc(self, device: torch.device) -> None:
        cfg, F = self._cfg, self._cfg.d_sae
        fdt = torch.float32 if device.type == "mps" else torch.float64
        i64 = {"dtype": torch.int64, "device": device}
        self.counts = torch.zeros(F, **i64)
        self.act_sum = torch.zeros(F, dtype=fdt, device=device)
        self.act_sq_sum = torch.zeros_like(self.act_sum)
        self.act_max = torch.zeros_like(self.act_sum)
        self.act_min = torch.full_like(self.act_sum, math.inf)
        self.hist_counts = torch.zeros(F, cfg.hist_bins + 2, **i64) if cfg.histogram else None
        self._pairs = self._sketch = None
        if cfg.cooccurrence in ("dense", "subset"):
            side = self._pair_side
            self._pairs = torch.zeros(side, side, dtype=torch.int32, device=device)
        elif cfg.cooccurrence == "sketch":
            self._sketch = sketch_empty(F, cfg.partner_capacity, device)
        self._co_feats = self._co_pos = self._sm_feats = self._sm_pos = None
        if cfg.cooccurrence_features is not None:
            self._co_feats, self._co_pos = self._positions(cfg.cooccurrence_features, device)
        if cfg.second_moment_features is not None:
            self._sm_feats, self._sm_pos = self._positions(cfg.second_moment_features, device)
        d_y = cfg.conditioned_on
        self._cond_act_sum = self._cond_pos_count = self._cond_sum = self.cond_second_moment = None
        self._y_mean = self._y_m2 = None
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (a, indices, y) rows not yet reduced
        self._pending_rows = 0
        if d_y is not None:
            self._cond_act_sum = torch.zeros(F, d_y, dtype=fdt, device=device)
            if cfg.conditioned_counts:
                self._cond_pos_count = torch.zeros(F, d_y, **i64)
            if cfg.conditioned_sum:
                self._cond_sum = torch.zeros(F, d_y, dtype=fdt, device=device)
            if self._sm_feats is not None:
                self.cond_second_moment = torch.zeros(len(self._sm_feats), d_y, d_y, dtype=fdt, device=device)
            if cfg.y_moments:
                self._y_mean = torch.zeros(d_y, dtype=fdt, device=device)
                self._y_m2 = torch.zeros(d_y, d_y, dtype=fdt, device=device)

    def _positions(self, feats: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        ids = torch.tensor(feats, dtype=torch.int64, device=device)
        pos = torch.full((self._cfg.d_sae,), -1, dtype=torch.int64, device=device)
        pos[ids] = torch.arange(len(feats), device=device)
        return ids, pos

    # attributes saved, by file key (a leading "_" is dropped); the cond_* ones are flushed first
    _TENSORS = ("counts", "act_sum", "act_sq_sum", "act_max", "act_min", "hist_counts", "_cond_act_sum",
                "_cond_pos_count", "_cond_sum", "cond_second_moment", "_y_mean", "_y_m2", "_pairs")

    def _state_tensors(self) -> dict[str, Tensor]:
        self._flush()
        out = {n.lstrip("_"): getattr(self, n) for n in self._TENSORS if getattr(self, n) is not None}
        if self._sketch is not None:
            out.update({f"sketch_{k}": v for k, v in self._sketch._asdict().items()})
        return out

    # ---- public properties ------------------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return self._cfg.d_sae

    @property
    def config(self) -> dict:
        """The configuration (what ``merge`` compares and ``save`` stores) as a dict."""
        return asdict(self._cfg)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in self._state_tensors().values())

    @property
    def hist_edges(self) -> Tensor:
        """``[hist_bins + 1]`` float64 log-spaced edges; bin b of ``hist_counts`` (1 <= b <= hist_bins) holds
        values in ``[edges[b-1], edges[b])``, bin 0 values below ``edges[0]``, the last bin the rest."""
        lo, hi = self._cfg.hist_range
        return torch.logspace(math.log10(lo), math.log10(hi), self._cfg.hist_bins + 1, dtype=torch.float64,
                              device=self.device if self.device.type != "mps" else "cpu")

    @property
    def cooccurrence_features(self) -> Tensor:
        """``[R]`` feature id of each row/column of :attr:`cooccurrence` (``arange(F)`` for a dense table)."""
        self._need_table()
        if self._co_feats is not None:
            return self._co_feats
        return torch.arange(self.d_sae, device=self.device)

    @property
    def cooccurrence(self) -> Tensor:
        """``[R, R]`` int32 (int64 once promoted) pair counts: C[i, j] = #tokens on which features i and j
        both fire; C[i, i] = ``counts[i]``. R = F (dense) or S (``cooccurrence_features``). This is the
        state's own storage (no copy): do not modify it."""
        self._need_table()
        if not self._pairs_synced:
            diag = self.counts if self._co_feats is None else self.counts[self._co_feats]
            mirror_upper(self._pairs, diag)
            self._pairs_synced = True
        return self._pairs

    @property
    def cond_act_sum(self) -> Optional[Tensor]:
        """``[F, d_y]`` float64 ``sum_t a_f(t) y(t)`` (None without ``conditioned_on``)."""
        self._flush()
        return self._cond_act_sum

    @property
    def cond_pos_count(self) -> Optional[Tensor]:
        """``[F, d_y]`` int64 ``#{t: f fires and y(t) > 0}`` (None without ``conditioned_on`` or with
        ``conditioned_counts=False``)."""
        self._flush()
        return self._cond_pos_count

    @property
    def cond_sum(self) -> Optional[Tensor]:
        """``[F, d_y]`` float64 ``sum_{t: f fires} y(t)`` (None without ``conditioned_sum=True``)."""
        self._flush()
        return self._cond_sum

    def __repr__(self) -> str:
        c = self._cfg
        return (f"FeatureStats(d_sae={c.d_sae}, n_tokens={self.n_tokens}, cooccurrence={c.cooccurrence!r}, "
                f"conditioned_on={c.conditioned_on}, device={self.device})")

    # ---- update -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, acts: Union[SparseActs, Tensor], y: Optional[Tensor] = None) -> "FeatureStats":
        """Add one batch; returns ``self``.

        Args:
            acts: :class:`SparseActs` ``[..., k]`` (padding slots value 0) or a dense code ``[..., d_sae]``;
                leading dims are flattened to N rows (tokens).
            y: ``[..., d_y]`` with the same leading dims, required iff ``conditioned_on`` was given.

        Raises ValueError (nothing is added) on indices outside ``[0, d_sae)``, a feature firing twice in
        one row, a shape/device mismatch, or a missing/unexpected ``y``.
        """
        values, indices, lead = self._check_acts(acts)
        y = self._check_y(y, lead, values.device)
        self._bind(values.device)
        live = values > 0
        full_key = sorted_live(indices, live, self.d_sae)  # [N, L]; also the dense table's pair keys
        if full_key.shape[1] > 1:
            dup = (full_key[:, 1:] == full_key[:, :-1]) & (full_key[:, 1:] < self.d_sae)
            if bool(dup.any()):
                row = int(dup.any(1).nonzero()[0])
                raise ValueError(f"acts row {row} has a feature firing in two slots: each feature may appear "
                                 "at most once per row with a value > 0 (padding slots must have value 0)")
        if values.shape[0] == 0:
            return self
        fi, fv, frow = self._live_entries(values, indices, live)
        fcount = torch.bincount(fi, minlength=self.d_sae)
        self._prepare_pairs(fcount)  # may promote the table; raises before anything is added
        self._update_features(fi, fv, fcount)
        self._update_pairs(indices, live, full_key)
        if y is not None:
            self._update_conditioned(values, indices, live, y, fi, fv, frow)
        self.n_tokens += values.shape[0]
        return self

    def _check_acts(self, acts: Union[SparseActs, Tensor]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        if isinstance(acts, Tensor):
            if acts.dim() < 1 or acts.shape[-1] != self.d_sae:
                raise ValueError(f"a dense code must be [..., d_sae={self.d_sae}], got {tuple(acts.shape)}")
            acts = dense_to_sparse(acts)
        if not isinstance(acts, SparseActs):
            raise TypeError(
                f"acts must be SparseActs or a dense [..., d_sae] tensor, got {type(acts).__name__}")
        if not acts.values.is_floating_point():
            raise TypeError(f"acts.values must be floating point, got {acts.values.dtype}")
        if self._bound and acts.device != self.device:
            raise ValueError(f"acts are on {acts.device} but this FeatureStats lives on {self.device}; "
                             f"move them with acts.to({str(self.device)!r})")
        lead = tuple(acts.shape[:-1])
        n = math.prod(lead)
        values, indices = acts.values.reshape(n, acts.k), acts.indices.reshape(n, acts.k)
        if indices.numel():
            lo, hi = torch.stack((indices.min(), indices.max())).tolist()
            if lo < 0 or hi >= self.d_sae:
                raise ValueError(f"acts.indices lie in [{lo}, {hi}], outside [0, d_sae={self.d_sae}): "
                                 "codes of an SAE with a different d_sae?")
        return values, indices, lead

    def _check_y(self, y: Optional[Tensor], lead: tuple[int, ...], device: torch.device) -> Optional[Tensor]:
        d_y = self._cfg.conditioned_on
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

    def _bind(self, device: torch.device) -> None:
        """The first update fixes the device of a state built without one (it is still all zeros)."""
        if not self._bound:
            if device != self.device:
                self._alloc(device)
            self._bound = True

    def _live_entries(self, values: Tensor, indices: Tensor, live: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Firing slots as flat (feature [M], value [M] in the state dtype, row [M])."""
        flat = live.reshape(-1)
        fi = indices.reshape(-1)[flat]
        fv = values.reshape(-1)[flat].to(self.act_sum.dtype)
        frow = flat.nonzero().squeeze(1).div_(values.shape[1], rounding_mode="floor")
        return fi, fv, frow

    def _update_features(self, fi: Tensor, fv: Tensor, fcount: Tensor) -> None:
        self.counts += fcount
        self.act_sum.index_add_(0, fi, fv)
        self.act_sq_sum.index_add_(0, fi, fv * fv)
        self.act_max.scatter_reduce_(0, fi, fv, "amax")
        self.act_min.scatter_reduce_(0, fi, fv, "amin")
        if self.hist_counts is not None:
            edges = self.hist_edges.to(device=fv.device, dtype=fv.dtype)
            b = torch.bucketize(fv, edges, right=True)
            one = torch.ones((), dtype=torch.int64, device=fi.device)
            self.hist_counts.view(-1).index_add_(0, fi * self.hist_counts.shape[1] + b, one.expand(b.numel()))

    # ---- co-occurrence ------------------------------------------------------------------------------------
    @property
    def _pair_side(self) -> int:
        c = self._cfg
        return len(c.cooccurrence_features) if c.cooccurrence == "subset" else c.d_sae

    def _prepare_pairs(self, added: Tensor, force: bool = False) -> None:
        """Promote the int32 table to int64 before any count could pass 2^31 - 1 (C[i, j] <= counts[i]);
        ``added`` [F]: the per-feature counts about to be added."""
        if self._pairs is None or self._pairs.dtype == torch.int64:
            return
        new = self.counts + added
        if self._co_feats is not None:
            new = new[self._co_feats]
        if not force and int(new.max()) <= INT32_MAX:
            return
        side = self._pairs.shape[0]
        if 8 * side * side > self.memory_budget:
            raise OverflowError(
                f"a co-occurrence count could pass 2^31 - 1 and the table promoted to int64 [{side}, {side}] "
                f"needs {8 * side * side / _GiB:.2f} GiB > memory_budget={self.memory_budget / _GiB:.2f} GiB "
                "(nothing was added): raise memory_budget or count a feature subset"
            )
        self._pairs = self._pairs.to(torch.int64)

    def _update_pairs(self, indices: Tensor, live: Tensor, full_key: Tensor) -> None:
        mode = self._cfg.cooccurrence
        if mode == "none":
            return
        if mode == "sketch":
            self._update_sketch(full_key)
            return
        side = self._pair_side
        key = full_key
        if mode == "subset":
            pos = self._co_pos[indices]
            key = sorted_live(pos, live & (pos >= 0), side)
        idt = torch.int32 if side * (side + 1) <= INT32_MAX else torch.int64
        flat = self._pairs.view(-1)
        one = torch.ones((), dtype=flat.dtype, device=flat.device)
        self._pairs_synced = False  # the diagonal (= counts) changes even without pairs
        for ids in pair_ids(key, side, idt):
            flat.index_add_(0, ids, one.expand(ids.numel()))

    def _update_sketch(self, key: Tensor) -> None:
        F, m = self.d_sae, self._cfg.partner_capacity
        uniq, cnt = [], []
        for ids in pair_ids(key, F, torch.int64):
            u, c = torch.unique(ids, return_counts=True)
            uniq.append(u)
            cnt.append(c)
        if not uniq:
            return
        ids, inv = torch.unique(torch.cat(uniq), return_inverse=True)
        c = torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device).index_add_(0, inv, torch.cat(cnt))
        a, b = ids // F, ids % F
        batch = (torch.cat((a, b)), torch.cat((b, a)), torch.cat((c, c)), torch.cat((c, c)))
        s = self._sketch
        self._sketch = sketch_combine(F, m, sketch_entries(s), s.u, batch, torch.zeros_like(s.u))

    def _need_table(self) -> None:
        mode = self._cfg.cooccurrence
        if mode == "none":
            raise ValueError("co-occurrence is not tracked: build FeatureStats with cooccurrence=True, "
                             "cooccurrence_features=[...] or top_partners=n")
        if mode == "sketch":
            raise ValueError("this FeatureStats keeps a partner sketch (top_partners=n), not a pair table: "
                             "use top_partners()")

    def _pair_counts(self, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
        """(C[rows] as float64 [r, R], C_ii of the rows [r, 1], C_jj [1, R])."""
        table = self.cooccurrence
        diag = table.diagonal().to(torch.float64)
        r = slice(None) if rows is None else rows
        if isinstance(r, (list, tuple)):
            r = torch.tensor(r, dtype=torch.int64, device=table.device)
        return table[r].to(torch.float64), diag[r][:, None], diag[None, :]

    def cooccurrence_prob(self, rows: Rows = None) -> Tensor:
        """``[r, R]`` float64 P(j fires | i fires) = C[i, j] / C[i, i]; NaN where i never fired.

        rows: which rows i (positions in :attr:`cooccurrence_features`); default all (an ``[R, R]`` float64,
        8 R^2 bytes: pass row slices for large R)."""
        c, ci, _ = self._pair_counts(rows)
        return c / ci

    def cooccurrence_correlation(self, rows: Rows = None) -> Tensor:
        """``[r, R]`` float64 Pearson correlation over tokens of the firing indicators of i and j:
        ``(N C_ij - C_i C_j) / sqrt(C_i (N - C_i) C_j (N - C_j))``, N = ``n_tokens``; NaN where a feature
        never or always fired (zero variance)."""
        c, ci, cj = self._pair_counts(rows)
        n = float(self.n_tokens)
        return (n * c - ci * cj) / torch.sqrt(ci * (n - ci) * cj * (n - cj))

    def cooccurrence_ratio(self, rows: Rows = None) -> Tensor:
        """``[r, R]`` float64 P(i, j) / (P(i) P(j)) = N C_ij / (C_i C_j) (seed 004's
        ``pair_prob / sing_prob``; 1 for independent features); NaN where i or j never fired."""
        c, ci, cj = self._pair_counts(rows)
        return c * float(self.n_tokens) / (ci * cj)

    def top_partners(self, n: Optional[int] = None) -> PartnerCounts:
        """The n partners j != i with the most co-firings, for every row feature i.

        * Pair table (dense or subset): exact, ``lower == upper``; rows/partners are the table's features.
        * Sketch (``top_partners=n``, capacity m): one pass cannot be exact in bounded memory; what holds:
          ``lower <= C[i, j] <= upper`` for every listed partner (exact where equal: always so for a feature
          with at most m distinct partners so far); every partner with ``C[i, j] > unlisted_bound[i]`` is
          listed; and the sketch's own bound ``u_i <= N_i / (m + 1)`` with N_i = sum_{j != i} C[i, j], however
          the updates were batched and states merged. ``n`` must be <= m (default: the constructor's n).
        """
        if self._cfg.cooccurrence == "sketch":
            m = self._cfg.partner_capacity
            n = self._top_n if n is None else _int("n", n, 1, m)
            s = self._sketch
            bound = s.u if n == m else torch.maximum(s.u, s.hi[:, n])
            return PartnerCounts(torch.arange(self.d_sae, device=self.device), s.part[:, :n].clone(),
                                 s.lo[:, :n].clone(), s.hi[:, :n].clone(), bound)
        table, feats = self.cooccurrence, self.cooccurrence_features
        side = table.shape[0]
        n = min(self._top_n if n is None else _int("n", n, 1), side - 1)  # only side - 1 partners exist
        parts, counts, bounds = [], [], []
        col = torch.arange(side, device=table.device)
        for r0 in range(0, side, MIRROR_BLOCK):
            blk = table[r0:r0 + MIRROR_BLOCK].to(torch.int64)
            rr = torch.arange(r0, r0 + blk.shape[0], device=table.device)
            # unique keys: count desc, then column asc; the diagonal (self) is excluded with -1
            key = torch.where(col[None] == rr[:, None], -1, blk * side + (side - 1 - col))
            top = key.topk(min(n + 1, side), dim=1).values
            cnt = top.div(side, rounding_mode="floor")
            c = side - 1 - (top - cnt * side)
            ok = cnt[:, :n] > 0
            parts.append(torch.where(ok, feats[c[:, :n].clamp_min(0)], -1))
            counts.append(cnt[:, :n].clamp_min(0))
            bounds.append(cnt[:, n].clamp_min(0) if top.shape[1] > n else torch.zeros_like(rr))
        cnt = torch.cat(counts)
        return PartnerCounts(feats, torch.cat(parts), cnt, cnt.clone(), torch.cat(bounds))

    # ---- conditioned statistics -----------------------------------------------------------------------
    def _update_conditioned(self, values: Tensor, indices: Tensor, live: Tensor, y: Tensor,
                            fi: Tensor, fv: Tensor, frow: Tensor) -> None:
        cdt = _compute_dtype(values, y)
        a = torch.where(live, values, 0).to(cdt)  # a fresh tensor: safe to keep
        y_c = y.to(cdt)
        if self.cond_second_moment is not None:
            self._update_second_moment(fi, fv, frow, y_c)
        if self._y_mean is not None:
            self._update_y_moments(y_c)
        # Each kernel call writes a fresh [F, d_y] output that is then added to the state: a cost fixed per
        # call. Pending rows are reduced together once they hold enough slots to outweigh it.
        if self._pending or values.shape[0] * values.shape[1] < _FLUSH_SLOTS_PER_FEATURE * self.d_sae:
            self._pending.append((a, indices.clone(), y_c.clone() if y_c is y else y_c))
            self._pending_rows += values.shape[0]
            pending_bytes = self._pending_rows * (y_c.shape[1] * y_c.element_size() + 16 * values.shape[1])
            if (self._pending_rows * values.shape[1] >= _FLUSH_SLOTS_PER_FEATURE * self.d_sae
                    or pending_bytes >= _PENDING_BYTES):
                self._flush()
        else:
            self._reduce_conditioned(a, indices, y_c)

    def _flush(self) -> None:
        """Reduce the pending rows of the conditioned statistics into the state."""
        if not self._pending:
            return
        parts, self._pending, self._pending_rows = self._pending, [], 0
        if len(parts) == 1:
            self._reduce_conditioned(*parts[0])
            return
        k = max(p[0].shape[1] for p in parts)  # threshold codes: k varies by batch; pad with 0 at index 0
        pad = torch.nn.functional.pad
        parts = [(pad(a, (0, k - a.shape[1])), pad(i, (0, k - i.shape[1])), y) for a, i, y in parts]
        self._reduce_conditioned(*(torch.cat(t) for t in zip(*parts)))

    def _reduce_conditioned(self, a: Tensor, indices: Tensor, y_c: Tensor) -> None:
        """Add ``sum a y``, ``#{fire, y > 0}`` (and ``sum_{fire} y``) of the rows ``a, indices [n, k]``,
        ``y_c [n, d_y]``."""
        cdt = y_c.dtype
        # when few features appear, renumber them 0..U-1 so the kernel writes U rows, not F
        feats, local = torch.unique(indices, return_inverse=True)
        if 2 * feats.numel() > self.d_sae:
            feats, local = None, indices
        n_out = self.d_sae if feats is None else feats.numel()
        # out[f] = sum over slots with index f of a * y[row]: the sparse_decode dW kernel
        _accumulate(self._cond_act_sum, _backward_weight(y_c, a, local, n_out), feats)
        fire = (a > 0).to(torch.float32)
        if self._cond_pos_count is not None:
            ypos = (y_c > 0).to(torch.float32)
            for r0 in range(0, a.shape[0], _COUNT_ROWS):  # float32 sums of 0/1 are exact below 2^24
                r = slice(r0, r0 + _COUNT_ROWS)
                _accumulate(self._cond_pos_count, _backward_weight(ypos[r], fire[r], local[r], n_out), feats)
        if self._cond_sum is not None:
            _accumulate(self._cond_sum, _backward_weight(y_c, fire.to(cdt), local, n_out), feats)

    def _update_second_moment(self, fi: Tensor, fv: Tensor, frow: Tensor, y: Tensor) -> None:
        s = self._sm_pos[fi]
        sel = s >= 0
        s, w, rows = s[sel], fv[sel], frow[sel]
        if self._cfg.second_moment_weighting == "indicator":
            w = torch.ones_like(w)
        for j in s.unique().tolist():
            m = s == j
            ys = y[rows[m]]
            self.cond_second_moment[j].add_((ys * w[m].to(ys.dtype)[:, None]).t() @ ys)

    def _update_y_moments(self, y: Tensor) -> None:
        nb, na = y.shape[0], self.n_tokens
        mean_b = y.mean(0)
        yc = y - mean_b
        m2_b = yc.t() @ yc
        self._chan_merge(na, nb, mean_b.to(self._y_mean.dtype), m2_b)

    def _chan_merge(self, na: int, nb: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n = na + nb
        delta = mean_b - self._y_mean
        self._y_m2.add_(m2_b).add_(torch.outer(delta, delta), alpha=na * nb / n)
        self._y_mean.add_(delta, alpha=nb / n)

    def y_mean(self) -> Tensor:
        """``[d_y]`` mean of ``y`` over all tokens (needs ``y_moments=True``); NaN before any token."""
        self._need("y_moments", self._y_mean)
        return self._y_mean.clone() if self.n_tokens else torch.full_like(self._y_mean, math.nan)

    def y_covariance(self, correction: int = 1) -> Tensor:
        """``[d_y, d_y]`` covariance of ``y`` over tokens, divided by ``n_tokens - correction`` (as in
        torch.cov)."""
        self._need("y_moments", self._y_m2)
        return self._y_m2 / (self.n_tokens - correction)

    def conditioned_mean(self, weighted: bool = True) -> Tensor:
        """``[F, d_y]`` mean of ``y`` given f fires: activation-weighted ``cond_act_sum / act_sum`` (default)
        or plain ``cond_sum / counts`` (needs ``conditioned_sum=True``); NaN where f never fired."""
        if weighted:
            self._need("conditioned_on", self.cond_act_sum)
            return self.cond_act_sum / self.act_sum[:, None]
        self._need("conditioned_sum", self.cond_sum)
        return self.cond_sum / self.counts[:, None].to(self.cond_sum.dtype)

    def conditioned_positive_frac(self) -> Tensor:
        """``[F, d_y]`` P(y > 0 | f fires) = ``cond_pos_count / counts``; NaN where f never fired."""
        self._need("conditioned_counts", self.cond_pos_count)
        return self.cond_pos_count.to(self.act_sum.dtype) / self.counts[:, None].to(self.act_sum.dtype)

    @property
    def second_moment_features(self) -> Tensor:
        """``[S]`` feature id of each slice of ``cond_second_moment``."""
        self._need("second_moment_features", self._sm_feats)
        return self._sm_feats

    def _need(self, flag: str, t: Optional[Tensor]) -> None:
        if t is None:
            raise ValueError(f"not tracked: build FeatureStats with {flag}=...")

    # ---- per-feature summaries -----------------------------------------------------------------------
    def frequency(self) -> Tensor:
        """``[F]`` firing frequency counts / n_tokens (float64); NaN before any token."""
        return self.counts.to(self.act_sum.dtype) / self.n_tokens if self.n_tokens else \
            torch.full_like(self.act_sum, math.nan)

    def log_sparsity(self, eps: float = 1e-10) -> Tensor:
        """``[F]`` log10(frequency + eps): SAELens's ``sparsity.safetensors`` / Dunefsky's
        ``_log_feature_sparsity.pt`` convention (-10 for a feature that never fired)."""
        return torch.log10(self.frequency() + eps)

    def mean_activation(self, given_firing: bool = True) -> Tensor:
        """``[F]`` mean activation over the tokens where the feature fires (NaN if it never did), or over all
        tokens (``given_firing=False``)."""
        if given_firing:
            return self.act_sum / self.counts.to(self.act_sum.dtype)
        return self.act_sum / self.n_tokens if self.n_tokens else torch.full_like(self.act_sum, math.nan)

    def activation_variance(self) -> Tensor:
        """``[F]`` population variance of the activation over the tokens where the feature fires (NaN if
        it never did)."""
        n = self.counts.to(self.act_sum.dtype)
        mean = self.act_sum / n
        return (self.act_sq_sum / n - mean * mean).clamp_min(0)

    def quantiles(self, q: Union[float, Sequence[float], Tensor]) -> Tensor:
        """Quantiles of each feature's firing values from the histogram: ``[F]`` for a float q, ``[F, Q]`` for
        ``[Q]`` levels in [0, 1]; NaN for features that never fired.

        Position p = q (n - 1) among the n sorted values (torch.quantile's convention); the bin b holding the
        floor(p)-th value is found from cumulative counts, and the result is interpolated log-linearly inside
        b, whose range is narrowed to [act_min, act_max]. So the result lies in the same bin as the
        floor(p)-th value, q=0 gives the min and q=1 the max exactly.
        """
        self._need("histogram", self.hist_counts)
        scalar = isinstance(q, numbers.Real)
        qt = torch.as_tensor(q, dtype=torch.float64, device=self.device).reshape(-1)
        if qt.numel() and not bool(((qt >= 0) & (qt <= 1)).all()):
            raise ValueError(f"q must lie in [0, 1], got {q}")
        h = self.hist_counts
        n = h.sum(1, keepdim=True).to(torch.float64)  # [F, 1]
        cum = h.cumsum(1)
        p = qt[None, :] * (n - 1)  # [F, Q]
        b = torch.searchsorted(cum.to(torch.float64), p, right=True).clamp_max(h.shape[1] - 1)
        cnt = h.gather(1, b).to(torch.float64)
        start = cum.gather(1, b).to(torch.float64) - cnt
        frac = ((p - start) / (cnt - 1).clamp_min(1)).clamp(0, 1)
        edges = self.hist_edges.to(self.device)
        ext = torch.cat((edges.new_zeros(1), edges, edges.new_full((1,), math.inf)))
        amin = self.act_min.to(torch.float64)[:, None]
        amax = self.act_max.to(torch.float64)[:, None]
        lo = torch.maximum(ext[b], amin)
        hi = torch.minimum(ext[b + 1], amax)
        out = (lo * (hi / lo) ** frac).clamp(lo, hi)
        out = torch.where(n > 0, out, math.nan)
        return out[:, 0] if scalar else out

    # ---- merge / save / load -------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the state of ``other`` (another split of the data) to this one in place; returns ``self``.

        Exact: counts add, float sums add (float64 rounding aside), max/min, histograms and pair tables add;
        partner sketches merge with their guarantees kept (see :meth:`top_partners`). ``other`` is read on
        this state's device. Raises ValueError naming the fields whose configuration differs.
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"merge expects a FeatureStats, got {type(other).__name__}")
        if other._cfg != self._cfg:
            a, b = asdict(self._cfg), asdict(other._cfg)
            diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
            raise ValueError(f"cannot merge FeatureStats with different configurations ({diff})")
        if not self._bound and other._bound:
            self._alloc(other.device)
            self._bound = True
        o = {k: v.to(self.device) for k, v in other._state_tensors().items()}
        if self._pairs is not None:
            self._prepare_pairs(o["counts"], force=o["pairs"].dtype == torch.int64)
        self.counts += o["counts"]
        self.act_sum += o["act_sum"]
        self.act_sq_sum += o["act_sq_sum"]
        torch.maximum(self.act_max, o["act_max"], out=self.act_max)
        torch.minimum(self.act_min, o["act_min"], out=self.act_min)
        self._flush()
        for name in ("hist_counts", "_cond_act_sum", "_cond_pos_count", "_cond_sum", "cond_second_moment"):
            if getattr(self, name) is not None:
                getattr(self, name).add_(o[name.lstrip("_")])
        if self._pairs is not None:
            self._pairs.add_(o["pairs"])  # stale lower triangles add too: only the upper one counts
            self._pairs_synced = False
        if self._sketch is not None:
            s, t = self._sketch, other._sketch
            t = Sketch(*(x.to(self.device) for x in t))
            self._sketch = sketch_combine(self.d_sae, self._cfg.partner_capacity, sketch_entries(s), s.u,
                                           sketch_entries(t), t.u)
        if self._y_mean is not None and other.n_tokens:
            if self.n_tokens:
                self._chan_merge(self.n_tokens, other.n_tokens, o["y_mean"], o["y_m2"])
            else:
                self._y_mean.copy_(o["y_mean"])
                self._y_m2.copy_(o["y_m2"])
        self.n_tokens += other.n_tokens
        return self

    def save(self, path: str) -> None:
        """Write the state to a safetensors file; the configuration and n_tokens go in its metadata (JSON)."""
        from safetensors.torch import save_file

        if self._pairs is not None:
            _ = self.cooccurrence  # store the symmetric table
        tensors = {k: v.contiguous() for k, v in self._state_tensors().items()}
        meta = {"format": _FORMAT, "version": str(_VERSION), "config": self._cfg.to_json(),
                "n_tokens": str(self.n_tokens), "top_partners": str(self._top_n),
                "memory_budget": str(self.memory_budget)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str, device: Device = None) -> "FeatureStats":
        """Read a state written by :meth:`save` (onto ``device``, default CPU)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a FeatureStats file (metadata format={meta.get('format')!r})")
            if int(meta["version"]) > _VERSION:
                raise ValueError(f"{path} has FeatureStats format version {meta['version']}; this sparsekern "
                                 f"reads up to {_VERSION}")
            names = set(f.keys())
            dev = torch.device("cpu") if device is None else torch.device(device)
            fdt = torch.float32 if dev.type == "mps" else torch.float64
            obj = cls.__new__(cls)
            cfg = _Config.from_json(meta["config"])
            obj._setup(cfg, int(meta["memory_budget"]), int(meta["top_partners"]))
            obj._alloc_meta(dev)  # layout without storage; every tensor comes from the file
            for name in cls._TENSORS:
                if getattr(obj, name) is not None:
                    key = name.lstrip("_")
                    t = f.get_tensor(key)
                    setattr(obj, name, t.to(dev, fdt) if t.is_floating_point() else t.to(dev))
                    names.discard(key)
            if obj._sketch is not None:
                obj._sketch = Sketch(*(f.get_tensor(f"sketch_{k}").to(dev) for k in Sketch._fields))
                names -= {f"sketch_{k}" for k in Sketch._fields}
            if names:
                raise ValueError(f"{path} holds tensors this configuration does not: {sorted(names)}")
        obj.n_tokens = int(meta["n_tokens"])
        obj._bound = True
        return obj

    def _alloc_meta(self, device: torch.device) -> None:
        """Allocate on the meta device (shapes only, no memory), then fix the small index tensors."""
        self._alloc(torch.device("meta"))
        if self._cfg.cooccurrence_features is not None:
            self._co_feats, self._co_pos = self._positions(self._cfg.cooccurrence_features, device)
        if self._cfg.second_moment_features is not None:
            self._sm_feats, self._sm_pos = self._positions(self._cfg.second_moment_features, device)


def _accumulate(dst: Tensor, src: Tensor, rows: Optional[Tensor] = None) -> None:
    """``dst += src`` (``dst[rows] += src`` if ``rows``), cast to ``dst.dtype`` (an int64 ``dst`` takes float
    sums of exact integers) a block at a time: one mixed-dtype add of a large ``src`` is several times
    slower (page faults on a full-size temporary)."""
    step = max(1, _ADD_BLOCK // max(1, src.shape[1]))
    for r0 in range(0, src.shape[0], step):
        part = src[r0:r0 + step].to(dst.dtype)
        if rows is None:
            dst[r0:r0 + step] += part
        else:
            dst.index_add_(0, rows[r0:r0 + step], part)


# ---- driver ----------------------------------------------------------------------------------------------
def sae_fingerprint(sae: Any) -> str:
    """A short id of an SAE's weights (class, shapes, a hash of a strided sample of ``W_enc``)."""
    w = sae.W_enc.detach()
    sample = w.reshape(-1)[:: max(1, w.numel() // 65536)][:65536].to("cpu", torch.float32).contiguous()
    digest = hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16]
    return f"{type(sae).__name__}:{tuple(w.shape)}:{digest}"


@torch.no_grad()
def feature_stats(
    sae: Any,
    batches: Iterable[Any],
    *,
    model: Any = None,
    hook_name: Optional[str] = None,
    conditioned_hook: Optional[str] = None,
    stats: Optional[FeatureStats] = None,
    progress: bool = True,
    total: Optional[int] = None,
    **config: Any,
) -> FeatureStats:
    """Stream a dataset through ``sae.encode_sparse`` into a :class:`FeatureStats`.

    Args:
        sae: a sparsekern SAE/transcoder (``encode_sparse``, ``W_enc``, ``cfg.d_sae``).
        batches: with ``model``: token batches ``[batch, pos]`` run through ``model.run_with_cache`` (stopping
            after the last block needed). Without: activation batches ``[batch, pos, d_in]``, or pairs
            ``(x, y)`` when conditioning.
        hook_name: the hook the SAE reads; default ``sae.cfg.metadata.hook_name``.
        conditioned_hook: a hook cached alongside (e.g. ``blocks.0.mlp.hook_post``, ``[batch, pos, ...]``,
            trailing dims flattened to d_y) and passed as ``y``; ``conditioned_on`` defaults to its width.
        stats: continue an existing state (updated in place); it must come from the same SAE and hooks.
        progress, total: tqdm bar and its length if ``batches`` has no ``len``.
        config: :class:`FeatureStats` arguments for a new state (``cooccurrence=True``, ...). ``source``
            defaults to the SAE's fingerprint and the hooks, so states from another SAE refuse to merge.

    Returns the :class:`FeatureStats` (on the SAE's device).
    """
    d_sae = sae.cfg.d_sae
    device = sae.W_enc.device
    if model is not None and hook_name is None:
        hook_name = sae.cfg.metadata.get("hook_name")
        if hook_name is None:
            raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    source = config.pop("source", None) or json.dumps(
        {"sae": sae_fingerprint(sae), "hook_name": hook_name, "conditioned_hook": conditioned_hook},
        sort_keys=True)
    if stats is not None:
        if config:
            raise ValueError(f"pass either stats or FeatureStats arguments, not both (got {sorted(config)})")
        if stats.d_sae != d_sae:
            raise ValueError(f"stats has d_sae={stats.d_sae} but the SAE has d_sae={d_sae}")
        if stats.config["source"] != source:
            raise ValueError(f"stats comes from source {stats.config['source']!r}, not {source!r}")
    names = [h for h in (hook_name, conditioned_hook) if h is not None]
    stop = stop_layer(names)
    for batch in tqdm(batches, total=total, disable=not progress, desc="feature stats"):
        y = None
        if model is not None:
            if not isinstance(batch, Tensor) or batch.dim() != 2:
                raise ValueError(f"with a model, batches must be tokens [batch, pos], got {_shape(batch)}")
            _, cache = model.run_with_cache(batch, names_filter=names, stop_at_layer=stop)
            x = cache[hook_name]
            if conditioned_hook is not None:
                y = cache[conditioned_hook]
        elif conditioned_hook is not None or isinstance(batch, (tuple, list)):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    "without a model, conditioned batches must be pairs (x [batch, pos, d_in], y)")
            x, y = batch
        else:
            x = batch
        if x.dim() < 3:
            raise ValueError(f"activations must be [batch, pos, d_in], got {tuple(x.shape)}")
        acts = sae.encode_sparse(x.to(device=device, dtype=sae.W_enc.dtype))
        if y is not None:
            y = y.to(device).reshape(*acts.shape[:-1], -1)
        if stats is None:
            d_y = y.shape[-1] if y is not None else None
            config.setdefault("conditioned_on", d_y)
            stats = FeatureStats(d_sae, source=source, device=device, **config)
        stats.update(acts, y)
    if stats is None:
        stats = FeatureStats(d_sae, source=source, device=device, **config)
    return stats


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
