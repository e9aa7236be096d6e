"""Attribution patching with the ``transformer_lens.patching`` API (issue 4).

Every ``get_act_patch_*`` function of ``transformer_lens.patching`` exists here with the same
positional signature ``(model, corrupted_tokens, clean_cache, patching_metric)`` (``metric`` for the
``*_every`` helpers), output shape, axis order, dtype (float32 / the default dtype) and device, but is
computed by *attribution patching* (Nanda 2023; Syed et al. 2023) instead of one forward pass per patch:

1. the clean activations come from ``clean_cache`` (one clean forward, done by the caller);
2. one corrupted forward with hooks that keep the needed activations in the autograd graph, then one
   backward of the metric gives ``grad = d metric / d act`` at the corrupted run;
3. for each patch (a slice of one activation), ``delta = sum_slice (clean_act - corrupted_act) * grad``
   (summed over the batch too, as TL patches every batch element at once).

**Convention.** By default the functions return ``metric(corrupted) + delta``: the *estimated metric
after patching*, directly comparable with (and exact where the metric is linear in the patched
activation equal to) ``transformer_lens.patching``'s output. ``return_delta=True`` returns ``delta``
alone.

**QK fix (AtP*, Kramar et al. 2024).** ``qk_fix=True`` changes query and key patches only: the
attention pattern is recomputed exactly with the patched ``q`` (row ``t`` changes) or ``k`` (column
``s`` of the scores changes, hence every row's normaliser), from the cached corrupted ``q``/``k``,
and the metric is linearised from the pattern onward:
``delta = sum((pattern_patched - pattern_corrupted) * d metric / d pattern)``. Pattern patches are
already linear from the pattern onward, so ``qk_fix`` leaves them (and everything else) unchanged.
The recomputed corrupted scores are checked against ``hook_attn_scores``; architectures whose scores
cannot be reproduced raise ``NotImplementedError``. The fix removes the softmax linearisation only:
downstream nonlinearities remain, so it improves the ranking on average (strongly when attention is
saturated), not for every model (see tests/test_patching_attribution.py).

Costs: one forward + one backward for any number of patches (the ``*_every`` helpers share them),
plus memory for the autograd graph of one corrupted run. A user-supplied ``patch_setter`` works too:
``delta`` is then computed from ``setter(corrupted.clone(), index, clean) - corrupted`` per index row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int

import transformer_lens.patching as _tlp
import transformer_lens.utilities as _tl_utils

from sparsekern.patching import _attribution_qk as _qk
from sparsekern.patching._api import _stack_heads
from sparsekern.patching._common import Metric, check_tokens
from sparsekern.patching._setters import INDEX_AXES, axis_sizes, setter_kind
make_df_from_ranges = _tlp.make_df_from_ranges


def _setter_dims(patch_setter: Callable) -> Optional[Tuple[int, ...]]:
    """Indexed axes of a known (TransformerLens or sparsekern) setter (``_setters.INDEX_AXES``, e.g.
    ``(1, 2)`` for ``act[:, pos, head]``); None for a user-supplied one."""
    kind = setter_kind(patch_setter)
    return INDEX_AXES[kind] if kind is not None else None


@dataclass
class _Spec:
    """One ``generic_attribution_patch`` request inside a shared forward/backward."""

    patch_setter: Callable
    activation_name: str
    index_df: pd.DataFrame
    ranges: List[int]
    flattened: bool


def _make_spec(model, pos: int, patch_setter, activation_name, index_axis_names, index_df) -> _Spec:
    """Index grid exactly as ``transformer_lens.patching.generic_activation_patch`` builds it."""
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names or index_df")
        max_range = axis_sizes(model.cfg, pos, activation_name)
        ranges = [max_range[a] for a in index_axis_names]
        df = make_df_from_ranges(ranges, index_axis_names)
        return _Spec(patch_setter, activation_name, df, ranges, False)
    if index_axis_names is not None:
        raise ValueError("give index_axis_names or index_df, not both")
    return _Spec(patch_setter, activation_name, index_df, index_df.max().to_list(), True)


def _layers(spec: _Spec) -> List[int]:
    return sorted({int(v) for v in spec.index_df.iloc[:, 0].tolist()})


def _clean_act(clean_cache, name: str, tokens: torch.Tensor) -> torch.Tensor:
    try:
        act = clean_cache[name]
    except (KeyError, IndexError) as e:
        raise KeyError(f"clean_cache is missing the activation {name!r} needed for this patch") from e
    if not isinstance(act, torch.Tensor):
        raise TypeError(f"clean_cache[{name!r}] must be a torch.Tensor; got {type(act).__name__}")
    b, t = tokens.shape
    is_pattern = name.endswith(("hook_pattern", "hook_attn_scores"))
    ok = act.ndim >= (4 if is_pattern else 2) and act.shape[0] in (1, b) and (
        act.shape[-1] == act.shape[-2] == t if is_pattern else act.shape[1] == t
    )
    if not ok:
        want = f"[{b} or 1, n_heads, {t}, {t}]" if is_pattern else f"[{b} or 1, {t}, ...]"
        raise ValueError(
            f"corrupted_tokens has shape {list(tokens.shape)} but clean_cache[{name!r}] has shape "
            f"{list(act.shape)}; expected {want}: the clean cache must come from tokens of the same shape"
        )
    return act


def _run_corrupted(model, tokens, metric: Metric, grad_names: List[str], value_names: List[str]):
    """One corrupted forward with hooks + one backward: (metric value, activations, gradients)."""
    acts: Dict[str, torch.Tensor] = {}

    def keep(act, hook):
        if hook.name in grad_names and not act.requires_grad:
            act = act.detach().requires_grad_(True)  # frozen params: make the graph start here
        acts[hook.name] = act
        return act

    names = list(dict.fromkeys(grad_names + value_names))
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names])
        m = metric(logits)
        if not isinstance(m, torch.Tensor) or m.numel() != 1:
            shape = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"patching_metric must return a scalar tensor (one element); got {shape}")
        if not m.requires_grad:
            raise ValueError(
                "patching_metric's output does not depend differentiably on the logits (no grad): "
                "attribution patching needs a differentiable metric (no .item(), .detach(), argmax)"
            )
        inputs = [acts[n] for n in grad_names]
        grads = torch.autograd.grad(m.reshape(()), inputs, allow_unused=True) if inputs else []
    g = {n: (gr if gr is not None else torch.zeros_like(acts[n])) for n, gr in zip(grad_names, grads)}
    return float(m.detach()), {n: a.detach() for n, a in acts.items()}, g


def _reduce(prod: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """Sum ``prod`` over every axis except ``dims`` (kept in order)."""
    other = [d for d in range(prod.ndim) if d not in dims]
    return prod.sum(other) if other else prod


def _attention_mask(model, tokens) -> Optional[torch.Tensor]:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", None) == "left":
        return _tl_utils.get_attention_mask(tok, tokens, model.cfg.default_prepend_bos).to(tokens.device)
    return None


class _QK:
    """Per-layer QK-fix state: masked score recomputation checked against the corrupted run."""

    def __init__(self, model, tokens, acts, grads, clean_cache):
        self.model, self.acts, self.grads, self.clean = model, acts, grads, clean_cache
        self.mask = _attention_mask(model, tokens)
        self.tokens = tokens
        self._corr: Dict[int, torch.Tensor] = {}

    def names(self, layer: int) -> Dict[str, str]:
        return {k: _tl_utils.get_act_name(k, layer) for k in ("q", "k", "attn_scores", "pattern")}

    def setup(self, layer: int):
        n = self.names(layer)
        attn = self.model.blocks[layer].attn
        cached = self.acts[n["attn_scores"]]
        masked = cached == attn.IGNORE.to(cached.device)
        scores = lambda q, k: _qk.attention_scores(attn, q, k, masked, self.mask)  # noqa: E731
        if layer not in self._corr:
            a = scores(self.acts[n["q"]], self.acts[n["k"]])
            _qk.check_scores(a, cached, masked, layer)
            self._corr[layer] = a
        g = self.grads[n["pattern"]].double()
        return attn, scores, self._corr[layer], g, n

    def fast(self, activation_name: str, layer: int, dims: Tuple[int, ...]) -> Optional[torch.Tensor]:
        """Closed form for TL's by-pos / all-pos setters; None for other index layouts."""
        if dims not in ((1, 2), (2,)):
            return None
        attn, scores, a, g, n = self.setup(layer)
        q, k = self.acts[n["q"]], self.acts[n["k"]]
        n_groups = k.shape[2]
        if activation_name == "q":
            rows = _qk.q_rows_delta(a, scores(_clean_act(self.clean, n["q"], self.tokens).expand_as(q), k), g)
            per_pos = rows.sum(0).T  # [dest, head]
            return per_pos if dims == (1, 2) else per_pos.sum(0)
        a_k = scores(q, _clean_act(self.clean, n["k"], self.tokens).expand_as(k))
        if dims == (1, 2):
            cols = _qk.k_cols_delta(a, a_k, g).sum(0).T  # [src, head]
            return _qk._group_heads(cols, n_groups, 1)
        return _qk._group_heads(_qk.k_all_delta(a, a_k, g).sum(0), n_groups, 0)

    def generic(self, activation_name, layer, setter, index) -> float:
        """Any setter: patched q/k -> exact pattern -> linear from the pattern onward."""
        attn, scores, a, g, n = self.setup(layer)
        q, k = self.acts[n["q"]], self.acts[n["k"]]
        clean = _clean_act(self.clean, n[activation_name], self.tokens)
        if activation_name == "q":
            a_new = scores(setter(q.clone(), index, clean), k)
        else:
            a_new = scores(q, setter(k.clone(), index, clean))
        return float(((_qk._softmax(a_new) - _qk._softmax(a)) * g).sum())


def _attribute(model, corrupted_tokens, clean_cache, metric: Metric, specs: List[_Spec], *,
               qk_fix: bool, return_delta: bool, progress: Optional[bool]) -> List[torch.Tensor]:
    """Shared core: one corrupted forward + backward for all ``specs``."""
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_hooks"):
        raise TypeError(f"model must be a transformer_lens HookedTransformer; got {type(model).__name__}")
    if not callable(metric):
        raise TypeError("patching_metric must be a callable logits -> scalar tensor")
    tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    grad_names: List[str] = []
    value_names: List[str] = []
    plans = []
    for spec in specs:
        layers = _layers(spec)
        use_qk = qk_fix and spec.activation_name in ("q", "k")
        for layer in layers:
            name = _tl_utils.get_act_name(spec.activation_name, layer)
            _clean_act(clean_cache, name, tokens)  # fail fast, before running the model
            if use_qk:
                grad_names.append(_tl_utils.get_act_name("pattern", layer))
                value_names += [_tl_utils.get_act_name(k, layer) for k in ("q", "k", "attn_scores")]
            else:
                grad_names.append(name)
        plans.append((spec, layers, use_qk))
    grad_names = list(dict.fromkeys(grad_names))
    base, acts, grads = _run_corrupted(model, tokens, metric, grad_names, value_names)
    qk = _QK(model, tokens, acts, grads, clean_cache) if qk_fix else None

    out = []
    for spec, layers, use_qk in plans:
        dims = _setter_dims(spec.patch_setter)
        per_layer: Dict[int, torch.Tensor] = {}
        for layer in layers:
            name = _tl_utils.get_act_name(spec.activation_name, layer)
            est = None
            if dims is not None and use_qk:
                est = qk.fast(spec.activation_name, layer, dims)
            elif dims is not None:
                clean = _clean_act(clean_cache, name, tokens)
                corr = acts[name]
                if clean.shape[1:] != corr.shape[1:]:
                    raise ValueError(
                        f"clean_cache[{name!r}] has shape {list(clean.shape)} but the corrupted run's "
                        f"activation has shape {list(corr.shape)}: was the cache made with another model?"
                    )
                est = _reduce((clean.double() - corr.double()) * grads[name].double(), dims)
            if est is not None:
                per_layer[layer] = est
        result = _assemble(spec, per_layer, layers, use_qk, qk, acts, grads, clean_cache, tokens, progress)
        if not return_delta:
            result = result + base
        out.append(result.to(device=model.cfg.device, dtype=torch.get_default_dtype()))
    return out


def _assemble(spec, per_layer, layers, use_qk, qk, acts, grads, clean_cache, tokens, progress
              ) -> torch.Tensor:
    """Lay the per-layer estimates out like TL: the full grid, or one entry per ``index_df`` row."""
    if not spec.flattened and len(per_layer) == len(layers):
        grid = torch.stack([per_layer[layer] for layer in range(spec.ranges[0])])
        if list(grid.shape) != spec.ranges:
            want = tuple(slice(0, r) for r in spec.ranges)
            if any(r > s for r, s in zip(spec.ranges, grid.shape)):
                raise IndexError(
                    f"index ranges {spec.ranges} exceed the activation's axes {list(grid.shape)}"
                )
            grid = grid[want]
        return grid
    rows = [[int(v) for v in r] for r in spec.index_df.itertuples(index=False)]
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows)
    vals = []
    for index in rows:
        layer = index[0]
        if layer in per_layer:
            vals.append(float(per_layer[layer][tuple(index[1:])]))
        elif use_qk:
            vals.append(qk.generic(spec.activation_name, layer, spec.patch_setter, index))
        else:  # user setter: delta = setter(corrupted, index, clean) - corrupted
            name = _tl_utils.get_act_name(spec.activation_name, layer)
            corr = acts[name]
            patched = spec.patch_setter(corr.clone(), index, _clean_act(clean_cache, name, tokens))
            vals.append(float(((patched.double() - corr.double()) * grads[name].double()).sum()))
    flat = torch.tensor(vals, dtype=torch.float64)
    return flat if spec.flattened else flat.reshape(spec.ranges)


def generic_attribution_patch(
    model,
    corrupted_tokens: Int[torch.Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    patch_setter: Callable,
    activation_name: str,
    index_axis_names: Optional[Sequence[str]] = None,
    index_df: Optional[pd.DataFrame] = None,
    return_index_df: bool = False,
    *,
    qk_fix: bool = False,
    return_delta: bool = False,
    progress: Optional[bool] = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, pd.DataFrame]]:
    """Attribution-patching counterpart of ``transformer_lens.patching.generic_activation_patch``.

    Same arguments, index grid, output layout and dtype: with ``index_axis_names`` the result has one
    axis per name (``layer`` = n_layers; ``pos``/``src_pos``/``dest_pos`` = corrupted seq len;
    ``head``/``head_index`` = n_heads, or n_key_value_heads for ``k``/``v``); with ``index_df`` it is
    flat, one entry per row. Each entry is ``metric(corrupted) + sum((clean - corrupted) * grad)`` over
    the patched slice (``return_delta=True``: the sum alone), ``grad`` taken at the corrupted run.

    Args:
        model: a HookedTransformer.
        corrupted_tokens: ``[batch, pos]`` (or ``[pos]``) integer tokens of the corrupted run.
        clean_cache: ``ActivationCache`` (or dict) from the clean run on tokens of the same shape.
        patching_metric: logits ``[batch, pos, d_vocab]`` -> scalar tensor, differentiable.
        patch_setter: TL's setters (and sparsekern.patching's) use vectorised reductions; any other
            ``setter(corrupted_act, index, clean_act) -> patched_act`` is supported per index row.
        activation_name: TL short name (``resid_pre``, ``z``, ``q``, ``pattern``, ...).
        qk_fix: AtP* for ``q``/``k`` (exact softmax, linear from the pattern on); see module doc.
        return_delta: return the estimated change instead of the estimated patched metric.
        progress: tqdm bar over index rows on the per-row path (the vectorised path has no loop).

    Returns:
        float32 tensor shaped by the index axes (or ``[len(index_df)]``), on ``model.cfg.device``;
        plus the index DataFrame when ``return_index_df``.
    """
    tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    spec = _make_spec(model, tokens.shape[-1], patch_setter, activation_name, index_axis_names, index_df)
    (result,) = _attribute(model, tokens, clean_cache, patching_metric, [spec],
                           qk_fix=qk_fix, return_delta=return_delta, progress=progress)
    return (result, spec.index_df) if return_index_df else result


def _prebuilt(setter, act: str, axes: Tuple[str, ...], what: str, shape: str):
    f = partial(generic_attribution_patch, patch_setter=setter, activation_name=act, index_axis_names=axes)
    f.__doc__ = f"""Attribution patching of {what}.

    Call as ``(model, corrupted_tokens, clean_cache, patching_metric)``.

    Same output as ``transformer_lens.patching``'s function of the same name, shape {shape}, estimated
    by attribution patching (``metric(corrupted) + delta``; keyword-only ``qk_fix=``,
    ``return_delta=``, ``progress=``). See :func:`generic_attribution_patch`.
    """
    return f


_S = _tlp
get_act_patch_resid_pre = _prebuilt(_S.layer_pos_patch_setter, "resid_pre", ("layer", "pos"),
                                    "the residual stream at the start of each block", "[n_layers, pos]")
get_act_patch_resid_mid = _prebuilt(_S.layer_pos_patch_setter, "resid_mid", ("layer", "pos"),
                                    "the residual stream between attention and MLP", "[n_layers, pos]")
get_act_patch_attn_out = _prebuilt(_S.layer_pos_patch_setter, "attn_out", ("layer", "pos"),
                                   "each attention layer's output", "[n_layers, pos]")
get_act_patch_mlp_out = _prebuilt(_S.layer_pos_patch_setter, "mlp_out", ("layer", "pos"),
                                  "each MLP layer's output", "[n_layers, pos]")
get_act_patch_attn_head_out_by_pos = _prebuilt(
    _S.layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"),
    "each head's output (hook_z) by position",
    "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _prebuilt(
    _S.layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"), "each head's query by position",
    "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _prebuilt(
    _S.layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"), "each head's key by position",
    "[n_layers, pos, n_heads or n_key_value_heads]")
get_act_patch_attn_head_v_by_pos = _prebuilt(
    _S.layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"), "each head's value by position",
    "[n_layers, pos, n_heads or n_key_value_heads]")
get_act_patch_attn_head_pattern_by_pos = _prebuilt(
    _S.layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"),
    "each head's attention pattern row (by destination position)", "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos = _prebuilt(
    _S.layer_head_dest_src_pos_pattern_patch_setter, "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
    "each attention pattern entry", "[n_layers, n_heads, dest_pos, src_pos]")
get_act_patch_attn_head_out_all_pos = _prebuilt(
    _S.layer_head_vector_patch_setter, "z", ("layer", "head"), "each head's output over all positions",
    "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _prebuilt(
    _S.layer_head_vector_patch_setter, "q", ("layer", "head"), "each head's queries over all positions",
    "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _prebuilt(
    _S.layer_head_vector_patch_setter, "k", ("layer", "head"), "each head's keys over all positions",
    "[n_layers, n_heads or n_key_value_heads]")
get_act_patch_attn_head_v_all_pos = _prebuilt(
    _S.layer_head_vector_patch_setter, "v", ("layer", "head"), "each head's values over all positions",
    "[n_layers, n_heads or n_key_value_heads]")
get_act_patch_attn_head_pattern_all_pos = _prebuilt(
    _S.layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"),
    "each head's whole attention pattern",
    "[n_layers, n_heads]")


def _every(model, corrupted_tokens, clean_cache, metric, parts, qk_fix, return_delta, progress):
    tokens = check_tokens(corrupted_tokens, "corrupted_tokens")
    specs = [_make_spec(model, tokens.shape[-1], f.keywords["patch_setter"], f.keywords["activation_name"],
                        f.keywords["index_axis_names"], None) for f in parts]
    return _attribute(model, tokens, clean_cache, metric, specs,
                      qk_fix=qk_fix, return_delta=return_delta, progress=progress)


def get_act_patch_block_every(
    model, corrupted_tokens, clean_cache, metric: Metric, *, qk_fix: bool = False,
    return_delta: bool = False, progress: Optional[bool] = False,
) -> Float[torch.Tensor, "3 layer pos"]:
    """resid_pre, attn_out, mlp_out attribution patching from one shared run: ``[3, n_layers, pos]``."""
    parts = [get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out]
    res = _every(model, corrupted_tokens, clean_cache, metric, parts, qk_fix, return_delta, progress)
    return torch.stack(res)


def get_act_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric: Metric, *, qk_fix: bool = False,
    return_delta: bool = False, progress: Optional[bool] = False,
) -> Float[torch.Tensor, "5 layer head"]:
    """Head out/q/k/v/pattern over all positions from one shared run: ``[5, n_layers, n_heads]``
    (k/v right-padded with zeros to n_heads under GQA, like TL)."""
    parts = [get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
             get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
             get_act_patch_attn_head_pattern_all_pos]
    res = _every(model, corrupted_tokens, clean_cache, metric, parts, qk_fix, return_delta, progress)
    return _stack_heads(*res)


def get_act_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric: Metric, *, qk_fix: bool = False,
    return_delta: bool = False, progress: Optional[bool] = False,
) -> Float[torch.Tensor, "5 layer pos head"]:
    """Head out/q/k/v/pattern by position from one shared run: ``[5, n_layers, pos, n_heads]``
    (k/v padded to n_heads; the pattern's ``[layer, head, dest]`` rearranged to ``[layer, dest, head]``)."""
    parts = [get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
             get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos,
             get_act_patch_attn_head_pattern_by_pos]
    res = _every(model, corrupted_tokens, clean_cache, metric, parts, qk_fix, return_delta, progress)
    return _stack_heads(*res[:4], einops.rearrange(res[4], "layer head pos -> layer pos head"))


__all__ = [n for n in dir() if n.startswith("get_act_patch_")] + [
    "generic_attribution_patch", "make_df_from_ranges",
]
