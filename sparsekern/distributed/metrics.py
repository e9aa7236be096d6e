"""Data-parallel :func:`~sparsekern.features.metrics.reconstruction_metrics`: token batches sharded by rank.

Every rank accumulates the float64 sums of its own batches; the sums (not per-rank ratios) are
all-reduced and the metrics computed from them, so every rank gets what one process gets on all the
ranks' batches: firing counts (dead / dense features, density, ``l0``) exactly, the other metrics to
float64 rounding of the sums (the batches' forward passes are the same as there).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..features.metrics import _SUMS, ReconstructionMetrics, _finish, _Recon, _reconstruction_sums, _Sums
from . import _comm
from .data_parallel import rank_and_world, run_collectively

__all__ = ["distributed_reconstruction_metrics"]

_CE = ("clean", "sae", "zero", "kl_sae", "kl_zero", "n_ce", "n_kl")


def _all_reduce_sums(s: _Sums, d: int, group: Optional[Any]) -> _Sums:
    """The ranks' :class:`_Sums` added up. ``_Recon`` keeps ``sum ||x - c||^2`` and ``sum (x - c)`` about
    its first batch's mean ``c`` (less cancellation); the ranks' ``c`` differ, so each rank re-centres its
    sums on a common ``c`` (the first rank with tokens) before they are summed:
    ``sum ||x - c||^2 = sum ||x - c_r||^2 + 2 (c_r - c) . sum (x - c_r) + n_r ||c_r - c||^2``."""
    rank, world = rank_and_world(group)
    dev = _comm._device_for(group)
    r = s.recon
    n_all = torch.zeros(world, dtype=torch.float64, device=dev)
    n_all[rank] = r.n
    _comm.all_reduce_(n_all, group, "reconstruction metrics: tokens per rank")
    owners = [k for k, v in enumerate(n_all.tolist()) if v > 0]
    c = torch.zeros(d, dtype=torch.float64, device=dev)
    if owners and rank == owners[0]:
        c += r.shift.to(dev)
    _comm.all_reduce_(c, group, "reconstruction metrics: centre")
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=dev)
    sum_xc = torch.zeros(d, dtype=torch.float64, device=dev)
    if r.n:
        delta = r.shift.to(dev) - c
        sums += r.sums.to(dev)
        own_xc = r.sum_xc.to(dev)
        sums[_SUMS.index("sq_c")] += 2 * (delta @ own_xc) + r.n * delta.pow(2).sum()
        sum_xc += own_xc + r.n * delta
    ce = torch.tensor([float(s.ce[k]) for k in _CE] + [float(s.n_seq)], dtype=torch.float64, device=dev)
    flat = _comm.all_reduce_(torch.cat([sums, sum_xc, ce]), group, "reconstruction metrics: sums")
    counts = _comm.all_reduce_(s.counts.to(dev), group, "reconstruction metrics: firing counts")
    out = _Recon()
    out.n = int(n_all.sum().item())
    if out.n:
        k = len(sums)
        out.shift, out.sums, out.sum_xc = c, flat[:k], flat[k : k + d]
    ce_tot = flat[len(sums) + d:].tolist()
    return s._replace(recon=out, counts=counts.to(s.counts.device), ce=dict(zip(_CE, ce_tot[:-1])),
                      n_seq=int(ce_tot[-1]))


def distributed_reconstruction_metrics(
    model: Any, sae: Any, tokens_batches: Iterable[Tensor], *, group: Optional[Any] = None, **kwargs: Any
) -> ReconstructionMetrics:
    """:func:`~sparsekern.features.metrics.reconstruction_metrics` over every rank's ``tokens_batches``.

    Args:
        model, sae, kwargs: as there, the same on every rank (``hook_name``, ``ignore_tokens``,
            ``compute_downstream``, ...).
        tokens_batches: this rank's int token batches ``[batch, pos]`` (e.g. sequences
            ``sharded_range(n_seq)``); a rank may have none.
        group: process group (default: the global one; NCCL needs the model on the rank's GPU).

    Returns the :class:`ReconstructionMetrics` of all ranks' batches, the same on every rank (see the
    module docstring); ``n_tokens`` / ``n_sequences`` count all ranks'. Collective: if a rank raises,
    every rank raises.
    """
    kw = dict(hook_name=None, hook_name_out=None, compute_downstream=True, ignore_tokens=None,
              dense_threshold=0.1, skip_early_layers=True, progress=True, total=None)
    unknown = sorted(set(kwargs) - set(kw))
    if unknown:
        raise TypeError(f"distributed_reconstruction_metrics: unexpected keyword argument(s) {unknown}")
    kw.update(kwargs)
    local = run_collectively(lambda: _reconstruction_sums(model, sae, tokens_batches, **kw),
                             "reconstruction metrics", group)
    d = math.prod(sae.W_dec.shape[1:])  # the reconstructed rows' width ([rows, d] after flattening)
    return _finish(_all_reduce_sums(local, d, group))
