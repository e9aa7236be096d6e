"""Each feature's heaviest co-firing partners in bounded memory (:class:`PartnerSketchAccumulator`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...ops.validate import int_arg
from .._pairs import Sketch, pair_ids, sketch_combine, sketch_entries
from .base import Accumulator, Field
from .batch import FiringBatch
from .config import FeatureStatsConfig
from .pair_table import PartnerCounts


class PartnerSketchAccumulator(Accumulator):
    """Per feature up to m = ``config.partner_capacity`` partners (a batched, weighted Space-Saving /
    mergeable Misra-Gries summary): ``sketch_part [F, m]`` partner ids (-1 empty), ``sketch_lo`` /
    ``sketch_hi [F, m]`` bounds on the pair counts, ``sketch_u [F]`` a bound on every partner not kept.

    Option: ``default_n`` (default n of :meth:`top_partners`).
    """

    @classmethod
    def layout(cls, config: FeatureStatsConfig) -> dict[str, Field]:
        if config.cooccurrence != "sketch":
            raise ValueError(f"a partner sketch needs cooccurrence 'sketch', got {config.cooccurrence!r}")
        F, m = config.d_sae, config.partner_capacity
        return {
            "sketch_part": Field((F, m), "int64", fill=-1, merge="custom"),
            "sketch_lo": Field((F, m), "int64", merge="custom"),
            "sketch_hi": Field((F, m), "int64", merge="custom"),
            "sketch_u": Field((F,), "int64", merge="custom"),
        }

    def _setup(self, default_n: int = 10) -> None:
        self.default_n = int(default_n)

    @property
    def sketch(self) -> Sketch:
        s = self._state
        return Sketch(s["sketch_part"], s["sketch_lo"], s["sketch_hi"], s["sketch_u"])

    def _set(self, s: Sketch) -> None:
        self._state.update({f"sketch_{k}": v for k, v in s._asdict().items()})

    def _update(self, batch: FiringBatch) -> None:
        F, m = self.config.d_sae, self.config.partner_capacity
        uniq, cnt = [], []
        for ids in pair_ids(batch.key, F, torch.int64):
            u, c = torch.unique(ids, return_counts=True)
            uniq.append(u)
            cnt.append(c)
        if not uniq:
            return
        ids, inv = torch.unique(torch.cat(uniq), return_inverse=True)
        c = torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device).index_add_(0, inv, torch.cat(cnt))
        a, b = ids // F, ids % F
        pairs = (torch.cat((a, b)), torch.cat((b, a)), torch.cat((c, c)), torch.cat((c, c)))
        s = self.sketch
        self._set(sketch_combine(F, m, sketch_entries(s), s.u, pairs, torch.zeros_like(s.u)))

    def _merge(self, other: "PartnerSketchAccumulator", theirs: dict[str, Tensor]) -> None:
        s = self.sketch
        t = Sketch(*(theirs[f"sketch_{k}"] for k in Sketch._fields))
        self._set(sketch_combine(self.config.d_sae, self.config.partner_capacity, sketch_entries(s), s.u,
                                 sketch_entries(t), t.u))

    def top_partners(self, n: Optional[int] = None) -> PartnerCounts:
        """The n (<= m, default ``default_n``) heaviest partners of every feature, with bounds: ``lower <=
        C[i, j] <= upper`` for every listed partner (exact where equal: always so for a feature with at most
        m distinct partners so far); every partner with ``C[i, j] > unlisted_bound[i]`` is listed; and the
        sketch's own bound ``u_i <= N_i / (m + 1)`` with N_i = sum_{j != i} C[i, j], however the updates
        were batched and states merged."""
        m = self.config.partner_capacity
        n = self.default_n if n is None else int_arg("n", n, 1, m)
        s = self.sketch
        bound = s.u if n == m else torch.maximum(s.u, s.hi[:, n])
        return PartnerCounts(torch.arange(self.config.d_sae, device=self.device), s.part[:, :n].clone(),
                             s.lo[:, :n].clone(), s.hi[:, :n].clone(), bound)
