"""What fixes the meaning and layout of a FeatureStats state: :class:`FeatureStatsConfig`.

Two states (and their accumulators) merge iff their configurations are equal; the configuration is
stored as JSON beside the tensors (``FeatureStats.save``, the distributed gather).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

from ...ops.validate import int_arg
from .. import _checks as C

GiB = C.GiB
COOCCURRENCE_MODES = ("none", "dense", "subset", "sketch")


@dataclass(frozen=True)
class FeatureStatsConfig:
    """The options of a :class:`~sparsekern.features.FeatureStats` that fix its state (see its docstring).

    ``cooccurrence`` is the resolved mode: ``"none"``, ``"dense"`` (an ``[F, F]`` table), ``"subset"`` (an
    ``[S, S]`` table over ``cooccurrence_features``) or ``"sketch"`` (``partner_capacity`` partners per
    feature). Build it with :meth:`from_arguments` (the constructor's checks) or :meth:`from_dict`.
    """

    d_sae: int
    histogram: bool
    hist_range: tuple[float, float]
    hist_bins: int
    cooccurrence: str
    cooccurrence_features: Optional[tuple[int, ...]]
    partner_capacity: int
    conditioned_on: Optional[int]
    conditioned_counts: bool
    conditioned_sum: bool
    y_moments: bool
    second_moment_features: Optional[tuple[int, ...]]
    second_moment_weighting: str
    source: Optional[str]

    # ---- conversions ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureStatsConfig":
        """From :meth:`to_dict` / parsed :meth:`to_json` (lists become tuples); ValueError on unknown or
        missing fields."""
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"a FeatureStats config has the fields {sorted(names)}; got unknown "
                             f"{sorted(set(d) - names)} and missing {sorted(names - set(d))}")
        d = dict(d)
        d["hist_range"] = tuple(d["hist_range"])
        for key in ("cooccurrence_features", "second_moment_features"):
            if d[key] is not None:
                d[key] = tuple(d[key])
        if d["cooccurrence"] not in COOCCURRENCE_MODES:
            raise ValueError(
                f"config cooccurrence must be one of {COOCCURRENCE_MODES}, got {d['cooccurrence']!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "FeatureStatsConfig":
        return cls.from_dict(json.loads(s))

    def check_same(self, other: "FeatureStatsConfig", what: str = "FeatureStats") -> None:
        """ValueError naming the fields whose values differ (what ``merge`` refuses)."""
        if other != self:
            a, b = asdict(self), asdict(other)
            diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
            raise ValueError(f"cannot merge {what} with different configurations ({diff})")

    @property
    def pair_side(self) -> int:
        """Side R of the pair table: S for a subset table, else F."""
        return len(self.cooccurrence_features) if self.cooccurrence == "subset" else self.d_sae

    # ---- the constructor's arguments --------------------------------------------------------------------
    @classmethod
    def from_arguments(
        cls,
        d_sae: int,
        *,
        histogram: bool,
        hist_range: tuple[float, float],
        hist_bins: int,
        cooccurrence: bool,
        cooccurrence_features: C.FeatureList,
        top_partners: Optional[int],
        partner_capacity: Optional[int],
        memory_budget: int,
        conditioned_on: Optional[int],
        conditioned_counts: bool,
        conditioned_sum: bool,
        y_moments: bool,
        second_moment_features: C.FeatureList,
        second_moment_weighting: str,
        source: Optional[str],
    ) -> tuple["FeatureStatsConfig", int, int]:
        """Check ``FeatureStats(...)``'s arguments; returns ``(config, memory_budget, top_partners n)``
        (n = 0 when no sketch is kept). Raises TypeError/ValueError naming the argument."""
        d_sae = int_arg("d_sae", d_sae, 1)
        memory_budget = int_arg("memory_budget", memory_budget, 0)
        lo, hi = (float(x) for x in hist_range)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"hist_range must be (lo, hi) with 0 < lo < hi < inf, got {hist_range}")
        hist_bins = int_arg("hist_bins", hist_bins, 1, 1 << 16)
        co_feats = C.feature_tuple("cooccurrence_features", cooccurrence_features, d_sae)
        if co_feats is not None and top_partners is not None:
            raise ValueError("pass cooccurrence_features (a subset table) or top_partners (a sketch), "
                             "not both")
        mode, capacity = "none", 0
        if top_partners is not None:
            top_partners = int_arg("top_partners", top_partners, 1)
            capacity = 4 * top_partners if partner_capacity is None else partner_capacity
            capacity = int_arg("partner_capacity", capacity, top_partners)
            mode = "sketch"
            C.memory(f"a partner sketch [F={d_sae}, m={capacity}] (3 int64 each)", 24 * d_sae * capacity,
                     memory_budget, "lower top_partners/partner_capacity or raise memory_budget")
        elif co_feats is not None:
            mode = "subset"
            s = len(co_feats)
            C.memory(f"a [{s}, {s}] int32 co-occurrence table", 4 * s * s, memory_budget,
                     "pass fewer cooccurrence_features or raise memory_budget")
        elif cooccurrence:
            mode = "dense"
            C.memory(
                f"a dense [{d_sae}, {d_sae}] int32 co-occurrence table", 4 * d_sae * d_sae, memory_budget,
                "pass cooccurrence_features=[...] (exact counts on a subset), top_partners=n (each "
                "feature's heaviest partners) or a larger memory_budget",
            )
        elif partner_capacity is not None:
            raise ValueError("partner_capacity needs top_partners")
        if conditioned_on is not None:
            conditioned_on = int_arg("conditioned_on", conditioned_on, 1)
        elif conditioned_sum or y_moments or second_moment_features is not None:
            raise ValueError("conditioned_sum, y_moments and second_moment_features need conditioned_on=d_y")
        if second_moment_weighting not in ("activation", "indicator"):
            raise ValueError(
                "second_moment_weighting must be 'activation' or 'indicator', "
                f"got {second_moment_weighting!r}"
            )
        if source is not None and not isinstance(source, str):
            raise TypeError(f"source must be a str or None, got {type(source).__name__}")
        cfg = cls(
            d_sae=d_sae, histogram=bool(histogram), hist_range=(lo, hi), hist_bins=hist_bins,
            cooccurrence=mode, cooccurrence_features=co_feats, partner_capacity=capacity,
            conditioned_on=conditioned_on,
            conditioned_counts=bool(conditioned_counts) and conditioned_on is not None,
            conditioned_sum=bool(conditioned_sum), y_moments=bool(y_moments),
            second_moment_features=C.feature_tuple("second_moment_features", second_moment_features, d_sae),
            second_moment_weighting=second_moment_weighting, source=source,
        )
        return cfg, memory_budget, top_partners or 0
