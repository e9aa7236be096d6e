"""Statistics of another activation ``y`` given each feature fires (:class:`ConditionedAccumulator`).

``cond_act_sum[f] = sum_t a_f(t) y(t)`` and the counts ``#{t: f fires, y(t) > 0}`` are segmented
reductions over the code: the ``sparse_decode`` weight gradient (:func:`sparsekern.ops.
sparse_decode_backward_weight`) with ``y`` as the "gradient". Each call writes a fresh ``[F, d_y]``
output, a cost fixed per call, so small batches are buffered and reduced together.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...ops import sparse_decode_backward_weight
from .base import Accumulator, Field, need
from .batch import FiringBatch
from .config import FeatureStatsConfig

FLUSH_SLOTS_PER_FEATURE = 8  # reduce buffered rows once they hold 8 F slots ...
PENDING_BYTES = 64 << 20  # ... or 64 MiB
ADD_BLOCK = 1 << 20  # elements per block when adding a kernel output into the state
COUNT_ROWS = 1 << 24  # rows per float32 count kernel call: float32 counts are exact below 2^24


def compute_dtype(*ts: Tensor) -> torch.dtype:
    """Per-batch partial sums: float64 stays float64 (the oracle dtype), anything else accumulates in
    float32; the running state is float64 either way."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def accumulate(dst: Tensor, src: Tensor, rows: Optional[Tensor] = None) -> None:
    """``dst += src`` (``dst[rows] += src`` if ``rows``), cast to ``dst.dtype`` (an int64 ``dst`` takes float
    sums of exact integers) a block at a time: one mixed-dtype add of a large ``src`` is several times
    slower (page faults on a full-size temporary)."""
    step = max(1, ADD_BLOCK // max(1, src.shape[1]))
    for r0 in range(0, src.shape[0], step):
        part = src[r0:r0 + step].to(dst.dtype)
        if rows is None:
            dst[r0:r0 + step] += part
        else:
            dst.index_add_(0, rows[r0:r0 + step], part)


class ConditionedAccumulator(Accumulator):
    """For ``y [N, d_y]`` aligned with the code's rows (d_y = ``config.conditioned_on``):

    * ``cond_act_sum [F, d_y]`` float64 ``sum_t a_f(t) y(t)``;
    * ``cond_pos_count [F, d_y]`` int64 ``#{t: f fires, y(t) > 0}`` (``config.conditioned_counts``);
    * ``cond_sum [F, d_y]`` float64 ``sum_{t: f fires} y(t)`` (``config.conditioned_sum``);
    * ``cond_second_moment [S, d_y, d_y]`` ``sum_{t: f_s fires} w_s(t) y(t) y(t)^T`` for the
      ``config.second_moment_features`` (``w_s = a_{f_s}`` or 1, ``config.second_moment_weighting``);
    * ``y_mean [d_y]`` and ``y_m2 [d_y, d_y]`` (``config.y_moments``): mean and centred second moment of
      ``y`` over all tokens, merged with Chan's formula (no catastrophic cancellation).

    Float state is float64 (float32 on MPS); per-batch partial sums of float32/bf16/fp16 inputs are taken
    in float32, float64 inputs stay float64.
    """

    @classmethod
    def layout(cls, config: FeatureStatsConfig) -> dict[str, Field]:
        F, d_y = config.d_sae, config.conditioned_on
        if d_y is None:
            raise ValueError("conditioned statistics need config.conditioned_on=d_y")
        out = {"cond_act_sum": Field((F, d_y))}
        if config.conditioned_counts:
            out["cond_pos_count"] = Field((F, d_y), "int64")
        if config.conditioned_sum:
            out["cond_sum"] = Field((F, d_y))
        if config.second_moment_features is not None:
            out["cond_second_moment"] = Field((len(config.second_moment_features), d_y, d_y))
        if config.y_moments:
            out["y_mean"] = Field((d_y,), merge="custom")
            out["y_m2"] = Field((d_y, d_y), merge="custom")
        return out

    def _setup(self) -> None:
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (a, indices, y) rows not yet reduced
        self._pending_rows = 0
        self._sm_feats = self._sm_pos = None
        feats = self.config.second_moment_features
        if feats is not None:
            dev = self.device
            self._sm_feats = torch.tensor(feats, dtype=torch.int64, device=dev)
            self._sm_pos = torch.full((self.config.d_sae,), -1, dtype=torch.int64, device=dev)
            self._sm_pos[self._sm_feats] = torch.arange(len(feats), device=dev)

    # ---- reading (buffered rows are reduced first) ----------------------------------------------------
    def _get(self, name: str) -> Optional[Tensor]:
        self._flush()
        return self._state.get(name)

    cond_act_sum = property(lambda self: self._get("cond_act_sum"), doc="``[F, d_y]`` sum_t a_f(t) y(t)")
    cond_pos_count = property(lambda self: self._get("cond_pos_count"),
                              doc="``[F, d_y]`` int64 #{t: f fires and y(t) > 0} (None if not kept)")
    cond_sum = property(lambda self: self._get("cond_sum"),
                        doc="``[F, d_y]`` sum_{t: f fires} y(t) (or None)")
    cond_second_moment = property(lambda self: self._state.get("cond_second_moment"),
                                  doc="``[S, d_y, d_y]`` second moments given the chosen features (or None)")

    @property
    def second_moment_features(self) -> Optional[Tensor]:
        """``[S]`` feature id of each slice of ``cond_second_moment`` (None if not kept)."""
        return self._sm_feats

    @property
    def pending_rows(self) -> int:
        """Rows buffered for the next reduction (0 after any read of the sums)."""
        return self._pending_rows

    def _settled(self) -> dict[str, Tensor]:
        self._flush()
        return self._state

    def y_mean(self) -> Tensor:
        """``[d_y]`` mean of ``y`` over all tokens (needs ``y_moments=True``); NaN before any token."""
        mean = need("y_moments", self._state.get("y_mean"))
        return mean.clone() if self.n_tokens else torch.full_like(mean, math.nan)

    def y_covariance(self, correction: int = 1) -> Tensor:
        """``[d_y, d_y]`` covariance of ``y`` over tokens, divided by ``n_tokens - correction`` (as in
        torch.cov)."""
        return need("y_moments", self._state.get("y_m2")) / (self.n_tokens - correction)

    # ---- update ------------------------------------------------------------------------------------------
    def _update(self, batch: FiringBatch) -> None:
        values, indices, y = batch.values, batch.indices, batch.y
        if y is None:
            raise ValueError(f"y [N, d_y={self.config.conditioned_on}] is required")
        cdt = compute_dtype(values, y)
        a = torch.where(batch.live, values, 0).to(cdt)  # a fresh tensor: safe to keep
        y_c = y.to(cdt)
        if self._sm_feats is not None:
            self._update_second_moment(batch, y_c)
        if "y_mean" in self._state:
            self._update_y_moments(y_c)
        n, k, F = values.shape[0], values.shape[1], self.config.d_sae
        # pending rows are reduced together once they hold enough slots to outweigh the per-call cost
        if self._pending or n * k < FLUSH_SLOTS_PER_FEATURE * F:
            self._pending.append((a, indices.clone(), y_c.clone() if y_c is y else y_c))
            self._pending_rows += n
            pending_bytes = self._pending_rows * (y_c.shape[1] * y_c.element_size() + 16 * k)
            if self._pending_rows * k >= FLUSH_SLOTS_PER_FEATURE * F or pending_bytes >= PENDING_BYTES:
                self._flush()
        else:
            self._reduce(a, indices, y_c)

    def _flush(self) -> None:
        """Reduce the pending rows into the state."""
        if not self._pending:
            return
        parts, self._pending, self._pending_rows = self._pending, [], 0
        if len(parts) == 1:
            self._reduce(*parts[0])
            return
        k = max(p[0].shape[1] for p in parts)  # threshold codes: k varies by batch; pad with 0 at index 0
        pad = torch.nn.functional.pad
        parts = [(pad(a, (0, k - a.shape[1])), pad(i, (0, k - i.shape[1])), y) for a, i, y in parts]
        self._reduce(*(torch.cat(t) for t in zip(*parts)))

    def _reduce(self, a: Tensor, indices: Tensor, y_c: Tensor) -> None:
        """Add ``sum a y``, ``#{fire, y > 0}`` (and ``sum_{fire} y``) of the rows ``a, indices [n, k]``,
        ``y_c [n, d_y]``."""
        cdt, s = y_c.dtype, self._state
        # when few features appear, renumber them 0..U-1 so the kernel writes U rows, not F
        feats, local = torch.unique(indices, return_inverse=True)
        if 2 * feats.numel() > self.config.d_sae:
            feats, local = None, indices
        n_out = self.config.d_sae if feats is None else feats.numel()
        # out[f] = sum over slots with index f of a * y[row]: the sparse_decode weight gradient
        accumulate(s["cond_act_sum"], sparse_decode_backward_weight(y_c, a, local, n_out), feats)
        fire = (a > 0).to(torch.float32)
        if "cond_pos_count" in s:
            ypos = (y_c > 0).to(torch.float32)
            for r0 in range(0, a.shape[0], COUNT_ROWS):  # float32 sums of 0/1 are exact below 2^24
                r = slice(r0, r0 + COUNT_ROWS)
                counts = sparse_decode_backward_weight(ypos[r], fire[r], local[r], n_out)
                accumulate(s["cond_pos_count"], counts, feats)
        if "cond_sum" in s:
            accumulate(s["cond_sum"], sparse_decode_backward_weight(y_c, fire.to(cdt), local, n_out), feats)

    def _update_second_moment(self, batch: FiringBatch, y: Tensor) -> None:
        sm = self._state["cond_second_moment"]
        s = self._sm_pos[batch.feature]
        sel = s >= 0
        s, w, rows = s[sel], batch.value[sel], batch.row[sel]
        if self.config.second_moment_weighting == "indicator":
            w = torch.ones_like(w)
        for j in s.unique().tolist():
            m = s == j
            ys = y[rows[m]]
            sm[j].add_((ys * w[m].to(ys.dtype)[:, None]).t() @ ys)

    def _update_y_moments(self, y: Tensor) -> None:
        nb, na = y.shape[0], self.n_tokens
        mean_b = y.mean(0)
        yc = y - mean_b
        self._chan_merge(na, nb, mean_b.to(self._state["y_mean"].dtype), yc.t() @ yc)

    def _chan_merge(self, na: int, nb: int, mean_b: Tensor, m2_b: Tensor) -> None:
        mean, m2 = self._state["y_mean"], self._state["y_m2"]
        n = na + nb
        delta = mean_b - mean
        m2.add_(m2_b).add_(torch.outer(delta, delta), alpha=na * nb / n)
        mean.add_(delta, alpha=nb / n)

    # ---- merge ---------------------------------------------------------------------------------------------
    def _merge(self, other: "ConditionedAccumulator", theirs: dict[str, Tensor]) -> None:
        self._flush()  # before the element-wise sums, as the state would be read
        if "y_mean" in self._state and other.n_tokens:
            if self.n_tokens:
                self._chan_merge(self.n_tokens, other.n_tokens, theirs["y_mean"], theirs["y_m2"])
            else:
                self._state["y_mean"].copy_(theirs["y_mean"])
                self._state["y_m2"].copy_(theirs["y_m2"])
