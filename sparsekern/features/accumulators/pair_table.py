"""Exact co-occurrence counts in a pair table (:class:`PairTableAccumulator`).

``C[i, j]`` = #tokens on which features i and j both fire, for all features (``[F, F]``) or a subset
(``[S, S]``). Updates count only the upper triangle (pairs a < b); the lower triangle and the diagonal
(= the features' firing counts) are written when the table is read (:attr:`table`), tile by tile.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ...ops.validate import int_arg
from .._pairs import MIRROR_BLOCK, mirror_upper, pair_ids, sorted_live
from .base import Accumulator, Field
from .batch import FiringBatch
from .config import GiB, FeatureStatsConfig

INT32_MAX = 2**31 - 1  # read at call time (tests lower it)
Rows = Union[Tensor, Sequence[int], slice, None]


class PartnerCounts(NamedTuple):
    """Heaviest co-firing partners of each row feature (see ``FeatureStats.top_partners``).

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


class PairTableAccumulator(Accumulator):
    """``pairs [R, R]`` int32 pair counts (``config.cooccurrence`` ``"dense"``: R = F, or ``"subset"``:
    R = S over ``config.cooccurrence_features``).

    The table is promoted to int64 in place before any count could pass 2^31 - 1 (``C[i, j] <= C[i, i]``),
    or OverflowError (nothing added) if the int64 table would exceed ``memory_budget`` bytes.
    ``state_dict`` holds the symmetric table (diagonal = firing counts); ``from_state_dict`` expects one.

    Options: ``memory_budget`` (bytes, default 4 GiB), ``default_n`` (default n of :meth:`top_partners`).
    """

    @classmethod
    def layout(cls, config: FeatureStatsConfig) -> dict[str, Field]:
        if config.cooccurrence not in ("dense", "subset"):
            raise ValueError(
                f"a pair table needs cooccurrence 'dense' or 'subset', got {config.cooccurrence!r}")
        side = config.pair_side
        return {"pairs": Field((side, side), "count")}

    def _setup(self, memory_budget: int = 4 * GiB, default_n: int = 10) -> None:
        self.memory_budget, self.default_n = int(memory_budget), int(default_n)
        dev = self.device
        feats = self.config.cooccurrence_features
        self._pos: Optional[Tensor] = None  # [F] row of each feature, -1 if not in the subset
        if feats is None:
            self.features = torch.arange(self.config.d_sae, device=dev)
        else:
            self.features = torch.tensor(feats, dtype=torch.int64, device=dev)
            self._pos = torch.full((self.config.d_sae,), -1, dtype=torch.int64, device=dev)
            self._pos[self.features] = torch.arange(len(feats), device=dev)
        # firing counts of the rows (the diagonal); a table from a state_dict is symmetric
        self._diag = self._state["pairs"].diagonal().to(torch.int64, copy=True)
        self._synced = True
        self._reserved: Optional[Tensor] = None

    def _rows_of(self, counts: Tensor) -> Tensor:
        return counts if self._pos is None else counts[self.features]

    def reserve(self, batch: FiringBatch) -> None:
        """Promote the table now if the batch's counts require it: OverflowError before anything of the
        batch is added anywhere (``FeatureStats.update`` calls this first)."""
        self._promote(self._rows_of(batch.counts))
        self._reserved = batch.counts  # _update need not check this batch again (a host sync)

    def _promote(self, added: Tensor, force: bool = False) -> None:
        """Promote the int32 table to int64 if a count could pass 2^31 - 1 once ``added [R]`` row counts are
        added (``force``: promote anyway); OverflowError (nothing changed) if the int64 table would exceed
        ``memory_budget``."""
        t = self._state["pairs"]
        if t.dtype == torch.int64:
            return
        if not force and int((self._diag + added).max()) <= INT32_MAX:
            return
        side = t.shape[0]
        if 8 * side * side > self.memory_budget:
            raise OverflowError(
                f"a co-occurrence count could pass 2^31 - 1 and the table promoted to int64 [{side}, {side}] "
                f"needs {8 * side * side / GiB:.2f} GiB > memory_budget={self.memory_budget / GiB:.2f} GiB "
                "(nothing was added): raise memory_budget or count a feature subset"
            )
        self._state["pairs"] = t.to(torch.int64)

    def _update(self, batch: FiringBatch) -> None:
        if self._reserved is not batch.counts:
            self.reserve(batch)
        self._reserved = None
        side = self._diag.shape[0]
        key = batch.key
        if self._pos is not None:
            pos = self._pos[batch.indices]
            key = sorted_live(pos, batch.live & (pos >= 0), side)
        idt = torch.int32 if side * (side + 1) <= INT32_MAX else torch.int64
        flat = self._state["pairs"].view(-1)
        one = torch.ones((), dtype=flat.dtype, device=flat.device)
        for ids in pair_ids(key, side, idt):
            flat.index_add_(0, ids, one.expand(ids.numel()))
        self._diag += self._rows_of(batch.counts)
        self._synced = False  # the diagonal (= counts) changes even without pairs

    def _merge(self, other: "PairTableAccumulator", theirs: dict[str, Tensor]) -> None:
        added = other._diag.to(self.device)
        self._promote(added, force=theirs["pairs"].dtype == torch.int64)
        # the element-wise sum adds stale lower triangles too: only the upper one counts
        self._diag += added
        self._synced = False

    def state_dict(self) -> dict[str, Tensor]:
        _ = self.table  # the symmetric table
        return super().state_dict()

    # ---- reading ---------------------------------------------------------------------------------------
    @property
    def table(self) -> Tensor:
        """``[R, R]`` int32 (int64 once promoted) symmetric pair counts, ``C[i, i]`` = firing count of row
        i; the state's own storage (no copy): do not modify it."""
        t = self._state["pairs"]
        if not self._synced:
            mirror_upper(t, self._diag)
            self._synced = True
        return t

    def _pair_counts(self, rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
        """(C[rows] as float64 [r, R], C_ii of the rows [r, 1], C_jj [1, R])."""
        table = self.table
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
        """The n partners j != i with the most co-firings for every row i: exact (``lower == upper``);
        n is capped at R - 1 (default ``default_n``)."""
        table, feats = self.table, self.features
        side = table.shape[0]
        n = min(self.default_n if n is None else int_arg("n", n, 1), side - 1)  # only side - 1 partners exist
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
