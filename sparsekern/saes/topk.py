"""TopK SAE: ``TopKSAEConfig``, the :class:`TopKMixin` activation (shared with the top-k transcoders and
the sharded SAE) and ``TopKSAE``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import topk_encode
from .config import SAEConfig
from .sae import SAE


@dataclass
class TopKSAEConfig(SAEConfig):
    """``k`` active features; ``rescale_acts_by_decoder_norm`` ranks ``pre * ||W_dec[f]||``."""

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"TopK k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")


class TopKMixin:
    """The top-k activation, mixed into an SAE class before it (``class TopKSAE(TopKMixin, SAE)``).

    Top-``k`` of ``pre [..., d_sae]`` (times ``||W_dec[f]||`` if ``cfg.rescale_acts_by_decoder_norm``),
    then ReLU unless ``cfg.apply_relu`` is False. Needs ``cfg.k``; ``isinstance(sae, TopKMixin)`` tells
    a top-k code (exactly ``k`` selected slots per row) from a threshold code.
    """

    def _dense_act(self, xc, pre):
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)
        values = values.relu() if getattr(self.cfg, "apply_relu", True) else values
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _sparse_act(self, sae_in, b_in):
        W, b = self.W_enc, self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            # (x W + b) * n == x (W * n) + b * n: fold the norms into the encoder columns for the op
            n = self.W_dec.norm(dim=-1)
            W, b = W * n, b * n
        return topk_encode(sae_in, W, b, self.cfg.k, b_dec=b_in, relu=getattr(self.cfg, "apply_relu", True))

    def _code_scale(self):
        return 1 / self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def _code_slots(self, code):
        return torch.ones_like(code.values, dtype=torch.bool)  # all k selected, even if ReLU zeroed one

    def _pre_at(self, xc, code):
        return self._gather_pre(xc, code.indices, self.W_enc, self.b_enc)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "Folding W_dec_norm is not safe for TopKSAEs when rescale_acts_by_decoder_norm is False, "
                "as this may change the topk activations"
            )
        super().fold_W_dec_norm()


_TopK = TopKMixin  # the old private name


class TopKSAE(TopKMixin, SAE):
    """TopK SAE (``cfg.k``; ``cfg.rescale_acts_by_decoder_norm`` as SAELens)."""

    cfg: TopKSAEConfig
