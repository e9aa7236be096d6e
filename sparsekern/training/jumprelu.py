"""JumpReLU training (Gemma Scope / SAELens 6.54 ``JumpReLUTrainingSAE``, ``"step"`` L0 loss).

Parameters: SAELens's ``threshold [d_sae]`` (float32, clamped to ``>= 0`` before each forward; SAELens
6.54 trains the threshold directly, not ``log_threshold``), ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``.

Forward::

    hidden_pre = (x - b_dec*apply) @ W_enc + b_enc                      (never materialised)
    f          = hidden_pre * (hidden_pre > threshold)                  sparsekern.ops.threshold_encode
    sae_out    = f @ W_dec + b_dec (+ x @ W_skip.T)                     sparsekern.ops.sparse_decode
    loss       = ||sae_out - y||^2 (sum over dims, mean over rows) + l0_coefficient * mean_rows(L0)

Gradients, exactly SAELens's (``jumprelu_ste_to_input=False``): ``x``/``W_enc``/``b_enc``/``b_dec`` get
the gradient of the kept entries (``threshold_encode``'s own backward); the threshold gets the
straight-through estimates, with ``rect(u) = 1{-1/2 < u < 1/2}`` and bandwidth ``eps``::

    d/dt  from the JumpReLU:  -sum_n (t/eps) rect((h - t)/eps) * dL/df[n, f],  dL/df = dL/dsae_out @ W_dec.T
    d/dt  from the L0 step:   -sum_n (1/eps) rect((h - t)/eps) * dL/dL0[n]

Both need ``h`` in the band ``|h - t| < eps/2``, inactive entries included. :class:`ThresholdSTE` recomputes
``h`` in column blocks of ``[N, block]`` (``block * N <= 2**22`` elements) in its backward: the forward
adds an exact zero ``[N, d_out]`` to ``sae_out`` (so the backward receives ``dL/dsae_out``) and returns
the per-row L0 (so it receives ``dL/dL0``). Extra memory: one ``[N, block]`` buffer, never ``[N, d_sae]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .base import StepOutput, TrainingModule, fire_counts_sparse, mse_loss

_BLOCK_ELEMS = 1 << 22


def rectangle(u: Tensor) -> Tensor:
    """SAELens's ``rectangle``: ``1{-0.5 < u < 0.5}`` in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u)


class ThresholdSTE(torch.autograd.Function):
    """``(threshold, sae_in, W_enc, b_enc, W_dec, l0_rows, bandwidth) -> (zeros [N, d_out], l0_rows [N])``.

    The straight-through threshold gradients of the module docstring, as an autograd function: add the
    exact zero ``[N, d_out]`` to ``sae_out`` and use the returned ``l0_rows [N]`` in the L0 loss.
    ``threshold [d_sae]`` (float32), ``sae_in [N, d_in]`` (``x - b_dec*apply``), ``W_enc [d_in, d_sae]``,
    ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``l0_rows [N]``, ``bandwidth`` a float. Only
    ``threshold`` gets a gradient (the two STE terms above); pass the other tensors detached. A feature
    shard (``sparsekern.distributed``) applies it to its own columns, with the replicated gradients.
    """

    @staticmethod
    def forward(ctx, threshold, sae_in, W_enc, b_enc, W_dec, l0_rows, bandwidth):
        ctx.save_for_backward(threshold, sae_in, W_enc, b_enc, W_dec)
        ctx.bandwidth = bandwidth
        return sae_in.new_zeros(sae_in.shape[0], W_dec.shape[1]), l0_rows.clone()

    @staticmethod
    def backward(ctx, g_out: Optional[Tensor], g_l0: Optional[Tensor]):
        threshold, sae_in, W_enc, b_enc, W_dec = ctx.saved_tensors
        bw = ctx.bandwidth
        n, d_sae = sae_in.shape[0], W_enc.shape[1]
        t_all = threshold.to(sae_in.dtype)
        grad = torch.zeros_like(t_all)
        block = max(1, min(d_sae, _BLOCK_ELEMS // max(n, 1)))
        for s in range(0, d_sae, block):
            e = min(d_sae, s + block)
            t = t_all[s:e]
            h = sae_in @ W_enc[:, s:e] + b_enc[s:e]  # [N, block]
            r = rectangle((h - t) / bw)
            if g_out is not None:
                grad[s:e] -= (t / bw) * (r * (g_out @ W_dec[s:e].T)).sum(0)
            if g_l0 is not None:
                grad[s:e] -= (1.0 / bw) * (r * g_l0[:, None]).sum(0)
        return grad.to(threshold.dtype), None, None, None, None, None, None


class JumpReLUTrainingModule(TrainingModule):
    """JumpReLU SAE / transcoder training module (``cfg.architecture == "jumprelu"``)."""

    architecture = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=torch.float32, device=cfg.device)
        )

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        t = self.threshold.detach().to(x.dtype)
        acts = ops.threshold_encode(x, self.W_enc, self.b_enc, t, b_dec=self.b_dec_in())
        l0_rows = (acts.values.detach() != 0).sum(-1).to(x.dtype)
        zero, l0_ste = ThresholdSTE.apply(
            self.threshold,
            self.sae_in(x).detach(),
            self.W_enc.detach(),
            self.b_enc.detach(),
            self.W_dec.detach(),
            l0_rows,
            self.cfg.jumprelu_bandwidth,
        )
        sae_out = self.add_skip(
            ops.sparse_decode(acts.values, acts.indices, self.W_dec, self.b_dec) + zero, x
        )
        mse = mse_loss(sae_out, y)
        l0_loss = (coefficients["l0"] * l0_ste).mean()
        counts = fire_counts_sparse(acts.values, acts.indices, self.cfg.d_sae)
        return StepOutput(
            loss=mse + l0_loss,
            losses={"mse_loss": mse, "l0_loss": l0_loss},
            sae_out=sae_out,
            fire_counts=counts,
            l0=l0_rows.mean(),
        )


_ThresholdSTE = ThresholdSTE  # deprecated private name, kept for old imports
