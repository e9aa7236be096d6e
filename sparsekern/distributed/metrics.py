"""Data-parallel :func:`~sparsekern.features.metrics.reconstruction_metrics`: token batches sharded by rank.

Every rank accumulates the float64 :class:`~sparsekern.features.ReconstructionSums` of its own batches;
the sums (not per-rank ratios) are all-reduced (:meth:`ReconstructionSums.all_reduce`, which also moves
them to a common centre) and the metrics computed from them, so every rank gets what one process gets on
all the ranks' batches: firing counts (dead / dense features, density, ``l0``) exactly, the other metrics
to float64 rounding of the sums (the batches' forward passes are the same as there).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

from torch import Tensor

from ..features.metrics import ReconstructionMetrics, ReconstructionSums, reconstruction_sums
from . import _comm
from .data_parallel import run_collectively

__all__ = ["distributed_reconstruction_metrics"]


def _all_reduce_sums(sums: ReconstructionSums, group: Optional[Any]) -> ReconstructionSums:
    """The ranks' sums added up (the same on every rank), through the group's device."""
    dev = _comm.device_for(group)

    def reduce_sum(t: Tensor) -> Tensor:
        return _comm.all_reduce_(t.to(dev), group, "reconstruction metrics: sums")

    return sums.all_reduce(reduce_sum)


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
    known = set(inspect.signature(reconstruction_sums).parameters) - {"model", "sae", "tokens_batches"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"distributed_reconstruction_metrics: unexpected keyword argument(s) {unknown}")
    local = run_collectively(lambda: reconstruction_sums(model, sae, tokens_batches, **kwargs),
                             "reconstruction metrics", group)
    return _all_reduce_sums(local, group).finish()
