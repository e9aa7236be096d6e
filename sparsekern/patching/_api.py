"""``transformer_lens.patching``'s public API on top of the fused engine (same names, signatures, outputs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import pandas as pd
import torch
from jaxtyping import Float, Int

from ._common import (  # noqa: F401 - BACKENDS and Metric: importable from here as before
    BACKENDS,
    Metric,
    Shard,
    check_options,
    check_shard,
    check_tokens,
    run_reference,
    warn_once,
)
from ._engine import Engine, engine_unsupported_reason
from ._patches import Patch
from ._setters import (
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
)
from ._sweep import Sweep

def _run_sweeps(
    model,
    corrupted_tokens,
    clean_cache,
    metric,
    metric_name,
    specs,
    *,
    progress,
    max_batch,
    memory_budget,
    backend,
    shard,
):
    """Resolve and run several sweeps sharing one corrupted run; returns (outputs, sweeps)."""
    check_options(metric, metric_name, backend, max_batch, memory_budget)
    shard = check_shard(shard)
    tokens = check_tokens(corrupted_tokens, "corrupted_tokens", model.cfg.device)
    sweeps = [Sweep(model, tokens, clean_cache, *spec) for spec in specs]
    device = torch.device(model.cfg.device)
    flat_vals: list[torch.Tensor | None] = [None] * len(sweeps)

    reason = engine_unsupported_reason(model, tokens) if backend == "auto" else "backend='reference'"
    if reason is not None and backend == "auto":
        warn_once(
            "unsupported:" + reason, f"sparsekern.patching: using the one-forward-per-patch path ({reason})"
        )
    causal = model.cfg.attention_dir == "causal"
    fused: list[Patch] = []
    unknown: list[int] = []
    for i, sw in enumerate(sweeps):
        ps = sw.patches(i, model.cfg, tokens.shape[1], causal) if reason is None else None
        if ps is None:
            unknown.append(i)
        else:
            fused.extend(ps)
    engine = Engine(model, tokens, sorted({p.hook for p in fused})) if reason is None else None
    for i in unknown:
        sw = sweeps[i]
        if engine is not None:
            warn_once(
                "setter:" + getattr(sw.setter, "__qualname__", repr(sw.setter)),
                f"sparsekern.patching: patch_setter {getattr(sw.setter, '__name__', sw.setter)!r} is not one "
                f"of the known setters (or its index rows do not fit it); running one forward per patch",
            )
        flat_vals[i] = run_reference(
            model, tokens, sw.reference_runs(model, clean_cache), metric, metric_name,
            engine=engine, shard=shard, label="patching", progress=progress,
        )
    if fused:
        clean = {name: clean_cache[name] for name in {p.hook for p in fused}}
        vals = engine.run(fused, clean, metric, metric_name, max_batch, memory_budget, progress, shard=shard)
        for i in range(len(sweeps)):
            if flat_vals[i] is None:
                flat_vals[i] = torch.empty(len(sweeps[i].rows), device=vals.device)
        sel: dict[int, list] = {}
        for j, p in enumerate(fused):
            sel.setdefault(p.sweep, []).append((p.slot, j))
        for i, pairs in sel.items():
            slots, js = zip(*pairs)
            flat_vals[i][torch.tensor(slots, device=vals.device)] = vals[torch.tensor(js, device=vals.device)]
    outs = []
    for sw, v in zip(sweeps, flat_vals):
        out = torch.zeros(sw.shape, device=device)  # TransformerLens: default dtype, model device
        if v is not None and v.numel():
            out.view(-1)[:] = v.to(device=device, dtype=out.dtype)
        outs.append(out)
    return outs, sweeps


def generic_activation_patch(
    model,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    patch_setter: Callable,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: pd.DataFrame | None = None,
    return_index_df: bool = False,
    *,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    shard: Shard | None = None,
) -> torch.Tensor | tuple[torch.Tensor, pd.DataFrame]:
    """Activation patching with ``transformer_lens.patching.generic_activation_patch`` semantics, fused.

    For every index row (layer first) the clean activation slice selected by ``patch_setter`` is patched
    into the corrupted run at ``get_act_name(activation_name, layer)`` and ``patching_metric`` is applied
    to the patched logits ``[batch, pos, d_vocab]``.

    Args:
        model: a ``HookedTransformer``.
        corrupted_tokens: ``[batch, pos]`` int tokens of the corrupted run.
        clean_cache: ``ActivationCache`` (or mapping) of the clean run; same batch and pos.
        patching_metric: logits ``[batch, pos, d_vocab]`` -> scalar. With the fused engine it receives a
            ``LazyLogits``: a ``torch.Tensor`` subclass equal to the full logits under every operation,
            whose ``logits[b, p, ...]`` indexing (``p`` an int or slice) unembeds only position(s) ``p``
            (positions the metric read on the corrupted run are unembedded for a whole chunk at once).
            ``SPARSEKERN_PATCH_LAZY=0`` hands it plain tensors instead.
        patch_setter: ``(corrupted_activation, index, clean_activation) -> patched``; the six setters of
            ``transformer_lens.patching`` (or ``sparsekern.patching``) run batched, any other setter runs one
            forward per patch (with a one-time warning).
        activation_name: short activation name, e.g. ``"resid_pre"``, ``"z"``, ``"pattern"``.
        index_axis_names: axes to sweep (``layer``, ``pos``, ``head_index``/``head``, ``src_pos``, ``dest_pos``).
        index_df: explicit index rows (columns = axes); the output is then flat, one value per row.
        return_index_df: also return the index DataFrame.
        progress: show a tqdm bar (keyword-only extra).
        max_batch: patches per forward pass (default: from ``memory_budget``).
        memory_budget: bytes one chunk may use (default: a quarter of free memory, capped).
        backend: ``"auto"`` (fused engine where exact) or ``"reference"`` (one full forward per patch).
        shard: a :class:`sparsekern.patching.Shard` ``(rank, world)``: plan the whole sweep but run only
            this rank's part of it; the other entries are exactly 0, so summing the ranks' outputs gives
            this call's result bitwise (``sparsekern.distributed.distributed_patch`` does that).

    Returns:
        float tensor on ``model.cfg.device``, shape ``[len(range) for each axis]`` (or ``[len(index_df)]``),
        and the index DataFrame when ``return_index_df``.
    """
    (out,), (sw,) = _run_sweeps(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        "patching_metric",
        [(patch_setter, activation_name, index_axis_names, index_df)],
        progress=progress,
        max_batch=max_batch,
        memory_budget=memory_budget,
        backend=backend,
        shard=shard,
    )
    return (out, sw.index_df) if return_index_df else out


def _prebuilt(name: str, setter, act: str, axes: tuple, shape_doc: str):
    f = partial(generic_activation_patch, patch_setter=setter, activation_name=act, index_axis_names=axes)
    f.__doc__ = (
        f"Activation patching of ``{act}`` over ({', '.join(axes)}); returns ``{shape_doc}``.\n\n"
        f"Same as ``transformer_lens.patching.{name}`` (a ``partial`` of ``generic_activation_patch``): call "
        f"``{name}(model, corrupted_tokens, clean_cache, patching_metric, *, progress=, max_batch=, ...)``."
    )
    return f


_P = ("layer", "pos")
get_act_patch_resid_pre = _prebuilt(
    "get_act_patch_resid_pre", layer_pos_patch_setter, "resid_pre", _P, "[n_layers, pos]"
)
get_act_patch_resid_mid = _prebuilt(
    "get_act_patch_resid_mid", layer_pos_patch_setter, "resid_mid", _P, "[n_layers, pos]"
)
get_act_patch_attn_out = _prebuilt(
    "get_act_patch_attn_out", layer_pos_patch_setter, "attn_out", _P, "[n_layers, pos]"
)
get_act_patch_mlp_out = _prebuilt(
    "get_act_patch_mlp_out", layer_pos_patch_setter, "mlp_out", _P, "[n_layers, pos]"
)
_PH = ("layer", "pos", "head")
get_act_patch_attn_head_out_by_pos = _prebuilt(
    "get_act_patch_attn_head_out_by_pos",
    layer_pos_head_vector_patch_setter,
    "z",
    _PH,
    "[n_layers, pos, n_heads]",
)
get_act_patch_attn_head_q_by_pos = _prebuilt(
    "get_act_patch_attn_head_q_by_pos",
    layer_pos_head_vector_patch_setter,
    "q",
    _PH,
    "[n_layers, pos, n_heads]",
)
get_act_patch_attn_head_k_by_pos = _prebuilt(
    "get_act_patch_attn_head_k_by_pos",
    layer_pos_head_vector_patch_setter,
    "k",
    _PH,
    "[n_layers, pos, n_key_value_heads or n_heads]",
)
get_act_patch_attn_head_v_by_pos = _prebuilt(
    "get_act_patch_attn_head_v_by_pos",
    layer_pos_head_vector_patch_setter,
    "v",
    _PH,
    "[n_layers, pos, n_key_value_heads or n_heads]",
)
get_act_patch_attn_head_pattern_by_pos = _prebuilt(
    "get_act_patch_attn_head_pattern_by_pos",
    layer_head_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos"),
    "[n_layers, n_heads, dest_pos]",
)
get_act_patch_attn_head_pattern_dest_src_pos = _prebuilt(
    "get_act_patch_attn_head_pattern_dest_src_pos",
    layer_head_dest_src_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
    "[n_layers, n_heads, dest_pos, src_pos]",
)
_H = ("layer", "head")
get_act_patch_attn_head_out_all_pos = _prebuilt(
    "get_act_patch_attn_head_out_all_pos", layer_head_vector_patch_setter, "z", _H, "[n_layers, n_heads]"
)
get_act_patch_attn_head_q_all_pos = _prebuilt(
    "get_act_patch_attn_head_q_all_pos", layer_head_vector_patch_setter, "q", _H, "[n_layers, n_heads]"
)
get_act_patch_attn_head_k_all_pos = _prebuilt(
    "get_act_patch_attn_head_k_all_pos",
    layer_head_vector_patch_setter,
    "k",
    _H,
    "[n_layers, n_key_value_heads or n_heads]",
)
get_act_patch_attn_head_v_all_pos = _prebuilt(
    "get_act_patch_attn_head_v_all_pos",
    layer_head_vector_patch_setter,
    "v",
    _H,
    "[n_layers, n_key_value_heads or n_heads]",
)
get_act_patch_attn_head_pattern_all_pos = _prebuilt(
    "get_act_patch_attn_head_pattern_all_pos",
    layer_head_pattern_patch_setter,
    "pattern",
    ("layer", "head_index"),
    "[n_layers, n_heads]",
)


def _every(
    model, corrupted_tokens, clean_cache, metric, fns, *, progress, max_batch, memory_budget, backend, shard
):
    specs = [
        (f.keywords["patch_setter"], f.keywords["activation_name"], f.keywords["index_axis_names"], None)
        for f in fns
    ]
    outs, _ = _run_sweeps(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        "metric",
        specs,
        progress=progress,
        max_batch=max_batch,
        memory_budget=memory_budget,
        backend=backend,
        shard=shard,
    )
    return outs


def _stack_heads(out, q, k, v, pattern) -> torch.Tensor:
    """``[5, ...]``: z, q, k, v, pattern results; GQA k/v right-padded with zeros to q's head count."""
    pad = lambda x: torch.nn.functional.pad(x, (0, q.size(-1) - x.size(-1)))  # noqa: E731
    return torch.stack([out, q, pad(k), pad(v), pattern], dim=0)


def get_act_patch_attn_head_all_pos_every(
    model,
    corrupted_tokens,
    clean_cache,
    metric,
    *,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    shard: Shard | None = None,
) -> Float[torch.Tensor, "5 layer head"]:
    """Head patching over all positions for z, q, k, v and pattern in one shared plan: ``[5, n_layers, n_heads]``
    (k/v right-padded with zeros to n_heads under GQA, as in TransformerLens).

    Keyword-only options (``shard`` included) as in :func:`generic_activation_patch`.
    """
    out, q, k, v, pat = _every(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        [
            get_act_patch_attn_head_out_all_pos,
            get_act_patch_attn_head_q_all_pos,
            get_act_patch_attn_head_k_all_pos,
            get_act_patch_attn_head_v_all_pos,
            get_act_patch_attn_head_pattern_all_pos,
        ],
        progress=progress,
        max_batch=max_batch,
        memory_budget=memory_budget,
        backend=backend,
        shard=shard,
    )
    return _stack_heads(out, q, k, v, pat)


def get_act_patch_attn_head_by_pos_every(
    model,
    corrupted_tokens,
    clean_cache,
    metric,
    *,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    shard: Shard | None = None,
) -> Float[torch.Tensor, "5 layer pos head"]:
    """Head-by-position patching for z, q, k, v and pattern (dest) in one shared plan: ``[5, n_layers, pos, n_heads]``
    (k/v right-padded to n_heads; pattern rearranged from ``[layer, head, pos]``).

    Keyword-only options (``shard`` included) as in :func:`generic_activation_patch`.
    """
    out, q, k, v, pat = _every(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        [
            get_act_patch_attn_head_out_by_pos,
            get_act_patch_attn_head_q_by_pos,
            get_act_patch_attn_head_k_by_pos,
            get_act_patch_attn_head_v_by_pos,
            get_act_patch_attn_head_pattern_by_pos,
        ],
        progress=progress,
        max_batch=max_batch,
        memory_budget=memory_budget,
        backend=backend,
        shard=shard,
    )
    return _stack_heads(out, q, k, v, pat.transpose(1, 2))


def get_act_patch_block_every(
    model,
    corrupted_tokens,
    clean_cache,
    metric,
    *,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    shard: Shard | None = None,
) -> Float[torch.Tensor, "3 layer pos"]:
    """resid_pre, attn_out and mlp_out patching by (layer, pos) in one shared plan: ``[3, n_layers, pos]``.

    Keyword-only options (``shard`` included) as in :func:`generic_activation_patch`.
    """
    return torch.stack(
        _every(
            model,
            corrupted_tokens,
            clean_cache,
            metric,
            [get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out],
            progress=progress,
            max_batch=max_batch,
            memory_budget=memory_budget,
            backend=backend,
            shard=shard,
        ),
        dim=0,
    )
