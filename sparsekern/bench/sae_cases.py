"""Benchmark cases for the drop-in API: SAELens ``SAE.forward`` and ``run_with_cache_with_saes``.

Both sides hold the very same weight tensors. ``sae_forward`` times ``sae.forward(x)`` of a
``sae_lens`` TopK / JumpReLU SAE against the sparsekern SAE converted from it. ``sae_cache`` runs a
GPT-2-small-shaped random model (12 layers, d_vocab 50257; tiny in ``--quick``) with one SAE at
``blocks.6.hook_resid_pre``: SAELens's ``HookedSAETransformer.run_with_cache_with_saes`` (dense cache)
against sparsekern's with ``sparse=True``; peak memory is where they differ most.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..sparse_acts import SparseActs
from . import workload as wl

CACHE_TOKENS = {True: (2, 16), False: (4, 128)}  # quick -> (batch, seq)


def _model_cfg(d_model: int, quick: bool) -> Any:
    from transformer_lens import HookedTransformerConfig

    if quick:
        return HookedTransformerConfig(n_layers=2, d_model=d_model, n_heads=4, d_head=d_model // 4,
                                       d_mlp=4 * d_model, d_vocab=512, n_ctx=64, act_fn="gelu_new",
                                       normalization_type="LN", seed=0)
    return HookedTransformerConfig(n_layers=12, d_model=d_model, n_heads=12, d_head=d_model // 12,
                                   d_mlp=4 * d_model, d_vocab=50257, n_ctx=1024, act_fn="gelu_new",
                                   normalization_type="LN", seed=0)


def _sae_pair(w: wl.Weights, arch: str, hook: str, acts: Optional[Tensor] = None) -> tuple[Any, Any]:
    """(sae_lens SAE holding w's tensors, the sparsekern SAE sharing them).

    A JumpReLU threshold is set for L0 ≈ 64 on ``acts`` (the activations it will see; default ``w.x``).
    """
    from ..saes import SAE

    if arch == "topk":
        peer = wl.topk_sae(w)
    else:
        cal = w if acts is None else wl.Weights(w.shape, acts, w.W_enc, w.b_enc, w.W_dec, w.b_dec)
        thr = torch.full((w.shape.d_sae,), wl.calibrate_threshold(cal, wl.THRESHOLD_L0), dtype=w.dtype,
                         device=w.device)
        peer = wl.jumprelu_sae(w, thr)
    peer.cfg.metadata.hook_name = hook
    return peer, SAE.from_sae_lens(peer)


def _diff_dense(ours: Tensor, peer: Tensor) -> float:
    return wl.max_diff(ours, peer)


def sae_forward_cases(w: wl.Weights) -> list[wl.Case]:
    """``SAE.forward`` (encode + decode): sae_lens vs sparsekern, TopK and JumpReLU."""
    out = []
    for arch in ("topk", "jumprelu"):
        missing = wl.sae_lens_missing()
        if missing:
            out.append(wl.Case("sae_forward", w.shape, lambda: None, ("topk_encode",),
                              [wl.Peer("sae_lens", "sae_lens SAE.forward", None, skip=missing)],
                              variant=arch))
            continue
        peer, ours = _sae_pair(w, arch, "blocks.6.hook_resid_pre")
        enc = "topk_encode" if arch == "topk" else "threshold_encode"
        out.append(wl.Case(
            "sae_forward", w.shape, wl.nograd(lambda s=ours: s(w.x)), (enc, "sparse_decode"),
            [wl.Peer("sae_lens", f"sae_lens {type(peer).__name__}.forward", wl.nograd(lambda s=peer: s(w.x)),
                    min_ratio=1.0, target="no slower", check=_diff_dense)],
            variant=arch,
        ))
    return out


def _models(w: wl.Weights, quick: bool) -> tuple[Any, Any, Tensor]:
    """(sae_lens HookedSAETransformer, sparsekern HookedSAETransformer with the same weights, tokens)."""
    key = f"models-{quick}"
    if key not in w.cache:
        from sae_lens import HookedSAETransformer as SLModel

        from ..hooked_sae_transformer import HookedSAETransformer

        cfg = _model_cfg(w.shape.d_in, quick)
        cfg.device = str(w.device)
        peer = SLModel(cfg).to(w.dtype).eval()
        ours = HookedSAETransformer(cfg).to(w.dtype).eval()
        ours.load_state_dict(peer.state_dict())
        batch, seq = CACHE_TOKENS[quick]
        toks = torch.randint(0, cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(7))
        w.cache[key] = (peer, ours, toks.to(w.device))
    return w.cache[key]


def sae_cache_cases(w: wl.Weights, quick: bool) -> list[wl.Case]:
    """``run_with_cache_with_saes`` on a GPT-2-shaped model: SAELens dense cache vs sparse=True."""
    out = []
    missing = wl.sae_lens_missing()
    hook = "blocks.1.hook_resid_pre" if quick else "blocks.6.hook_resid_pre"
    # (variant, architecture, names_filter): the whole cache, and only the SAE's features
    only_sae = f"{hook}.hook_sae_acts_post"
    for variant, arch, names in (("topk", "topk", None), ("jumprelu", "jumprelu", None),
                                 ("topk acts_post only", "topk", only_sae)):
        if missing:
            out.append(wl.Case("sae_cache", w.shape, lambda: None, ("topk_encode",),
                              [wl.Peer("sae_lens", "sae_lens run_with_cache_with_saes", None, skip=missing)],
                              variant=variant))
            continue
        peer_model, model, toks = _models(w, quick)
        with torch.no_grad():
            acts = model.run_with_cache(toks, names_filter=hook)[1][hook].flatten(0, 1)
        peer_sae, sae = _sae_pair(w, arch, hook, acts)
        name = f"{hook}.hook_sae_acts_post"

        def ours(sae: Any = sae, names: Any = names) -> Any:
            return model.run_with_cache_with_saes(toks, saes=[sae], sparse=True, names_filter=names)

        def peer(sae: Any = peer_sae, names: Any = names) -> Any:
            return peer_model.run_with_cache_with_saes(toks, saes=[sae], names_filter=names)

        def check(o: Any, p: Any, name: str = name) -> float:
            acts: SparseActs = o[1][name]
            return max(wl.max_diff(o[0], p[0]), wl.max_diff(acts.to_dense(w.shape.d_sae), p[1][name]))

        def info(o: Any, name: str = name) -> dict[str, Any]:
            acts: SparseActs = o[1][name]
            dense_mib = acts.values[..., 0].numel() * w.shape.d_sae * w.x.element_size() / 2**20
            sparse_mib = (acts.values.nbytes + acts.indices.nbytes) / 2**20
            return {"tokens": int(toks.numel()), "hook": hook,
                    "acts_post_dense_mib": round(dense_mib, 2), "acts_post_sparse_mib": round(sparse_mib, 3),
                    "acts_post_mem_ratio": round(dense_mib / sparse_mib, 1)}

        enc = "topk_encode" if arch == "topk" else "threshold_encode"
        out.append(wl.Case(
            "sae_cache", w.shape, wl.nograd(ours), (enc, "sparse_decode"),
            [wl.Peer("sae_lens", "sae_lens HookedSAETransformer.run_with_cache_with_saes (dense)",
                    wl.nograd(peer), check=check)],
            variant=variant, info_fn=info,
        ))
    return out


BUILDERS: dict[str, Callable[[wl.Weights, bool], list[wl.Case]]] = {
    "sae_forward": lambda w, quick: sae_forward_cases(w),
    "sae_cache": sae_cache_cases,
}
