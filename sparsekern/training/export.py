"""Training module -> sparsekern inference SAE / transcoder, as SAELens's ``save_inference_model``.

Order of the folds, as SAELens's trainer: (1) activation scaling ``s`` (``expected_average_only_in``):
``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s`` (BatchTopK with decoder-norm rescaling: the threshold
``/= s``, SAELens #763); ``W_skip`` is unchanged, as inputs and targets were scaled by the same ``s``;
(2) TopK / BatchTopK with ``rescale_acts_by_decoder_norm``: fold the decoder norms (``W_dec`` rows to
unit norm, ``W_enc`` columns and ``b_enc`` times the norms). The exported config has
``normalize_activations="none"``.

Architectures: standard -> ``standard`` / ``transcoder`` / ``skip_transcoder``; topk -> ``topk`` /
``topk_transcoder`` / ``topk_skip_transcoder`` (the last two are sparsekern-only); jumprelu ->
``jumprelu`` / ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``; batchtopk -> the JumpReLU
classes with ``threshold = topk_threshold`` for every latent (as SAELens 6.54); gated -> ``gated``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .base import TrainingModule


def inference_architecture(cfg) -> str:
    base = {
        "standard": "standard",
        "topk": "topk",
        "batchtopk": "jumprelu",
        "jumprelu": "jumprelu",
        "gated": "gated",
    }[cfg.architecture]
    if not cfg.transcoder:
        return base
    stem = {"standard": "", "topk": "topk_", "jumprelu": "jumprelu_"}[base]
    return f"{stem}{'skip_' if cfg.skip_transcoder else ''}transcoder"


@torch.no_grad()
def inference_state(module: TrainingModule, scaling_factor: Optional[float]) -> tuple[dict[str, Any], dict]:
    """``(cfg.json dict, state dict)`` of the inference SAE (folded; tensors are fresh copies)."""
    cfg = module.cfg
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if scaling_factor is not None:
        s = scaling_factor
        sd["W_enc"] *= s
        sd["W_dec"] /= s
        sd["b_dec"] /= s
        if cfg.architecture == "batchtopk" and cfg.rescale_acts_by_decoder_norm:
            sd["topk_threshold"] /= s
    if cfg.architecture in ("topk", "batchtopk") and cfg.rescale_acts_by_decoder_norm:
        n = sd["W_dec"].norm(dim=-1).clamp(min=1e-8)
        sd["b_enc"] *= n
        sd["W_dec"] /= n[:, None]
        sd["W_enc"] *= n[None, :]
    if cfg.architecture == "batchtopk":
        thr = sd.pop("topk_threshold").item()
        sd["threshold"] = torch.ones_like(sd["b_enc"]) * thr
    if "threshold" in sd:
        sd["threshold"] = sd["threshold"].to(sd["b_enc"].dtype)
    arch = inference_architecture(cfg)
    metadata = {"model_name": cfg.model_name, "hook_name": cfg.hook_name, "context_size": cfg.context_size}
    d: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        d.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    if cfg.transcoder:
        d["d_out"] = cfg.d_out
        metadata["hook_name_out"] = cfg.target_hook_name
    d["metadata"] = metadata
    return d, sd


def to_inference(module: TrainingModule, scaling_factor: Optional[float]):
    """A sparsekern ``SAE`` (or transcoder) with the trained, folded weights (a copy)."""
    from .. import SAE

    cfg_dict, sd = inference_state(module, scaling_factor)
    sae = SAE.from_dict(cfg_dict)
    sae.load_state_dict(sd)
    return sae
