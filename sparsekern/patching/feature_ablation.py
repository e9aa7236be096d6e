"""Feature ablation sweeps: the metric's change when each SAE feature is removed from a model's run.

:func:`ablate_features` splices an SAE (or transcoder) at its hook and, for every active feature ``f``
(or a given list), measures ``metric(ablated) - metric(baseline)``, where the ablated run subtracts the
feature's contribution to the reconstruction at the hook::

    act[b, t] -> act[b, t] - a_f(b, t) * W_dec[f]            (use_error_term=True, the default)
    act[b, t] -> recon[b, t] - a_f(b, t) * W_dec[f]          (use_error_term=False)

``a_f(b, t)`` is the SAE code (``encode_sparse``) of the baseline activation at the hook. The numbers
equal one ``model.run_with_hooks(tokens, fwd_hooks=[(hook, that edit)])`` per ablation (tested to 1e-5),
i.e. SAELens's ablation by zeroing ``hook_sae_acts_post[..., f]`` with the SAE attached (the error term,
when used, is computed from the unablated code).

**Conventions.**

* *Batch*: as in TransformerLens activation patching, an ablation acts on the whole batch at once --
  feature ``f`` is removed in every prompt (row) where it is active -- and the metric sees the
  ``[batch, pos, d_vocab]`` logits of that single run. For one ablation per (prompt, feature), call the
  function per prompt (a batch of one).
* ``per_position=False``: one ablation per feature, at every position (and row) where it is active.
  Output ``[n_features]``.
* ``per_position=True``: one ablation per (feature, position ``p``), only at ``p`` (in every row where
  ``f`` is active at ``p``). Output ``[n_features, pos]``.
* Inactive (feature, position) entries are not run: the ablation would change nothing, so their value
  is exactly ``0`` (``return_delta=True``) or the baseline metric (``return_delta=False``); the
  ``active`` mask of the result tells them apart from a measured zero.
* ``use_error_term=True``: the SAE is spliced with its error term, so the baseline is the model's own
  run. ``False``: the activation at the hook is replaced by the reconstruction (``decode(encode(x))``;
  for a transcoder without its skip connection, as ``HookedSAETransformer``) in the baseline and in
  every ablated run.
* SAEs with run-time input normalisation (``constant_norm_rescale``, ``layer_norm``) remove the feature's
  de-normalised contribution; TopK ``rescale_acts_by_decoder_norm`` codes are scaled as in ``decode``.

**Speed.** Each ablation is an activation patch at the hook's layer (the ablated value at the hook is
known in advance), so the sweep runs on :mod:`sparsekern.patching`'s engine: one baseline forward is
cached; each ablation starts at the hook's block from the cached ``resid_pre``; under causal attention it
recomputes only positions from the first one it changes (earlier keys/values and logits come from the
cache), ablations sharing that position run as one batched forward, and only the logit positions the
metric reads are unembedded (see ``sparsekern.patching``). Models or hooks the engine does not cover
(left padding, multi-device, hooks outside the blocks, SAEs attached with ``exclude_special_tokens``)
run one hooked forward per ablation, with a one-time warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..hook_names import block_index
from . import _engine
from ._engine import (
    Engine,
    Patch,
    as_scalar,
    engine_unsupported_reason,
    is_pattern_hook,
    is_position_local_hook,
)

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]
BACKENDS = ("auto", "reference")

__all__ = ["FeatureAblationResult", "ablate_features"]


class FeatureAblationResult(NamedTuple):
    """Output of :func:`ablate_features`.

    values: ``[n_features]`` (``[n_features, pos]`` with ``per_position``) float32 on the model device:
        ``metric(ablated) - metric(baseline)`` (or ``metric(ablated)`` with ``return_delta=False``).
    feature_ids: ``[n_features]`` int64, the feature of each row (ascending when ``features=None``).
    active: bool, same shape as ``values``: whether the ablation changed anything (the feature is active
        in some row (at that position)); other entries were not run (0, or the baseline metric).
    baseline: 0-d float32, the metric of the unablated run.
    """

    values: Tensor
    feature_ids: Tensor
    active: Tensor
    baseline: Tensor


class _Ablations:
    """The SAE's code at the hook and the ablated hook activations, for any set of ablations.

    Ablation ``i`` removes feature ``feat[i]`` at every position (``pos[i] == -1``) or at ``pos[i]`` only.
    """

    def __init__(
        self,
        hook: str,
        layer: int | None,
        base: Tensor,
        values: Tensor,
        indices: Tensor,
        W_dec: Tensor,
        scale: Tensor | None,
        norm: Any,
        use_error_term: bool,
    ):
        self.hook, self.layer = hook, layer
        self.base = base  # [B, T, *rest]: the hook's unablated value (activation, or reconstruction)
        self.rest = tuple(base.shape[2:])
        self.values, self.indices = values, indices  # [B, T, k] the code
        self.W_dec, self.scale, self.norm = W_dec, scale, norm
        self.use_error_term = use_error_term
        self.feat = torch.zeros(0, dtype=torch.long, device=values.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=values.device)

    def delta(self, rows: Tensor, s: int, length: int) -> Tensor:
        """``[n, B, length, *rest]``: what ablations ``rows`` subtract at positions ``s .. s+length-1``."""
        feat, pos = self.feat[rows], self.pos[rows]
        val, idx = self.values[:, s : s + length], self.indices[:, s : s + length]
        match = idx.unsqueeze(0) == feat.view(-1, 1, 1, 1)  # [n, B, L, k]
        # one slot holds f (or none): the sum is that value exactly, so a_f * W_dec[f] below is bitwise the
        # product a hand-written hook computes
        zero = torch.zeros((), dtype=val.dtype, device=val.device)
        coef = torch.where(match, val.unsqueeze(0), zero).sum(-1)  # [n, B, L]
        if self.scale is not None:  # TopK rescale_acts_by_decoder_norm: decode scales the code
            coef = coef * self.scale[feat].view(-1, 1, 1)
        if self.norm is not None:  # run-time de-normalisation is linear in the code (per token)
            kind, t = self.norm
            t = t[:, s : s + length, 0].unsqueeze(0)
            coef = coef / t if kind == "div" else coef * t
        ts = torch.arange(s, s + length, device=coef.device)
        keep = (pos.view(-1, 1) < 0) | (ts.view(1, -1) == pos.view(-1, 1))  # [n, L]
        coef = torch.where(keep.unsqueeze(1), coef, zero.to(coef.dtype))
        d = coef.unsqueeze(-1) * self.W_dec[feat].view(len(feat), 1, 1, -1)
        return d.view(*d.shape[:3], *self.rest)

    def ablated(self, rows: Tensor, s: int, length: int, act: Tensor | None = None) -> Tensor:
        """``[n, B, length, *rest]`` hook values of ablations ``rows`` at positions ``s..``; ``act``: the
        unablated hook value to subtract from (default: the cached one)."""
        base = self.base[:, s : s + length] if act is None else act
        return base.unsqueeze(0) - self.delta(rows, s, length).to(base.dtype)


class _AblationEngine(Engine):
    """The patching engine with the ablated hook values as the patches' "clean" activations."""

    def __init__(self, model, tokens: Tensor, abl: _Ablations, fwd_hooks: list):
        self.abl = abl
        with model.hooks(fwd_hooks=fwd_hooks):  # the splice (no error term) is part of the cached run
            super().__init__(model, tokens)

    def _noops(self, patches, clean) -> list:
        return []  # only active (feature, position) pairs become patches: none is a no-op

    def _hooks_for(self, items, n_rep: dict, start: int, clean: dict, length: int) -> list:
        if not items:
            return []
        dev, B, abl = self.device, self.B, self.abl
        J = torch.tensor([j for j, _ in items], device=dev)
        rows = torch.tensor([p.idx[0] for _, p in items], device=dev)
        n = n_rep[abl.layer]
        value = abl.ablated(rows, start, length)  # [len(items), B, length, *rest]

        def hook(act: Tensor, hook=None) -> Tensor:
            if act.shape[1] != length or act.shape[0] != n * B:  # pragma: no cover - engine invariant
                raise RuntimeError(
                    f"internal: {abl.hook} has shape {list(act.shape)}, expected [{n * B}, {length}, ...]"
                )
            a = act.view(n, B, *act.shape[1:]) if act.is_contiguous() else act.reshape(n, B, *act.shape[1:])
            a[J] = value.to(act.dtype)
            return a.view(act.shape)

        return [(abl.hook, hook)]


# ------------------------------------------------------------------------------------------ checks
def _check_tokens(model, tokens) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be an integer tensor [batch, pos], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor [batch, pos], got dtype {tokens.dtype}")
    if tokens.dim() == 1:  # TransformerLens adds the batch axis itself
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape [batch, pos] (or [pos]), got {list(tokens.shape)}")
    return tokens.to(model.cfg.device)


def _check_features(features, d_sae: int, device) -> Tensor | None:
    if features is None:
        return None
    if isinstance(features, Tensor):
        f = features.detach()
    else:
        try:
            f = torch.as_tensor(list(features))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"features must be None or a 1-D sequence / tensor of int feature ids, got {features!r}"
            ) from None
    if f.numel() == 0:
        f = f.reshape(0).long()
    if f.dim() != 1 or f.dtype.is_floating_point or f.dtype.is_complex or f.dtype == torch.bool:
        raise TypeError(
            f"features must be None or a 1-D sequence / tensor of int feature ids, got shape "
            f"{list(f.shape)} dtype {f.dtype}"
        )
    f = f.long()
    bad = f[(f < 0) | (f >= d_sae)]
    if bad.numel():
        raise ValueError(f"features: id(s) {bad[:5].tolist()} out of range [0, d_sae={d_sae})")
    return f.to(device)


def _check_hooks(model, hook_in: str | None, hook_out: str | None) -> None:
    attached = {}
    if hasattr(model, "_acts_to_saes"):  # HookedSAETransformer: an attached SAE replaces the hook point
        attached = {**{h: h for h in model._acts_to_saes}, **{o: i for i, o in model._output_hooks.items()}}
    for role, name in (("hook_name", hook_in), ("hook_name_out", hook_out)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"sae.cfg.metadata.{role} must name a hook of the model, got {name!r}")
        if name in attached:
            raise ValueError(
                f"an SAE is already attached at {name!r} (sae.cfg.metadata.{role}); detach it first "
                f"(model.reset_saes({attached[name]!r})): ablate_features splices `sae` there itself"
            )
        if name not in model.hook_dict:
            raise ValueError(
                f"sae.cfg.metadata.{role}={name!r} is not a hook of this model (see model.hook_dict, e.g. "
                f"'blocks.0.hook_resid_pre')"
            )
    if is_pattern_hook(hook_out):
        raise ValueError(f"cannot ablate SAE features at an attention-pattern hook ({hook_out!r})")


def _check_act(act: Tensor, name: str, role: str, d: int, B: int, T: int) -> None:
    if act.dim() < 3 or act.shape[0] != B or act.shape[1] != T or math.prod(act.shape[2:]) != d:
        raise ValueError(
            f"the activation at {name!r} (sae.cfg.metadata.{role}) has shape {list(act.shape)}; the SAE "
            f"needs [batch={B}, pos={T}, {d}] (or [batch, pos, n_heads, d_head] with n_heads*d_head = {d})"
        )


def _engine_reason(model, tokens: Tensor, layer: int | None) -> str | None:
    reason = engine_unsupported_reason(model, tokens)
    if reason is not None:
        return reason
    if layer is None:
        return "the SAE's hook is not inside a transformer block"
    wrappers = getattr(model, "_acts_to_saes", {})
    if any(w.exclude_special_tokens is not False for w in wrappers.values()):
        return "an attached SAE uses exclude_special_tokens"
    return None


# ------------------------------------------------------------------------------------------- setup
def _setup(model, tokens: Tensor, sae, use_error_term: bool) -> tuple[_Ablations, list, str | None]:
    """The SAE's code at its hook, the unablated hook value and the splice hooks of the baseline run."""
    from sparsekern.hooked_sae_transformer import as_sparsekern_sae

    sk = as_sparsekern_sae(sae)
    meta = sk.cfg.metadata
    transcoder = bool(getattr(sk, "_is_transcoder", False))
    hook_in = meta.hook_name
    hook_out = (getattr(meta, "hook_name_out", None) or hook_in) if transcoder else hook_in
    _check_hooks(model, hook_in, hook_out)
    L = model.cfg.n_layers
    layer = block_index(hook_out, L)
    B, T = tokens.shape
    names = {hook_in, hook_out}
    stop = layer + 1 if layer is not None and layer + 1 < L and block_index(hook_in, L) is not None else None
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=stop)
    for role, name in (("hook_name", hook_in), ("hook_name_out", hook_out)):
        if name not in cache.cache_dict:
            raise ValueError(
                f"sae.cfg.metadata.{role}={name!r} never ran in the model's forward pass (is the hook "
                f"switched off in model.cfg, e.g. use_attn_result / use_hook_mlp_in?)"
            )
    act_in, act_out = cache[hook_in], cache[hook_out]
    d_out = sk.W_dec.shape[1]
    _check_act(act_in, hook_in, "hook_name", sk.cfg.d_in, B, T)
    _check_act(act_out, hook_out, "hook_name_out" if transcoder else "hook_name", d_out, B, T)
    if act_in.device != sk.W_dec.device:
        raise ValueError(
            f"the model runs on {act_in.device} but the SAE's weights are on {sk.W_dec.device}; move one "
            f"of them (sae.to(device))"
        )
    # hook_z SAEs without reshaping take the heads flattened; with it, as the hook gives them
    reshape = getattr(sk, "hook_z_reshaping_mode", False) and not transcoder
    x = act_in if reshape or act_in.dim() == 3 else act_in.flatten(2)
    with torch.no_grad():
        code = sk.encode_sparse(x)
        norm_state = sk._norm_state
        recon = None if use_error_term else sk.decode(code).reshape(act_out.shape)
        sk._norm_state = None
        scale = sk._code_scale()
    norm = None
    if norm_state is not None and not transcoder:  # transcoders' decode skips the de-normalisation
        norm = ("div", norm_state[1]) if norm_state[0] == "scale" else ("mul", norm_state[2])
    base = act_out if use_error_term else recon.to(act_out.dtype)
    abl = _Ablations(
        hook_out,
        layer,
        base,
        code.values.detach(),
        code.indices.detach(),
        sk.W_dec.detach(),
        None if scale is None else scale.detach(),
        norm,
        use_error_term,
    )
    splice: list = []
    if not use_error_term:

        def splice_hook(act: Tensor, hook=None) -> Tensor:  # the baseline's hook value: the reconstruction
            return recon.to(act.dtype, copy=True)  # a fresh tensor: later hooks may write into it

        splice = [(hook_out, splice_hook)]
    return abl, splice, _engine_reason(model, tokens, layer)


def _plan(abl: _Ablations, features: Tensor | None, per_position: bool, T: int):
    """Which (feature, position) pairs are active, and the ablations to run (sets ``abl.feat`` / ``abl.pos``).

    Returns ``(feature_ids, inverse, act_u, u, first, n_pos)``: the requested ids, ``inverse`` mapping them
    to their sorted unique values ``uniq`` (``feature_ids == uniq[inverse]``), ``act_u [len(uniq), T]``
    (active in some row at that position), and per ablation its row of ``uniq``, first changed position
    and number of changed positions.
    """
    nz = abl.values != 0
    f_act = abl.indices[nz]  # feature of each active (row, position, slot)
    t_act = torch.arange(T, device=nz.device).view(1, T, 1).expand_as(nz)[nz]
    if features is None:
        features = torch.unique(f_act)
    uniq, inverse = torch.unique(features, return_inverse=True)
    act_u = torch.zeros(len(uniq), T, dtype=torch.bool, device=nz.device)
    if len(uniq) and len(f_act):
        where = torch.searchsorted(uniq, f_act).clamp_max(len(uniq) - 1)
        hit = uniq[where] == f_act
        act_u[where[hit], t_act[hit]] = True
    if per_position:
        u, p = act_u.nonzero(as_tuple=True)  # feature-major, positions ascending
        abl.feat, abl.pos, first = uniq[u], p, p
    else:
        u = act_u.any(1).nonzero(as_tuple=True)[0]
        abl.feat, abl.pos = uniq[u], torch.full_like(u, -1)
        first = act_u[u].int().argmax(1)  # argmax returns the first maximum: the first active position
    return features, inverse, act_u, u, first, act_u[u].sum(1)


# -------------------------------------------------------------------------------------------- API
def ablate_features(
    model,
    tokens: Int[Tensor, "batch pos"],
    sae,
    metric: Metric,
    features: None | Sequence[int] | Tensor = None,
    *,
    per_position: bool = False,
    use_error_term: bool = True,
    return_delta: bool = True,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
) -> FeatureAblationResult:
    """Metric change when each SAE feature is ablated at the SAE's hook (see the module docstring).

    Args:
        model: a ``HookedTransformer`` (or ``sparsekern.HookedSAETransformer``; SAEs attached elsewhere stay
            part of the model, none may be attached at ``sae``'s hook).
        tokens: ``[batch, pos]`` (or ``[pos]``) int tokens.
        sae: a ``sparsekern.SAE`` / transcoder or a sae_lens one (converted, weights shared) with
            ``cfg.metadata.hook_name`` (transcoders: read there, ablated at ``hook_name_out``). Its input is
            ``[batch, pos, d_in]`` or, at ``attn.hook_z``, ``[batch, pos, n_heads, d_head]``.
        metric: logits ``[batch, pos, d_vocab]`` -> scalar, as a patching metric (it may get a
            ``LazyLogits``, see ``sparsekern.patching``).
        features: None (every feature active anywhere in the batch, ascending) or int ids ``[n_features]``
            in ``[0, d_sae)`` (kept in the given order; duplicates are run once).
        per_position: ablate each feature at each position separately (output ``[n_features, pos]``).
        use_error_term: True: the baseline is the model's own run and an ablation subtracts
            ``a_f * W_dec[f]``; False: the hook's activation is replaced by the SAE's reconstruction.
        return_delta: return ``metric(ablated) - metric(baseline)`` (else ``metric(ablated)``).
        progress: tqdm bar. max_batch: ablations per forward pass (default: from ``memory_budget``).
        memory_budget: bytes one chunk may use (default: a quarter of free memory, capped).
        backend: ``"auto"`` (the fused patching engine where exact) or ``"reference"`` (one hooked forward
            per ablation).

    Returns:
        :class:`FeatureAblationResult` ``(values, feature_ids, active, baseline)``.
    """
    return _assemble(_measure(
        model, tokens, sae, metric, features, per_position=per_position, use_error_term=use_error_term,
        return_delta=return_delta, progress=progress, max_batch=max_batch, memory_budget=memory_budget,
        backend=backend,
    ))


class _Measured(NamedTuple):
    """What :func:`_measure` ran, before :func:`_assemble` lays it out (data parallel: ``vals`` is summed
    across ranks in between, each rank having run a disjoint share of the ablations, 0 elsewhere).

    vals: ``[n_ablations]`` metric of each ablated run (model device). base: 0-d baseline metric.
    feature_ids ``[n_features]``, inverse ``[n_features]`` (rows of the unique features), act_u
    ``[n_unique, pos]`` bool, u / pos ``[n_ablations]`` (unique-feature row, position or -1).
    """

    vals: Tensor
    base: Tensor
    feature_ids: Tensor
    inverse: Tensor
    act_u: Tensor
    u: Tensor
    pos: Tensor
    per_position: bool
    return_delta: bool
    device: torch.device


def _measure(
    model, tokens, sae, metric, features, *, per_position, use_error_term, return_delta, progress, max_batch,
    memory_budget, backend,
) -> _Measured:
    """Checks, the baseline run and the ablated runs of :func:`ablate_features` (same arguments)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not callable(metric):
        raise TypeError("metric must be callable (logits [batch, pos, d_vocab] -> scalar)")
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_hooks"):
        raise TypeError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    tokens = _check_tokens(model, tokens)
    if not hasattr(sae, "W_dec") or not hasattr(sae, "cfg"):
        raise TypeError(
            f"sae must be a sparsekern.SAE or a sae_lens SAE/transcoder, got {type(sae).__name__}"
        )
    d_sae = sae.W_dec.shape[0]
    device = torch.device(model.cfg.device)
    feats = _check_features(features, d_sae, tokens.device)
    T = tokens.shape[1]

    abl, splice, reason = _setup(model, tokens, sae, bool(use_error_term))
    feature_ids, inverse, act_u, u, first, n_pos = _plan(abl, feats, per_position, T)
    n_abl = len(abl.feat)
    if reason is not None and backend == "auto":
        _engine.warn_once(
            "ablation:" + reason, f"sparsekern.patching.feature_ablation: one forward per ablation ({reason})"
        )
    if backend == "auto" and reason is None and n_abl:  # (nothing to ablate: just the baseline run)
        eng = _AblationEngine(model, tokens, abl, splice)
        base = as_scalar(metric(eng.logits), "metric", eng.device)
        local = is_position_local_hook(abl.hook)
        patches = []
        for i in range(n_abl):
            # causal attention: positions before the first ablated one are unchanged at every layer
            s = int(first[i]) if eng.causal and local else 0
            # "pos": only position s changes at the hook, so (on CPU) a hook after the block's keys/values
            # runs its block at that one position (see Engine.join_layer)
            kind = "pos" if local and (per_position or int(n_pos[i]) == 1) else "ablate"
            patches.append(Patch(0, i, abl.layer, s, abl.hook, kind, (i,)))
        vals = eng.run(patches, {}, metric, "metric", max_batch, memory_budget, progress)
    else:
        vals, base = _run_reference(model, tokens, abl, splice, metric, n_abl, progress)
    return _Measured(vals, base, feature_ids, inverse, act_u, u, abl.pos, bool(per_position),
                     bool(return_delta), device)


def _assemble(m: _Measured) -> FeatureAblationResult:
    """Lay the ablations' metric values out as a :class:`FeatureAblationResult`."""
    vals, base, u, device, per_position, return_delta = m.vals, m.base, m.u, m.device, m.per_position, \
        m.return_delta
    act_u, n_abl = m.act_u, len(m.vals)
    # ablation i -> cell (u[i], position) of the unique features' table -> the requested rows
    active_u = act_u if per_position else act_u.any(1)
    table = torch.zeros(active_u.shape, device=device)  # as TransformerLens patching: default dtype
    base_out = base.to(device=device, dtype=table.dtype)
    if not return_delta:
        table[~active_u.to(device)] = base_out
    if n_abl:
        v = (vals - base if return_delta else vals).to(device=device, dtype=table.dtype)
        cell = (u.to(device), m.pos.to(device)) if per_position else (u.to(device),)
        table[cell] = v
    inverse = m.inverse.to(device)
    return FeatureAblationResult(
        table[inverse], m.feature_ids.to(device), active_u.to(device)[inverse], base_out
    )


def _run_reference(model, tokens, abl: _Ablations, splice: list, metric, n_abl: int, progress: bool):
    """One ``run_with_hooks`` per ablation (the oracle; and the path for models the engine cannot run)."""
    from tqdm.auto import tqdm

    device = torch.device(model.cfg.device)
    T = tokens.shape[1]
    with torch.no_grad():
        base = as_scalar(metric(model.run_with_hooks(tokens, fwd_hooks=splice)), "metric", device)
    shard = _engine.SHARD.get()  # data parallel: ablations i % world == rank run here, the rest stay 0
    if shard is not None:
        shard.record("ablation reference", n_abl)
    vals = []
    for i in tqdm(range(n_abl), disable=not progress, desc="feature ablation"):
        if shard is not None and not shard.mine(i):
            # the metric's dtype (every rank has it from the baseline): the ranks' vals can be summed
            vals.append(torch.zeros((), dtype=base.dtype, device=device))
            continue
        rows = torch.tensor([i], device=abl.feat.device)

        def hook(act: Tensor, hook=None, rows=rows) -> Tensor:
            fresh = act if abl.use_error_term else None  # literally act - a_f W_dec[f]
            return abl.ablated(rows, 0, T, fresh)[0].to(act.dtype)

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(abl.hook, hook)])
        vals.append(as_scalar(metric(logits), "metric", device))
    return (torch.stack(vals) if vals else torch.zeros(0, device=device)), base
