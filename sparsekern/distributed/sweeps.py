"""Data-parallel activation-patching sweeps: one sweep's patches split across ranks, gathered exactly.

Every rank calls the sweep with ``shard=sparsekern.patching.Shard(rank, world_size)``: it resolves and
plans the whole sweep as a single process would (the corrupted run, the no-op patches, the chunks of
patches that share one staged forward), runs the chunks ``i`` with ``i % world_size == rank`` and leaves
0 in the others' slots; an all-reduce (sum) of the outputs then fills every slot from exactly one rank
(``x + 0 == x``), so every rank returns the full result.

Exactness: a chunk holds the same patches as in the single-process run, so with the same ``max_batch``
or ``memory_budget`` (``distributed_patch`` fixes the budget to the ranks' minimum when neither is given)
the result is bitwise equal to the single-process call. One exception: a metric that reads logit
positions it did not read on the corrupted run makes the engine re-plan; the result then differs from
the single-process one at float rounding (as ``max_batch`` does, ~1e-7).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import patching
from ..patching import Shard, default_budget
from ..patching.feature_ablation import ablate_features
from .data_parallel import _collective, gather_objects, rank_and_world, run_collectively

__all__ = ["distributed_patch"]

_EVERY = ("get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every",
          "get_act_patch_block_every")


def _check_fn(fn: Callable) -> None:
    base = fn.func if isinstance(fn, functools.partial) else fn
    if base is patching.generic_activation_patch or any(base is getattr(patching, n) for n in _EVERY):
        return
    raise TypeError(
        "fn must be sparsekern.patching.generic_activation_patch, one of the get_act_patch_* functions, "
        f"a *_every function or feature_ablation.ablate_features, got {getattr(fn, '__name__', fn)!r} "
        "(other sweeps assemble their outputs differently and cannot be summed across ranks)"
    )


def _tensors(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def distributed_patch(fn: Callable, *args: Any, group: Optional[Any] = None, **kwargs: Any) -> Any:
    """Run the ``sparsekern.patching`` sweep ``fn(*args, **kwargs)`` split across the ranks of ``group``.

    Args:
        fn: ``generic_activation_patch``, a ``get_act_patch_*`` function or a ``*_every`` function of
            ``sparsekern.patching``, or ``sparsekern.patching.feature_ablation.ablate_features`` (run by
            :func:`.ablation.distributed_ablate_features`; returns its ``FeatureAblationResult``).
        args, kwargs: its arguments (``model, corrupted_tokens, clean_cache, metric, ...``), the same on every
            rank (checked: the ranks' plans must agree, else RuntimeError). ``max_batch`` /
            ``memory_budget`` work as there; with neither, the smallest default budget of the ranks is used
            so that all ranks plan the same chunks.
        group: process group (default: the global one). NCCL needs the model on the rank's GPU.

    Returns ``fn``'s output (a tensor ``[...]`` on the model device, or ``(tensor, index_df)``), identical on
    every rank and equal to the single-process call (bitwise; see the module docstring). If a rank raises,
    every rank raises (RuntimeError naming it).
    """
    if (fn.func if isinstance(fn, functools.partial) else fn) is ablate_features:
        # its values are summed before the result is laid out (deltas, inactive entries): its own path
        from .ablation import distributed_ablate_features

        if isinstance(fn, functools.partial):
            args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
        return distributed_ablate_features(*args, group=group, **kwargs)
    _check_fn(fn)
    if "shard" in kwargs:
        raise TypeError("distributed_patch: do not pass shard=; each rank's Shard is made from group")
    rank, world = rank_and_world(group)
    if kwargs.get("max_batch") is None and kwargs.get("memory_budget") is None:
        model = kwargs.get("model", args[0] if args else None)
        device = torch.device(model.cfg.device) if hasattr(model, "cfg") else torch.device("cpu")
        budgets = gather_objects(default_budget(device), "patching memory budget", group)
        kwargs["memory_budget"] = min(budgets)
    shard = Shard(rank, world)

    def local() -> Any:
        return fn(*args, shard=shard, **kwargs)

    out = run_collectively(local, f"distributed_patch({getattr(fn, '__name__', 'fn')})", group)
    plans = gather_objects(shard.plans, "patching plans", group)
    if any(p != plans[0] for p in plans):
        raise RuntimeError(
            "distributed_patch: the ranks planned different sweeps (different model, tokens, cache, index_df "
            "or max_batch/memory_budget per rank?): pass the same inputs on every rank"
        )
    if not shard.plans:  # pragma: no cover - every supported fn runs a sharded engine or reference pass
        raise RuntimeError("distributed_patch: fn ran no sharded sweep")
    for t in _tensors(out):
        # one rank holds each slot, the others 0 there: the sum is exact whatever the reduction order
        _collective("patching results", dist.all_reduce, t, op=dist.ReduceOp.SUM, group=group)
    return out
