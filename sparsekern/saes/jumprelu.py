"""JumpReLU SAE: ``JumpReLUSAEConfig``, the :class:`JumpReLUMixin` activation (shared with the JumpReLU
transcoders) and ``JumpReLUSAE`` (also BatchTopK / Matryoshka checkpoints saved for inference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import threshold_encode
from .config import SAEConfig
from .sae import SAE


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu"


class JumpReLUMixin:
    """The JumpReLU activation, mixed into an SAE class before it (``class JumpReLUSAE(JumpReLUMixin, SAE)``).

    ``relu(pre) * (pre > threshold)`` (SAELens); with ``cfg.apply_relu=False`` (circuit-tracer
    transcoders) ``pre * (pre > threshold)``. Adds the parameter ``threshold [d_sae]``.
    """

    def _param_shapes(self):
        return {**super()._param_shapes(), "threshold": (self.cfg.d_sae,)}

    def _dense_act(self, xc, pre):
        mask = (pre > self.threshold).to(pre.dtype)
        return (pre.relu() if getattr(self.cfg, "apply_relu", True) else pre) * mask

    def _sparse_act(self, sae_in, b_in):
        # relu(pre) * (pre > t) keeps exactly pre > max(t, 0)
        thr = self.threshold.detach()
        thr = thr.clamp_min(0) if getattr(self.cfg, "apply_relu", True) else thr
        return threshold_encode(sae_in, self.W_enc, self.b_enc, thr, b_dec=b_in)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        self.threshold.data = self.threshold.data * self.fold_and_get_W_dec_norm()

    def process_state_dict_for_loading(self, state_dict):
        if "log_threshold" in state_dict:  # older SAELens checkpoints
            state_dict["threshold"] = torch.exp(state_dict.pop("log_threshold")).detach().contiguous()


_JumpReLU = JumpReLUMixin  # the old private name


class JumpReLUSAE(JumpReLUMixin, SAE):
    """JumpReLU SAE (also BatchTopK / Matryoshka checkpoints, which SAELens saves as JumpReLU)."""

    cfg: JumpReLUSAEConfig
