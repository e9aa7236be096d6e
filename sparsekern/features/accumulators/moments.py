"""Per-feature moments and histograms of the firing activations (:class:`MomentsAccumulator`)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import Tensor

from .base import Accumulator, Field, nan_like, need
from .batch import FiringBatch
from .config import FeatureStatsConfig


class MomentsAccumulator(Accumulator):
    """Per feature f over the tokens where it fires: ``counts [F]`` int64, ``act_sum``, ``act_sq_sum``
    ``[F]`` (sums of a and a^2), ``act_max [F]`` (0 if never fired), ``act_min [F]`` (inf if never fired),
    and with ``config.histogram`` ``hist_counts [F, hist_bins + 2]`` int64: counts of firing values in
    ``[0, lo)``, ``hist_bins`` log-spaced bins over ``hist_range = (lo, hi)`` (:attr:`hist_edges`), and
    ``[hi, inf)``. Float sums are float64 (float32 on MPS); merges are exact up to float64 rounding.
    """

    @classmethod
    def layout(cls, config: FeatureStatsConfig) -> dict[str, Field]:
        F = config.d_sae
        out = {
            "counts": Field((F,), "int64"),
            "act_sum": Field((F,)),
            "act_sq_sum": Field((F,)),
            "act_max": Field((F,), merge="max"),
            "act_min": Field((F,), fill=math.inf, merge="min"),
        }
        if config.histogram:
            out["hist_counts"] = Field((F, config.hist_bins + 2), "int64")
        return out

    counts = property(lambda self: self._state["counts"])
    act_sum = property(lambda self: self._state["act_sum"])
    act_sq_sum = property(lambda self: self._state["act_sq_sum"])
    act_max = property(lambda self: self._state["act_max"])
    act_min = property(lambda self: self._state["act_min"])
    hist_counts = property(lambda self: self._state.get("hist_counts"))

    def _update(self, batch: FiringBatch) -> None:
        fi, fv = batch.feature, batch.value
        self.counts.add_(batch.counts)
        self.act_sum.index_add_(0, fi, fv)
        self.act_sq_sum.index_add_(0, fi, fv * fv)
        self.act_max.scatter_reduce_(0, fi, fv, "amax")
        self.act_min.scatter_reduce_(0, fi, fv, "amin")
        h = self.hist_counts
        if h is not None:
            edges = self.hist_edges.to(device=fv.device, dtype=fv.dtype)
            b = torch.bucketize(fv, edges, right=True)
            one = torch.ones((), dtype=torch.int64, device=fi.device)
            h.view(-1).index_add_(0, fi * h.shape[1] + b, one.expand(b.numel()))

    # ---- summaries ------------------------------------------------------------------------------------
    @property
    def hist_edges(self) -> Tensor:
        """``[hist_bins + 1]`` float64 log-spaced edges; bin b of ``hist_counts`` (1 <= b <= hist_bins) holds
        values in ``[edges[b-1], edges[b])``, bin 0 values below ``edges[0]``, the last bin the rest."""
        lo, hi = self.config.hist_range
        dev = self.device
        return torch.logspace(math.log10(lo), math.log10(hi), self.config.hist_bins + 1, dtype=torch.float64,
                              device=dev if dev.type != "mps" else "cpu")

    def frequency(self) -> Tensor:
        """``[F]`` firing frequency counts / n_tokens (float64); NaN before any token."""
        fdt = self.act_sum.dtype
        return self.counts.to(fdt) / self.n_tokens if self.n_tokens else nan_like(self.act_sum)

    def log_sparsity(self, eps: float = 1e-10) -> Tensor:
        """``[F]`` log10(frequency + eps): SAELens's ``sparsity.safetensors`` / Dunefsky's
        ``_log_feature_sparsity.pt`` convention (-10 for a feature that never fired)."""
        return torch.log10(self.frequency() + eps)

    def mean_activation(self, given_firing: bool = True) -> Tensor:
        """``[F]`` mean activation over the tokens where the feature fires (NaN if it never did), or over all
        tokens (``given_firing=False``)."""
        if given_firing:
            return self.act_sum / self.counts.to(self.act_sum.dtype)
        return self.act_sum / self.n_tokens if self.n_tokens else nan_like(self.act_sum)

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
        h = need("histogram", self.hist_counts)
        scalar = isinstance(q, numbers.Real)
        qt = torch.as_tensor(q, dtype=torch.float64, device=self.device).reshape(-1)
        if qt.numel() and not bool(((qt >= 0) & (qt <= 1)).all()):
            raise ValueError(f"q must lie in [0, 1], got {q}")
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
