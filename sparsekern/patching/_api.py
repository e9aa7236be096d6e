"""``transformer_lens.patching``'s public API on top of the fused engine (same names, signatures, outputs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from . import _engine
from ._engine import (
    Engine,
    Patch,
    as_scalar,
    engine_unsupported_reason,
    is_pattern_hook,
    is_position_local_hook,
)
from ._setters import (
    INDEX_AXES,
    INDEX_LEN,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
    setter_kind,
)

Metric = Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Float[torch.Tensor, ""]]
BACKENDS = ("auto", "reference")


class _Sweep:
    """One ``generic_activation_patch`` call, resolved: index rows, output shape, patch kind."""

    def __init__(self, model, tokens, clean_cache, patch_setter, activation_name, index_axis_names, index_df):
        from transformer_lens import utils as tl_utils

        cfg = model.cfg
        if index_df is None:
            if index_axis_names is None:
                raise ValueError("generic_activation_patch: give index_axis_names or index_df")
            n_heads = cfg.n_heads
            if activation_name in ["k", "v"] and cfg.n_key_value_heads is not None:
                n_heads = cfg.n_key_value_heads  # GQA: keys/values have fewer heads (TransformerLens rule)
            max_range = {"layer": cfg.n_layers, "pos": tokens.shape[-1], "head_index": n_heads}
            max_range.update(src_pos=max_range["pos"], dest_pos=max_range["pos"], head=n_heads)
            bad = [a for a in index_axis_names if a not in max_range]
            if bad:
                raise ValueError(
                    f"index_axis_names: unknown axis name(s) {bad}; choose from {sorted(max_range)}"
                )
            self.shape = [max_range[a] for a in index_axis_names]
            index_df = make_df_from_ranges(self.shape, index_axis_names)
            self.flat = False
        else:
            if not isinstance(index_df, pd.DataFrame):
                raise TypeError(f"index_df must be a pandas DataFrame, got {type(index_df).__name__}")
            # TransformerLens asserts index_axis_names is None here; we also accept the prebuilt functions'
            # bound names when they equal the DataFrame's columns.
            if index_axis_names is not None and list(index_axis_names) != list(index_df.columns):
                raise ValueError(
                    f"index_df was given, so index_axis_names must be None (or equal to its columns "
                    f"{list(index_df.columns)}); got {list(index_axis_names)}"
                )
            _check_index_dtypes(index_df)
            self.shape = [len(index_df)]
            self.flat = True
        self.index_df = index_df
        self.rows = [row.to_list() for _, row in index_df.iterrows()]  # exactly what TransformerLens passes
        self.activation_name = activation_name
        self.setter = patch_setter
        self.kind = setter_kind(patch_setter)
        if self.flat:  # before the cache lookup, which would blame a missing 'blocks.<bad layer>' entry
            self._check_layers(cfg)
        self.hook_names = [tl_utils.get_act_name(activation_name, layer=r[0]) for r in self.rows]
        self._check_cache(model, tokens, clean_cache)
        if self.flat:
            self._check_index_ranges(clean_cache)

    def _check_layers(self, cfg) -> None:
        if len(self.index_df.columns) == 0:
            raise ValueError("index_df has no columns: the first column must be the layer")
        col = self.index_df.columns[0]
        layers = self.index_df[col].to_numpy()
        bad = (layers < 0) | (layers >= cfg.n_layers)
        if bad.any():
            i = int(bad.argmax())
            raise IndexError(
                f"index_df column {col!r} (the layer) row {i}: layer {layers[i]} is out of range for a "
                f"model with n_layers={cfg.n_layers} (valid: 0..{cfg.n_layers - 1})"
            )

    def _check_index_ranges(self, clean_cache) -> None:
        """IndexError for an index outside its activation axis, as TransformerLens's setters raise (the
        fused engine would otherwise wrap positions around silently). Negative indices count from the end."""
        cols = list(self.index_df.columns)
        if self.kind is None or len(cols) != INDEX_LEN[self.kind]:
            return  # an unknown setter indexes the real tensor itself (and raises there)
        shapes = {name: tuple(clean_cache[name].shape) for name in dict.fromkeys(self.hook_names)}
        for col, axis in zip(cols[1:], INDEX_AXES[self.kind]):
            vals = self.index_df[col].to_numpy()
            sizes = np.array([shapes[n][axis] if len(shapes[n]) > axis else 0 for n in self.hook_names])
            bad = (vals < -sizes) | (vals >= sizes)
            if bad.any():
                i = int(bad.argmax())
                name = self.hook_names[i]
                raise IndexError(
                    f"index_df column {col!r} row {i}: index {vals[i]} is out of range for axis {axis} of "
                    f"{name!r} (shape {list(shapes[name])}; valid: {-sizes[i]}..{sizes[i] - 1})"
                )

    def _check_cache(self, model, tokens, clean_cache):
        B, T = tokens.shape[0], tokens.shape[-1]
        for name in dict.fromkeys(self.hook_names):
            try:
                act = clean_cache[name]
            except (KeyError, IndexError, TypeError):
                raise ValueError(
                    f"clean_cache has no activation {name!r} (needed to patch activation_name="
                    f"{self.activation_name!r}); run the clean input with run_with_cache without filtering it out"
                ) from None
            if not isinstance(act, torch.Tensor):
                raise TypeError(f"clean_cache[{name!r}] must be a tensor, got {type(act).__name__}")
            pos_axis = 2 if is_pattern_hook(name) else 1
            if act.dim() <= pos_axis or act.shape[0] != B or act.shape[pos_axis] != T:
                raise ValueError(
                    f"corrupted_tokens has shape {list(tokens.shape)} (batch {B}, pos {T}) but "
                    f"clean_cache[{name!r}] has shape {list(act.shape)}: clean and corrupted runs must have "
                    f"the same batch size and sequence length"
                )

    def patches(self, sweep_id: int, cfg, T: int, causal: bool) -> list[Patch] | None:
        """Engine patches, or None when the setter is unknown or an index does not fit its kind."""
        if self.kind is None:
            return None
        out = []
        for slot, (row, name) in enumerate(zip(self.rows, self.hook_names)):
            if len(row) != INDEX_LEN[self.kind] or not all(float(v).is_integer() for v in row):
                return None
            layer = int(row[0])
            if not (0 <= layer < cfg.n_layers) or not name.startswith(f"blocks.{layer}."):
                return None
            idx = tuple(int(v) for v in row[1:])
            start = 0
            if causal and is_position_local_hook(name):
                pattern = is_pattern_hook(name)
                # the axis that holds the query/dest position for this kind on this layout
                if self.kind in ("pos", "pos_head") and not pattern:
                    start = idx[0] % T
                elif self.kind in ("pattern_dest", "pattern_dest_src") and pattern:
                    start = idx[1] % T
            out.append(
                Patch(sweep_id, slot, layer, start, name, self.kind, _normalise(idx, self.kind, T, name))
            )
        return out


def _check_index_dtypes(index_df: pd.DataFrame) -> None:
    """Index columns must hold integers: TransformerLens indexes tensors with them, and one float column
    turns every row into floats (layer 1 -> 'blocks.1.0.hook_z')."""

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for col in index_df.columns:
        series = index_df[col]
        ok = pd.api.types.is_integer_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if series.dtype == object:
            ok = all(is_int(v) for v in series)
        if not ok or series.isna().any():
            bad = next((v for v in series if not is_int(v)), None)
            example = f" (e.g. {bad!r})" if bad is not None else ""
            raise TypeError(
                f"index_df column {col!r} must hold integer indices, got dtype {series.dtype}{example}"
            )


def _normalise(idx: tuple, kind: str, T: int, name: str) -> tuple:
    # negative positions are legal Python indices in TransformerLens's setters; shift them to >= 0
    if kind in ("pos", "pos_head") and not is_pattern_hook(name):
        return (idx[0] % T, *idx[1:])
    if kind in ("pattern_dest", "pattern_dest_src") and is_pattern_hook(name):
        return (idx[0], idx[1] % T, *idx[2:])
    return idx


def _check_tokens(model, corrupted_tokens) -> torch.Tensor:
    if not isinstance(corrupted_tokens, torch.Tensor):
        raise TypeError(
            f"corrupted_tokens must be an integer tensor [batch, pos], got {type(corrupted_tokens).__name__}"
        )
    if corrupted_tokens.dtype.is_floating_point or corrupted_tokens.dtype == torch.bool:
        raise TypeError(
            f"corrupted_tokens must be an integer tensor [batch, pos], got dtype {corrupted_tokens.dtype}"
        )
    if corrupted_tokens.dim() == 1:  # TransformerLens adds the batch axis itself
        corrupted_tokens = corrupted_tokens[None]
    if corrupted_tokens.dim() != 2:
        raise ValueError(f"corrupted_tokens must have shape [batch, pos], got {list(corrupted_tokens.shape)}")
    return corrupted_tokens.to(model.cfg.device)


def _run_reference(model, tokens, sweep: _Sweep, clean_cache, metric, metric_name, engine, progress):
    """One forward per patch with the user's setter; from the cached layer input when ``engine`` is given."""
    from tqdm.auto import tqdm

    device = torch.device(model.cfg.device)
    shard = _engine.SHARD.get()  # a data-parallel sweep: rows i % world == rank run here, the rest stay 0
    if shard is not None:
        shard.record("reference", len(sweep.rows))
    vals = []
    todo = list(zip(sweep.rows, sweep.hook_names))
    for i, (row, name) in enumerate(tqdm(todo, disable=not progress, desc="patching")):
        if shard is not None and not shard.mine(i):
            vals.append(torch.zeros((), device=device))
            continue
        clean_act = clean_cache[name]

        def hook(act, hook, index=row, clean_act=clean_act):
            if act.requires_grad:
                act = act.clone()
            return sweep.setter(act, index, clean_act)

        layer = row[0]
        if (
            engine is not None
            and isinstance(layer, int)
            and 0 <= layer < model.cfg.n_layers
            and name.startswith(f"blocks.{layer}.")
        ):
            logits = engine.forward_from(layer, 0, 1, [(name, hook)])[0]
        else:
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
        vals.append(as_scalar(metric(logits), metric_name, device))
    return torch.stack(vals) if vals else torch.zeros(0, device=device)


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
):
    """Resolve and run several sweeps sharing one corrupted run; returns (outputs, sweeps)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not callable(metric):
        raise TypeError(f"{metric_name} must be callable (logits [batch, pos, d_vocab] -> scalar)")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    tokens = _check_tokens(model, corrupted_tokens)
    sweeps = [_Sweep(model, tokens, clean_cache, *spec) for spec in specs]
    device = torch.device(model.cfg.device)
    flat_vals: list[torch.Tensor | None] = [None] * len(sweeps)

    reason = engine_unsupported_reason(model, tokens) if backend == "auto" else "backend='reference'"
    if reason is not None and backend == "auto":
        _engine.warn_once(
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
            _engine.warn_once(
                "setter:" + getattr(sw.setter, "__qualname__", repr(sw.setter)),
                f"sparsekern.patching: patch_setter {getattr(sw.setter, '__name__', sw.setter)!r} is not one "
                f"of the known setters (or its index rows do not fit it); running one forward per patch",
            )
        flat_vals[i] = _run_reference(model, tokens, sw, clean_cache, metric, metric_name, engine, progress)
    if fused:
        clean = {name: clean_cache[name] for name in {p.hook for p in fused}}
        vals = engine.run(fused, clean, metric, metric_name, max_batch, memory_budget, progress)
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


def _every(model, corrupted_tokens, clean_cache, metric, fns, *, progress, max_batch, memory_budget, backend):
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
) -> Float[torch.Tensor, "5 layer head"]:
    """Head patching over all positions for z, q, k, v and pattern in one shared plan: ``[5, n_layers, n_heads]``
    (k/v right-padded with zeros to n_heads under GQA, as in TransformerLens)."""
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
) -> Float[torch.Tensor, "5 layer pos head"]:
    """Head-by-position patching for z, q, k, v and pattern (dest) in one shared plan: ``[5, n_layers, pos, n_heads]``
    (k/v right-padded to n_heads; pattern rearranged from ``[layer, head, pos]``)."""
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
) -> Float[torch.Tensor, "3 layer pos"]:
    """resid_pre, attn_out and mlp_out patching by (layer, pos) in one shared plan: ``[3, n_layers, pos]``."""
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
        ),
        dim=0,
    )
