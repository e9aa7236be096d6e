"""Gated SAE (SAELens ``GatedSAE``): a gate path decides which features fire, a magnitude path their size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import threshold_encode
from ..sparse_acts import SparseActs
from .config import SAEConfig
from .sae import SAE


@dataclass
class GatedSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "gated"


class GatedSAE(SAE):
    """Gated SAE: gate ``x W_enc + b_gate > 0``, magnitude ``relu(x (W_enc * exp(r_mag)) + b_mag)``, no b_enc.

    Sparse path: ``threshold_encode`` on the gate path gives the active set and ``g = x W_enc + b_gate``
    there; the magnitude of an active feature is ``(g - b_gate) * exp(r_mag) + b_mag`` (same weights),
    so only active features are ever computed. Gradients match SAELens (none through the gate).
    """

    cfg: GatedSAEConfig

    def __init__(self, cfg: GatedSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.b_enc = None  # as SAELens

    def _param_shapes(self):
        shapes = super()._param_shapes()
        del shapes["b_enc"]
        return {**shapes, "b_gate": (self.cfg.d_sae,), "r_mag": (self.cfg.d_sae,), "b_mag": (self.cfg.d_sae,)}

    def _dense_pre(self, xc):
        return xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def _dense_act(self, xc, pre):
        active = (xc @ self.W_enc + self.b_gate > 0).to(self.dtype)
        return active * pre.relu()

    def _sparse_act(self, sae_in, b_in):
        gate = threshold_encode(sae_in, self.W_enc, self.b_gate, 0.0, b_dec=b_in)
        i = gate.indices
        mag = ((gate.values - self.b_gate[i]) * self.r_mag.exp()[i] + self.b_mag[i]).relu()
        live = gate.values > 0  # padding slots hold value 0 (index 0); active gates are > 0
        return SparseActs(torch.where(live, mag, torch.zeros_like(mag)), i)

    def _pre_at(self, xc, code):
        # the magnitude pre-activation (what hook_sae_acts_pre sees); slots with value 0 are dropped
        i = code.indices
        return self._gather_pre(xc, i, self.W_enc, None) * self.r_mag.exp()[i] + self.b_mag[i]

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.fold_and_get_W_dec_norm()
        self.b_gate.data.mul_(norms)
        self.b_mag.data.mul_(norms)
