"""Gated SAE training, as SAELens 6.54's ``GatedTrainingSAE``. Dense: builds ``[N, d_sae]``.

Parameters ``W_enc [d_in, d_sae]``, ``b_gate``, ``b_mag``, ``r_mag [d_sae]`` (no ``b_enc``), ``W_dec``,
``b_dec``. With ``xc = x - b_dec*apply``::

    pi_gate  = xc @ W_enc + b_gate                                   [N, d_sae]
    f        = 1{pi_gate > 0} * relu(xc @ (W_enc * exp(r_mag)) + b_mag)
    sae_out  = f @ W_dec + b_dec                                     [N, d_in]
    loss     = ||sae_out - x||^2  +  l1_coefficient * mean_rows(sum_f relu(pi_gate) * ||W_dec[f]||)
               + ||relu(pi_gate) @ W_dec + b_dec - x||^2              (auxiliary reconstruction)

(squared norms summed over dims, averaged over rows). No transcoder variant (none exists to export to).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import StepOutput, TrainingModule, mse_loss


class GatedTrainingModule(TrainingModule):
    """Gated SAE training module (``cfg.architecture == "gated"``)."""

    architecture = "gated"
    has_b_enc = False

    def __init__(self, cfg):
        super().__init__(cfg)
        dt, dev = cfg.torch_dtype, cfg.device
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=dev))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=dev))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=dev))

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        xc = self.sae_in(x)
        pi_gate = xc @ self.W_enc + self.b_gate
        active = (pi_gate > 0).to(x.dtype)
        mag = (xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        f = active * mag
        sae_out = f @ self.W_dec + self.b_dec
        mse = mse_loss(sae_out, y)
        pi_gate_act = pi_gate.relu()
        l1 = coefficients["l1"] * torch.sum(pi_gate_act * self.W_dec.norm(dim=1), dim=-1).mean()
        aux = mse_loss(pi_gate_act @ self.W_dec + self.b_dec, y)
        fired = f.detach() != 0
        return StepOutput(
            loss=mse + l1 + aux,
            losses={"mse_loss": mse, "l1_loss": l1, "auxiliary_reconstruction_loss": aux},
            sae_out=sae_out,
            fire_counts=fired.sum(0).float(),
            l0=fired.sum(-1).float().mean(),
        )
