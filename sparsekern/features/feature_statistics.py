"""The :class:`FeatureStats` facade: one streaming state composed of mergeable accumulators.

The accumulators (:mod:`sparsekern.features.accumulators`) keep the statistics; this class checks each
batch once (:class:`~.accumulators.FiringBatch`), hands it to every part, and writes ``merge``,
``state_dict`` / ``from_state_dict`` and ``save`` / ``load`` once on top of theirs. The overview of what is
kept is in :mod:`sparsekern.features.stats`.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from ..ops.validate import int_arg
from ..sparse_acts import SparseActs
from . import _checks
from .accumulators import (
    Accumulator,
    ConditionedAccumulator,
    FeatureStatsConfig,
    FiringBatch,
    MomentsAccumulator,
    PairTableAccumulator,
    PartnerCounts,
    PartnerSketchAccumulator,
)
from .accumulators.base import need
from .accumulators.batch import check_code, check_y

__all__ = ["FeatureStats"]

_FORMAT = "sparsekern.FeatureStats"
_VERSION = 1
_GiB = _checks.GiB

Device = Union[str, torch.device, None]
FeatureList = _checks.FeatureList
STATE_KEYS = ("config", "n_tokens", "memory_budget", "top_partners", "tensors")


def _forward(part: Callable[["FeatureStats"], Any], fn: Callable) -> Callable:
    """A FeatureStats method that calls ``fn`` (an accumulator's method, docstring kept) on ``part(self)``."""

    @functools.wraps(fn)
    def method(self: "FeatureStats", *args: Any, **kwargs: Any) -> Any:
        return fn(part(self), *args, **kwargs)

    return method


def _table(s: "FeatureStats") -> PairTableAccumulator:
    co = s._co
    if co is None:
        raise ValueError("co-occurrence is not tracked: build FeatureStats with cooccurrence=True, "
                         "cooccurrence_features=[...] or top_partners=n")
    if not isinstance(co, PairTableAccumulator):
        raise ValueError("this FeatureStats keeps a partner sketch (top_partners=n), not a pair table: "
                         "use top_partners()")
    return co


def _partners(s: "FeatureStats") -> Union[PairTableAccumulator, PartnerSketchAccumulator]:
    return s._co if isinstance(s._co, PartnerSketchAccumulator) else _table(s)


def _y_moments(s: "FeatureStats") -> ConditionedAccumulator:
    return s._cond if s._cond is not None else need("y_moments", None)


# ---- the facade ----------------------------------------------------------------------------------------
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

    Mergeable state: :attr:`accumulators` are the parts (moments + histograms, co-occurrence, conditioned
    statistics); :meth:`state_dict` / :meth:`from_state_dict` carry the whole state as JSON-able metadata
    and named tensors (``save``/``load`` and the distributed gather use exactly these).
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
        cfg, memory_budget, top_n = FeatureStatsConfig.from_arguments(
            d_sae, histogram=histogram, hist_range=hist_range, hist_bins=hist_bins, cooccurrence=cooccurrence,
            cooccurrence_features=cooccurrence_features, top_partners=top_partners,
            partner_capacity=partner_capacity, memory_budget=memory_budget, conditioned_on=conditioned_on,
            conditioned_counts=conditioned_counts, conditioned_sum=conditioned_sum, y_moments=y_moments,
            second_moment_features=second_moment_features, second_moment_weighting=second_moment_weighting,
            source=source,
        )
        self._setup(cfg, memory_budget, top_n)
        self._build(torch.device("cpu") if device is None else torch.device(device))
        self._bound = device is not None

    # ---- the parts -----------------------------------------------------------------------------------
    def _setup(self, cfg: FeatureStatsConfig, memory_budget: int, top_n: int) -> None:
        self._cfg = cfg
        self.memory_budget = memory_budget
        self._top_n = top_n or 10  # the default n of top_partners()

    def _kinds(self) -> list[tuple[str, type, dict[str, Any]]]:
        """``(attribute, accumulator class, its options)`` of each part this configuration keeps."""
        cfg = self._cfg
        kinds: list[tuple[str, type, dict[str, Any]]] = [("_moments", MomentsAccumulator, {})]
        if cfg.cooccurrence in ("dense", "subset"):
            kinds.append(("_co", PairTableAccumulator, {"memory_budget": self.memory_budget,
                                                        "default_n": self._top_n}))
        elif cfg.cooccurrence == "sketch":
            kinds.append(("_co", PartnerSketchAccumulator, {"default_n": self._top_n}))
        if cfg.conditioned_on is not None:
            kinds.append(("_cond", ConditionedAccumulator, {}))
        return kinds

    def _build(self, device: torch.device) -> None:
        """Empty accumulators on ``device``."""
        self._co: Optional[Accumulator] = None
        self._cond: Optional[ConditionedAccumulator] = None
        for attr, kind, options in self._kinds():
            setattr(self, attr, kind(self._cfg, device, **options))

    @property
    def accumulators(self) -> dict[str, Accumulator]:
        """The state's parts by name: ``"moments"`` always, ``"cooccurrence"`` (a pair table or a partner
        sketch) and ``"conditioned"`` where tracked. Each has ``update``/``merge``/``state_dict``/
        ``from_state_dict``; read them, do not update them separately (they share ``n_tokens``)."""
        parts = {"moments": self._moments, "cooccurrence": self._co, "conditioned": self._cond}
        return {k: v for k, v in parts.items() if v is not None}

    def _parts(self) -> list[tuple[str, Accumulator]]:
        # co-occurrence first: its merge/update may refuse (OverflowError) before anything is added
        return [(k, v) for k, v in (("cooccurrence", self._co), ("moments", self._moments),
                                    ("conditioned", self._cond)) if v is not None]

    # ---- public properties ------------------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return self._cfg.d_sae

    @property
    def config(self) -> dict:
        """The configuration (what ``merge`` compares and ``save`` stores) as a dict."""
        return self._cfg.to_dict()

    @property
    def device(self) -> torch.device:
        return self._moments.device

    @property
    def n_tokens(self) -> int:
        """Rows (tokens) seen."""
        return self._moments.n_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(acc.nbytes for _, acc in self._parts())

    counts = property(lambda self: self._moments.counts,
                      doc="``[F]`` int64 tokens on which each feature fires")
    act_sum = property(lambda self: self._moments.act_sum, doc="``[F]`` sum of the firing activations")
    act_sq_sum = property(lambda self: self._moments.act_sq_sum, doc="``[F]`` sum of their squares")
    act_max = property(lambda self: self._moments.act_max, doc="``[F]`` max firing activation (0: never)")
    act_min = property(lambda self: self._moments.act_min, doc="``[F]`` min firing activation (inf: never)")
    hist_counts = property(lambda self: self._moments.hist_counts,
                           doc="``[F, hist_bins + 2]`` int64 histogram of the firing values (or None)")
    hist_edges = property(lambda self: self._moments.hist_edges, doc=MomentsAccumulator.hist_edges.__doc__)

    @property
    def cooccurrence_features(self) -> Tensor:
        """``[R]`` feature id of each row/column of :attr:`cooccurrence` (``arange(F)`` for a dense table)."""
        return _table(self).features

    @property
    def cooccurrence(self) -> Tensor:
        """``[R, R]`` int32 (int64 once promoted) pair counts: C[i, j] = #tokens on which features i and j
        both fire; C[i, i] = ``counts[i]``. R = F (dense) or S (``cooccurrence_features``). This is the
        state's own storage (no copy): do not modify it."""
        return _table(self).table

    def _cond_get(self, name: str) -> Optional[Tensor]:
        return None if self._cond is None else getattr(self._cond, name)

    cond_act_sum = property(lambda self: self._cond_get("cond_act_sum"),
                            doc="``[F, d_y]`` float64 ``sum_t a_f(t) y(t)`` (None without "
                                "``conditioned_on``).")
    cond_pos_count = property(lambda self: self._cond_get("cond_pos_count"),
                              doc="``[F, d_y]`` int64 ``#{t: f fires and y(t) > 0}`` (None without "
                                  "``conditioned_on`` or with ``conditioned_counts=False``).")
    cond_sum = property(lambda self: self._cond_get("cond_sum"),
                        doc="``[F, d_y]`` float64 ``sum_{t: f fires} y(t)`` (None without "
                            "``conditioned_sum``).")
    cond_second_moment = property(lambda self: self._cond_get("cond_second_moment"),
                                  doc="``[S, d_y, d_y]`` for :attr:`second_moment_features` (or None).")

    @property
    def second_moment_features(self) -> Tensor:
        """``[S]`` feature id of each slice of ``cond_second_moment``."""
        return need("second_moment_features", self._cond_get("second_moment_features"))

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
        values, indices, lead = check_code(acts, self.d_sae, self.device if self._bound else None)
        y = check_y(y, self._cfg.conditioned_on, lead, values.device)
        self._bind(values.device)
        batch = FiringBatch.build(values, indices, y, self.d_sae, self.act_sum.dtype)
        if batch.n_rows == 0:
            return self
        parts = [acc for _, acc in self._parts()]
        for acc in parts:
            acc.reserve(batch)  # may promote the pair table; raises before anything is added
        for acc in parts:
            acc.update(batch)
        return self

    def _bind(self, device: torch.device) -> None:
        """The first update (or merge) fixes the device of a state built without one (still all zeros)."""
        if not self._bound:
            if device != self.device:
                self._build(device)
            self._bound = True

    # ---- per-feature summaries -----------------------------------------------------------------------
    _moments_part = staticmethod(lambda s: s._moments)
    frequency = _forward(_moments_part, MomentsAccumulator.frequency)
    log_sparsity = _forward(_moments_part, MomentsAccumulator.log_sparsity)
    mean_activation = _forward(_moments_part, MomentsAccumulator.mean_activation)
    activation_variance = _forward(_moments_part, MomentsAccumulator.activation_variance)
    quantiles = _forward(_moments_part, MomentsAccumulator.quantiles)

    # ---- co-occurrence ------------------------------------------------------------------------------------
    cooccurrence_prob = _forward(_table, PairTableAccumulator.cooccurrence_prob)
    cooccurrence_correlation = _forward(_table, PairTableAccumulator.cooccurrence_correlation)
    cooccurrence_ratio = _forward(_table, PairTableAccumulator.cooccurrence_ratio)

    def top_partners(self, n: Optional[int] = None) -> PartnerCounts:
        """The n partners j != i with the most co-firings, for every row feature i.

        * Pair table (dense or subset): exact, ``lower == upper``; rows/partners are the table's features.
        * Sketch (``top_partners=n``, capacity m): one pass cannot be exact in bounded memory; what holds:
          ``lower <= C[i, j] <= upper`` for every listed partner (exact where equal: always so for a feature
          with at most m distinct partners so far); every partner with ``C[i, j] > unlisted_bound[i]`` is
          listed; and the sketch's own bound ``u_i <= N_i / (m + 1)`` with N_i = sum_{j != i} C[i, j], however
          the updates were batched and states merged. ``n`` must be <= m (default: the constructor's n).
        """
        return _partners(self).top_partners(n)

    # ---- conditioned statistics -----------------------------------------------------------------------
    y_mean = _forward(_y_moments, ConditionedAccumulator.y_mean)
    y_covariance = _forward(_y_moments, ConditionedAccumulator.y_covariance)

    def conditioned_mean(self, weighted: bool = True) -> Tensor:
        """``[F, d_y]`` mean of ``y`` given f fires: activation-weighted ``cond_act_sum / act_sum`` (default)
        or plain ``cond_sum / counts`` (needs ``conditioned_sum=True``); NaN where f never fired."""
        if weighted:
            return need("conditioned_on", self.cond_act_sum) / self.act_sum[:, None]
        return need("conditioned_sum", self.cond_sum) / self.counts[:, None].to(self.cond_sum.dtype)

    def conditioned_positive_frac(self) -> Tensor:
        """``[F, d_y]`` P(y > 0 | f fires) = ``cond_pos_count / counts``; NaN where f never fired."""
        pos = need("conditioned_counts", self.cond_pos_count)
        return pos.to(self.act_sum.dtype) / self.counts[:, None].to(self.act_sum.dtype)

    # ---- merge / state / save / load -------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the state of ``other`` (another split of the data) to this one in place; returns ``self``.

        Exact: counts add, float sums add (float64 rounding aside), max/min, histograms and pair tables add;
        partner sketches merge with their guarantees kept (see :meth:`top_partners`). ``other`` is read on
        this state's device. Raises ValueError naming the fields whose configuration differs.
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"merge expects a FeatureStats, got {type(other).__name__}")
        self._cfg.check_same(other._cfg)
        if not self._bound and other._bound:
            self._build(other.device)
            self._bound = True
        theirs = dict(other._parts())
        for name, acc in self._parts():  # co-occurrence first: a refused promotion leaves all unchanged
            acc.merge(theirs[name])
        return self

    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-able metadata plus named tensors (what ``save`` writes and a distributed
        gather sends): ``{"config": dict, "n_tokens": int, "memory_budget": int, "top_partners": int,
        "tensors": {name: Tensor}}``. The tensors are the state's own (no copies; a pair table is made
        symmetric first); keys as in :attr:`accumulators`' layouts."""
        tensors: dict[str, Tensor] = {}
        for name in ("moments", "conditioned", "cooccurrence"):  # the order save always wrote
            acc = self.accumulators.get(name)
            if acc is not None:
                tensors.update(acc.state_dict())
        return {"config": self.config, "n_tokens": self.n_tokens, "memory_budget": self.memory_budget,
                "top_partners": self._top_n, "tensors": tensors}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, device: Device = None,
                        copy: bool = True) -> "FeatureStats":
        """The FeatureStats of a :meth:`state_dict` (its config, counts and tensors checked).

        ``device``: where it lives (default: the tensors' device). ``copy=False`` takes the tensors as its
        storage where no conversion is needed (no copy): the caller must not use them afterwards.
        """
        missing = [k for k in ("config", "n_tokens", "tensors") if k not in state]
        if missing:
            raise ValueError(
                f"a FeatureStats state_dict needs the keys {list(STATE_KEYS)}; missing {missing}")
        cfg = FeatureStatsConfig.from_dict(state["config"])
        n_tokens = int_arg("state['n_tokens']", state["n_tokens"], 0)
        obj = cls.__new__(cls)
        obj._setup(cfg, int_arg("state['memory_budget']", state.get("memory_budget", 4 * _GiB), 0),
                   int_arg("state['top_partners']", state.get("top_partners", 10), 1))
        tensors = dict(state["tensors"])
        if device is None:
            device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        kinds = obj._kinds()
        known = {k for _, kind, _ in kinds for k in kind.layout(cfg)}
        if set(tensors) - known:
            extra = sorted(set(tensors) - known)
            raise ValueError(f"the state holds tensors this configuration does not: {extra}")
        obj._co = obj._cond = None
        for attr, kind, options in kinds:
            part = {k: tensors[k] for k in kind.layout(cfg) if k in tensors}
            setattr(obj, attr, kind.from_state_dict(cfg, part, n_tokens=n_tokens, device=device, copy=copy,
                                                    **options))
        obj._bound = True
        return obj

    def save(self, path: str) -> None:
        """Write the state to a safetensors file; the configuration and n_tokens go in its metadata (JSON)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {k: v.contiguous() for k, v in state["tensors"].items()}
        meta = {"format": _FORMAT, "version": str(_VERSION), "config": self._cfg.to_json(),
                "n_tokens": str(state["n_tokens"]), "top_partners": str(state["top_partners"]),
                "memory_budget": str(state["memory_budget"])}
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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = {"config": json.loads(meta["config"]), "n_tokens": int(meta["n_tokens"]),
                 "memory_budget": int(meta["memory_budget"]), "top_partners": int(meta["top_partners"]),
                 "tensors": tensors}
        try:
            return cls.from_state_dict(state, device="cpu" if device is None else device, copy=False)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from e
