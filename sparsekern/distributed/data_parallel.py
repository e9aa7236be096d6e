"""Data-parallel feature analysis on ``torch.distributed``: a dataset sharded by rank, merged exactly.

Every rank runs :func:`~sparsekern.features.top_activating_examples` /
:func:`~sparsekern.features.feature_stats` on its own shard; the states are all-gathered and merged
*in rank order*, so every rank ends with the same result:

* :class:`~sparsekern.ops.FeatureTopKState`: bitwise equal to one process over the whole stream.
  ``feature_topk_update`` keeps the first k entries of each feature under the strict total order
  (value desc, seq asc, pos asc); with globally numbered sequences (``seq_offset`` = the shard's first
  sequence) no two ranks share a location, and the top k of a union is the top k of the union of the
  parts' top k's, ties included.
* :class:`~sparsekern.features.FeatureStats`: counts, histograms, pair tables, max/min are exact
  (integers / order-free); float64 sums differ from the single-process stream only by the order of the
  additions (relative ~1e-15); the partner sketch merges with its documented bounds.

Collectives go through the default process group (or ``group``); NCCL needs the SAE on the rank's GPU.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..features.stats import FeatureStats, feature_stats
from ..features.top_examples import top_activating_examples
from ..ops.feature_topk import FeatureTopKState, feature_topk_update
from ..sparse_acts import SparseActs
from . import _comm

__all__ = [
    "all_gather_feature_stats",
    "all_gather_topk_state",
    "distributed_feature_stats",
    "distributed_top_activating_examples",
    "merge_topk_states",
    "rank_and_world",
    "run_collectively",
    "sharded_range",
]


# ---- process-group helpers (shared by sweeps.py, ablation.py and ddp.py) ------------------------------------------
def rank_and_world(group: Optional[Any] = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; RuntimeError if ``torch.distributed`` is not initialised."""
    return _comm.rank_world(group)


def sharded_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> range:
    """The contiguous share ``range(start, stop)`` of ``n`` items (sequences, rows) owned by ``rank``.

    The first ``n % world_size`` ranks get one item more; shares are disjoint, in rank order, and cover
    ``range(n)``. ``rank``/``world_size`` default to the current process group's.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if rank is None or world_size is None:
        r, w = rank_and_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return range(*_comm.split_range(n, rank, world_size))


def _collective(what: str, fn, *args, **kwargs):
    """Run one collective; a failure (a peer raised, exited or timed out) names the operation and rank."""
    return _comm.collective(f"collective {what!r}", lambda: fn(*args, **kwargs))


def gather_objects(obj: Any, what: str, group: Optional[Any] = None) -> list:
    """Every rank's JSON-able ``obj`` in rank order (:func:`._comm.gather_json`: no pickle)."""
    return _comm.gather_json(obj, group, what)


def run_collectively(fn, what: str, group: Optional[Any] = None):
    """``fn()`` on every rank, then agree on failure: if any rank raised, every rank raises.

    The rank that raised re-raises its own exception; the others raise RuntimeError naming it, at once
    instead of waiting for a collective timeout.
    """
    err, result = None, None
    try:
        result = fn()
    except Exception as e:  # reported to the other ranks, then re-raised below
        err = e
    msgs = gather_objects(None if err is None else f"{type(err).__name__}: {err}", f"{what} (status)", group)
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        who = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise RuntimeError(f"sparsekern.distributed: {what} failed on another rank ({who})")
    return result


def _all_gather(t: Tensor, what: str, group: Optional[Any]) -> list[Tensor]:
    """Every rank's ``t`` in rank order (:func:`._comm.all_gather`), a failure named as :func:`_collective`."""
    return _comm.all_gather(t, group, f"collective {what!r}")


# ---- top activating examples -----------------------------------------------------------------------
def merge_topk_states(states: Sequence[FeatureTopKState]) -> FeatureTopKState:
    """Merge per-shard states (same d_sae, k, dtype, device) into a new one, deterministically.

    The result is the top k of the union of their entries under (value desc, seq asc, pos asc), so it
    equals the state of one pass over all shards bit for bit when no location appears in two states
    (give every shard globally numbered sequences). Entries with value <= 0 cannot be in a state built
    by ``feature_topk_update`` and are not merged.
    """
    states = list(states)
    if not states or not all(isinstance(s, FeatureTopKState) for s in states):
        raise TypeError("states must be a non-empty sequence of FeatureTopKState")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        lay = (s.d_sae, s.k, s.values.dtype, s.device)
        lay0 = (first.d_sae, first.k, first.values.dtype, first.device)
        if lay != lay0:
            raise ValueError(f"states[{i}] has (d_sae, k, dtype, device) = {lay}, states[0] {lay0}")
    out = first.clone()
    for s in states[1:]:
        # every filled slot is a one-entry row: (value, feature) at its own (seq, pos)
        feat, slot = (s.locations[..., 0] >= 0).nonzero(as_tuple=True)
        if feat.numel():
            acts = SparseActs(s.values[feat, slot][:, None].contiguous(), feat[:, None].contiguous())
            feature_topk_update(out, acts, s.locations[feat, slot].contiguous(), inplace=True)
    return out


def all_gather_topk_state(state: FeatureTopKState, group: Optional[Any] = None) -> FeatureTopKState:
    """Gather every rank's :class:`FeatureTopKState` and merge them in rank order (same result everywhere)."""
    if not isinstance(state, FeatureTopKState):
        raise TypeError(f"state must be a FeatureTopKState, got {type(state).__name__}")
    layout = (state.d_sae, state.k, str(state.values.dtype))
    layouts = gather_objects(layout, "top-k state layout", group)
    if any(lay != layouts[0] for lay in layouts):
        raise ValueError(f"ranks hold top-k states of different (d_sae, k, dtype): {layouts}")
    values = _all_gather(state.values, "top-k values", group)
    locations = _all_gather(state.locations, "top-k locations", group)
    return merge_topk_states([FeatureTopKState(v, loc) for v, loc in zip(values, locations)])


class _Counted:
    """Iterates ``batches`` and counts the sequences (leading dim of each batch) they hold."""

    def __init__(self, batches: Iterable[Any]):
        self.batches, self.n = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.n += int(b.shape[0]) if isinstance(b, Tensor) else 0
            yield b

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  (tqdm's total; TypeError if unknown)


@torch.no_grad()
def distributed_top_activating_examples(
    sae: Any,
    batches: Iterable[Tensor],
    *,
    seq_offset: int,
    k: int = 20,
    group: Optional[Any] = None,
    **kwargs: Any,
) -> FeatureTopKState:
    """:func:`~sparsekern.features.top_activating_examples` over a dataset sharded by rank.

    Args:
        sae, batches, k, kwargs: as ``top_activating_examples`` (``model=``, ``hook_name=``, ``progress=``);
            ``batches`` are this rank's shard: token batches ``[batch, pos]`` (with a model) or activations
            ``[batch, pos, d_in]`` / ``[rows, d_in]``.
        seq_offset: global number of this shard's first sequence (e.g. ``sharded_range(n_seq).start``), so
            locations refer to the whole dataset. Shards must not overlap (checked: ValueError).
        group: process group (default: the global one).

    Returns the merged ``FeatureTopKState`` (identical on every rank; bitwise equal to one process running
    ``top_activating_examples`` over all shards in order). If a rank raises, every rank raises.
    """
    if "state" in kwargs:
        raise ValueError("state= is not supported here: merge states with merge_topk_states instead")
    counted = _Counted(batches)

    def local() -> FeatureTopKState:
        return top_activating_examples(sae, counted, k=k, seq_offset=seq_offset, **kwargs)

    state = run_collectively(local, "top_activating_examples", group)
    spans = gather_objects((int(seq_offset), int(seq_offset) + counted.n), "sequence ranges", group)
    order = sorted((r for r, (s, e) in enumerate(spans) if e > s), key=lambda r: spans[r])
    for a, b in zip(order, order[1:]):  # sorted by start: any overlap shows between neighbours
        (s0, e0), (s1, e1) = spans[a], spans[b]
        if s1 < e0:
            raise ValueError(
                f"rank {a}'s sequences [{s0}, {e0}) overlap rank {b}'s [{s1}, {e1}): give each rank a "
                "disjoint shard and its first global sequence number as seq_offset (see sharded_range)"
            )
    return all_gather_topk_state(state, group)


# ---- feature statistics ----------------------------------------------------------------------------
@torch.no_grad()
def all_gather_feature_stats(stats: FeatureStats, group: Optional[Any] = None) -> FeatureStats:
    """Gather every rank's :class:`FeatureStats` and merge them in rank order into a new state.

    Every rank gets the same result. Integer statistics are exact; float64 sums equal the single-process
    stream's up to the order of the additions (see the module docstring). Raises ValueError if the ranks'
    configurations differ (different SAE, hooks or options).

    Through the public state only: each rank's :meth:`FeatureStats.state_dict` travels as JSON (config,
    counts, the tensors' layout) plus one all-gather per tensor, and each part is rebuilt with
    :meth:`FeatureStats.from_state_dict` and merged.
    """
    if not isinstance(stats, FeatureStats):
        raise TypeError(f"stats must be a FeatureStats, got {type(stats).__name__}")
    rank, _ = rank_and_world(group)
    meta = stats.state_dict()
    local = meta.pop("tensors")
    meta["layout"] = {k: (list(v.shape), str(v.dtype)) for k, v in sorted(local.items())}
    metas = gather_objects(meta, "FeatureStats layout", group)
    mine = metas[rank]  # this rank's metadata after the JSON round trip, like everyone else's
    for r, m in enumerate(metas):
        if m["config"] != mine["config"]:
            theirs, ours = (json.dumps(c, sort_keys=True) for c in (m["config"], mine["config"]))
            raise ValueError(
                f"rank {r}'s FeatureStats configuration differs from this rank's:\n  {theirs}\n  {ours}\n"
                "(same SAE, hooks and FeatureStats options on every rank)"
            )
    # a pair table promoted to int64 on one rank travels as int64 from all
    wide = {k for m in metas for k, (_, dt) in m["layout"].items() if dt == "torch.int64"}
    gathered = {k: _all_gather(v.to(torch.int64) if k in wide else v, f"FeatureStats.{k}", group)
                for k, v in sorted(local.items())}
    parts = []
    for r, m in enumerate(metas):
        state = {k: v for k, v in m.items() if k != "layout"}
        state["tensors"] = {k: g[r] for k, g in gathered.items()}
        parts.append(FeatureStats.from_state_dict(state, copy=False))  # freshly gathered: no copy needed
    out = parts[0]
    for p in parts[1:]:
        out.merge(p)
    return out


@torch.no_grad()
def distributed_feature_stats(
    sae: Any, batches: Iterable[Any], *, group: Optional[Any] = None, **kwargs: Any
) -> FeatureStats:
    """:func:`~sparsekern.features.feature_stats` on this rank's shard of the batches, then
    :func:`all_gather_feature_stats`. ``kwargs`` as ``feature_stats`` (``model=``, ``hook_name=``,
    ``cooccurrence=True``, ...). If a rank raises, every rank raises."""
    local = run_collectively(lambda: feature_stats(sae, batches, **kwargs), "feature_stats", group)
    return all_gather_feature_stats(local, group)
