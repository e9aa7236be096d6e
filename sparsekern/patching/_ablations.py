"""The machinery of :mod:`sparsekern.patching.feature_ablation`: the SAE's code at its hook, the ablated
hook values of any set of ablations, and the patching engine that runs them as patches."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..hook_names import block_index
from ._engine import Engine, engine_unsupported_reason
from ._patches import is_pattern_hook


class Ablations:
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

    def reference_runs(self, T: int) -> list[tuple[list, None]]:
        """``(fwd_hooks, None)`` per ablation, for ``run_reference``: one full hooked forward each (the
        oracle, and the path for models the engine cannot run)."""
        runs = []
        for i in range(len(self.feat)):
            rows = torch.tensor([i], device=self.feat.device)

            def hook(act: Tensor, hook=None, rows=rows) -> Tensor:
                fresh = act if self.use_error_term else None  # literally act - a_f W_dec[f]
                return self.ablated(rows, 0, T, fresh)[0].to(act.dtype)

            runs.append(([(self.hook, hook)], None))
        return runs


class AblationEngine(Engine):
    """The patching engine with the ablated hook values as the patches' "clean" activations.

    A patch is ablation ``p.idx[0]`` of :class:`Ablations` at its hook (``p.kind`` ``"pos"``: it changes one
    position only, else ``"ablate"``); :meth:`patch_hooks` writes the ablated values of a chunk.
    """

    def __init__(self, model, tokens: Tensor, abl: Ablations, fwd_hooks: list):
        self.abl = abl
        with model.hooks(fwd_hooks=fwd_hooks):  # the splice (no error term) is part of the cached run
            super().__init__(model, tokens)

    def noop_patches(self, patches, clean) -> list:
        return []  # only active (feature, position) pairs become patches: none is a no-op

    def patch_hooks(self, items, n_rep: dict, start: int, clean: dict, length: int) -> list:
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


def check_features(features, d_sae: int, device) -> Tensor | None:
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
    attached = getattr(model, "attached_hooks", {})  # HookedSAETransformer: an SAE replaces the hook point
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
    wrappers = getattr(model, "sae_wrappers", {})
    if any(w.exclude_special_tokens is not False for w in wrappers.values()):
        return "an attached SAE uses exclude_special_tokens"
    return None


def setup(model, tokens: Tensor, sae, use_error_term: bool) -> tuple[Ablations, list, str | None]:
    """The SAE's code at its hook, the unablated hook value and the splice hooks of the baseline run."""
    from sparsekern.hooked_sae_transformer import as_sparsekern_sae

    sk = as_sparsekern_sae(sae)
    meta = sk.cfg.metadata
    transcoder = sk.is_transcoder
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
        norm_state = sk.norm_state
        recon = None if use_error_term else sk.decode(code).reshape(act_out.shape)
        sk.pop_norm_state()
        scale = sk.code_scale()
    norm = None
    if norm_state is not None and not transcoder:  # transcoders' decode skips the de-normalisation
        norm = ("div", norm_state[1]) if norm_state[0] == "scale" else ("mul", norm_state[2])
    base = act_out if use_error_term else recon.to(act_out.dtype)
    abl = Ablations(
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


def active_ablations(abl: Ablations, features: Tensor | None, per_position: bool, T: int):
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
