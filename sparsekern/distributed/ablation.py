"""Data-parallel SAE feature ablation: one ``ablate_features`` sweep's ablations split across ranks.

Built from the public steps of :mod:`sparsekern.patching.feature_ablation`: every rank plans the whole
sweep as one process would (``plan_ablations``: the active (feature, position) pairs), then
``measure_ablations(..., shard=Shard(rank, world_size))`` runs the baseline and chunk ``i`` (engine) or
ablation ``i`` (``backend="reference"``) iff ``i % world_size == rank``, leaving 0 for the others'
metric values; an all-reduce (sum) fills every ablation's value from exactly one rank (``x + 0 == x``).
Only then does ``assemble_ablations`` lay the result out (deltas, inactive entries, the requested
feature order), from the summed values and the baseline every rank computed itself, so no baseline or
inactive entry is summed.

Exactness: with the same ``max_batch`` or ``memory_budget`` (fixed to the ranks' minimum default budget
when neither is given) each chunk holds the same ablations as in one process, so the result is bitwise
equal to :func:`sparsekern.patching.feature_ablation.ablate_features` (the same exception as
:mod:`.sweeps`: a metric that reads logit positions it did not read on the baseline makes the engine
re-plan, ~1e-7).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..patching import Shard, default_budget
from ..patching.feature_ablation import (
    FeatureAblationResult,
    assemble_ablations,
    measure_ablations,
    plan_ablations,
)
from .data_parallel import _collective, gather_objects, rank_and_world, run_collectively

__all__ = ["distributed_ablate_features"]


def _digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # the bits (bf16 has no numpy dtype)
    return hashlib.sha1(str((t.dtype, tuple(t.shape))).encode() + raw).hexdigest()


def distributed_ablate_features(
    model,
    tokens: Tensor,
    sae,
    metric,
    features: None | Sequence[int] | Tensor = None,
    *,
    group: Optional[Any] = None,
    per_position: bool = False,
    use_error_term: bool = True,
    return_delta: bool = True,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
) -> FeatureAblationResult:
    """``ablate_features(model, tokens, sae, metric, features, ...)`` split across the ranks of ``group``.

    Args: as :func:`sparsekern.patching.feature_ablation.ablate_features` (``tokens [batch, pos]``,
    ``features [n_features]`` or None, ...), the same on every rank; ``group``: process group (default: the
    global one; NCCL needs the model on the rank's GPU). With neither ``max_batch`` nor ``memory_budget``,
    the smallest default budget of the ranks is used so that all ranks plan the same chunks.

    Returns the :class:`FeatureAblationResult` ``(values [n_features] or [n_features, pos], feature_ids
    [n_features], active (as values), baseline [])``, identical on every rank and bitwise equal to the
    single-process call (see the module docstring). RuntimeError if the ranks planned different sweeps or
    got different baselines / active sets (different inputs per rank); if a rank raises, every rank raises.
    """
    rank, world = rank_and_world(group)
    if max_batch is None and memory_budget is None:
        device = torch.device(model.cfg.device) if hasattr(model, "cfg") else torch.device("cpu")
        memory_budget = min(gather_objects(default_budget(device), "ablation memory budget", group))
    shard = Shard(rank, world)

    def local():
        plan = plan_ablations(
            model, tokens, sae, features, per_position=per_position, use_error_term=use_error_term
        )
        measured = measure_ablations(
            plan, metric, progress=progress, max_batch=max_batch, memory_budget=memory_budget,
            backend=backend, shard=shard,
        )  # fmt: skip
        return plan, measured

    plan, m = run_collectively(local, "distributed_ablate_features", group)
    # everything but the values is computed by every rank and must agree bitwise (replicated, not summed)
    mine = {
        "plans": shard.plans,
        "features": _digest(plan.feature_ids),
        "active": _digest(plan.active),
        "baseline": _digest(m.baseline),
        "values": [str(m.values.dtype), list(m.values.shape)],
    }
    seen = gather_objects(mine, "ablation plans", group)
    bad = sorted(k for k in mine if any(s[k] != seen[0][k] for s in seen))
    if bad:
        raise RuntimeError(
            f"distributed_ablate_features: the ranks disagree on {', '.join(bad)} (different model, tokens, "
            "sae, metric, features or max_batch/memory_budget per rank?): pass the same inputs on every rank"
        )
    vals = m.values.contiguous()
    # one rank holds each ablation's value, the others 0 there: the sum is exact whatever the order
    _collective("ablation values", dist.all_reduce, vals, op=dist.ReduceOp.SUM, group=group)
    return assemble_ablations(plan, m._replace(values=vals), return_delta=return_delta)
