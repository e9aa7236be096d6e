"""TopK and BatchTopK training (plus AuxK), never building ``[N, d_sae]``.

Forward, as SAELens's ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` (``rescale_acts_by_decoder_norm``
as there, default True)::

    n          = ||W_dec[f]||                                  [d_sae]   (1 if not rescaling)
    hidden_pre = ((x - b_dec*apply) @ W_enc + b_enc) * n      (never materialised)
    topk:      f = relu(topk_k(hidden_pre))                    per row, k kept
    batchtopk: f = topk_{k*N}(relu(hidden_pre).flatten())      over the whole batch
    sae_out    = (f / n) @ W_dec + b_dec (+ x @ W_skip.T)
    loss       = ||sae_out - y||^2 summed over dims, mean over rows  +  AuxK

``hidden_pre * n`` is encoded as ``x @ (W_enc * n) + b_enc * n`` through ``sparsekern.ops.topk_encode``
(``relu=True``: ReLU after selection, as SAELens); the decode is ``sparse_decode``. Both are
differentiable, and the gradient reaches ``W_dec`` through ``n`` as in SAELens.

**BatchTopK is exact.** Each row's top ``k_row`` candidates (``k_row = 4*ceil(k)`` at first) are
encoded and the batch's top ``int(k*N)`` are chosen among them. An entry outside its row's candidates
is ``<=`` that row's smallest candidate ``m_r``, so the choice is exact unless some row has
``m_r > 0`` and ``m_r`` strictly above the smallest chosen value; then ``k_row`` doubles and the encode
is redone (up to ``d_sae``). Memory: ``[N, k_row]`` values + indices. ``cfg.extra["batchtopk_max_k_row"]``
caps ``k_row`` (then the result can be approximate: rows that would need more than the cap lose their
smallest kept entries; a warning says so once).

**AuxK** (SAELens's ``calculate_topk_aux_loss``): ``k_aux = d_in // 2``, ``scale = min(n_dead/k_aux, 1)``,
the top ``min(k_aux, n_dead)`` of ``hidden_pre`` among dead latents (no ReLU) reconstruct the detached
residual ``y - sae_out`` without bias. It is a ``topk_encode`` restricted to the dead columns
(``W_enc[:, dead] * n[dead]``): extra memory ``[d_in, n_dead]`` for the gathered columns plus the
``[N, k_aux]`` code, never ``[N, d_sae]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .base import StepOutput, TrainingModule, fire_counts_sparse, mse_loss


class TopKTrainingModule(TrainingModule):
    """TopK SAE / transcoder training module (``cfg.architecture == "topk"``)."""

    architecture = "topk"

    # ---- shared pieces -------------------------------------------------------------------------
    def decoder_norm(self) -> Optional[Tensor]:
        """``||W_dec[f]||`` ``[d_sae]`` (differentiable) if rescaling by decoder norm, else None."""
        return self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def effective_encoder(self, n: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(W_enc * n, b_enc * n)`` — the encoder of ``hidden_pre`` — or ``(W_enc, b_enc)``."""
        if n is None:
            return self.W_enc, self.b_enc
        return self.W_enc * n, self.b_enc * n

    def decode(self, values: Tensor, indices: Tensor, n: Optional[Tensor], x: Tensor) -> Tensor:
        """``(f / n) @ W_dec + b_dec (+ skip)`` from the sparse code ``[N, k]`` -> ``[N, d_out]``."""
        if n is not None:
            values = values * (1 / n)[indices]  # SAELens multiplies by the reciprocal
        return self.add_skip(ops.sparse_decode(values, indices, self.W_dec, self.b_dec), x)

    def select(self, x: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The architecture's code ``(values, indices)`` ``[N, k]``; TopK: ``relu(topk_k(pre))``."""
        acts = ops.topk_encode(x, W, b, self.cfg.k, b_dec=self.b_dec_in(), relu=True)
        return acts.values, acts.indices

    def aux_loss(
        self,
        x: Tensor,
        W: Tensor,
        b: Tensor,
        n: Optional[Tensor],
        residual: Tensor,
        dead_mask: Optional[Tensor],
    ) -> Tensor:
        """SAELens's TopK auxiliary loss (see the module docstring); ``residual [N, d_out]`` detached."""
        if dead_mask is None or (num_dead := int(dead_mask.sum())) == 0:
            return residual.new_zeros(())
        k_aux = x.shape[-1] // 2
        if k_aux == 0:
            return residual.new_zeros(())
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        dead = dead_mask.nonzero().squeeze(1)
        acts = ops.topk_encode(x, W[:, dead], b[dead], k_aux, b_dec=self.b_dec_in(), relu=False)
        idx = dead[acts.indices]
        vals = acts.values if n is None else acts.values * (1 / n)[idx]
        recons = ops.sparse_decode(vals, idx, self.W_dec)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        n = self.decoder_norm()
        W, b = self.effective_encoder(n)
        values, indices = self.select(x, W, b)
        sae_out = self.decode(values, indices, n, x)
        mse = mse_loss(sae_out, y)
        aux = self.aux_loss(x, W, b, n, (y - sae_out).detach(), dead_mask)
        counts = fire_counts_sparse(values, indices, self.cfg.d_sae)
        out = StepOutput(
            loss=mse + aux,
            losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
            sae_out=sae_out,
            fire_counts=counts,
            l0=counts.sum() / x.shape[0],
        )
        self.after_forward(values, out)
        return out

    def after_forward(self, values: Tensor, out: StepOutput) -> None:
        pass


def batch_topk_select(
    values_fn, k: float, n_rows: int, d_sae: int, max_k_row: Optional[int] = None
) -> tuple[Tensor, Tensor, bool]:
    """Exact batch top-``int(k * N)`` of ``relu(hidden_pre)`` from per-row candidates.

    ``values_fn(k_row) -> (values [N, k_row] sorted descending, relu'd; indices [N, k_row])``.
    Returns ``(values [N, k_row] with the unchosen zeroed, indices, exact)``.
    """
    K = int(k * n_rows)
    k_row = min(d_sae, max(1, 4 * math.ceil(k)))
    if max_k_row is not None:
        k_row = min(k_row, max_k_row)
    while True:
        values, indices = values_fn(k_row)
        flat = values.detach().flatten()
        top = flat.topk(min(K, flat.numel()), sorted=False)
        if k_row >= d_sae:
            exact = True
        elif K > flat.numel():
            exact = False
        elif K == 0:
            exact = True
        else:  # an unseen entry e <= row_min could beat the smallest chosen value only if row_min > it
            exact = not bool((values.detach()[:, -1] > top.values.min()).any())
        if exact or (max_k_row is not None and k_row >= max_k_row):
            break
        k_row = min(d_sae, 2 * k_row, max_k_row if max_k_row is not None else d_sae)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[top.indices] = True
    return values * mask.view_as(values), indices, exact


class BatchTopKTrainingModule(TopKTrainingModule):
    """BatchTopK (``cfg.architecture == "batchtopk"``): ``k`` latents per row on average over the batch.

    Keeps SAELens's ``topk_threshold`` buffer (float64 EMA, rate ``topk_threshold_lr``, of the smallest
    positive kept activation); exported as a JumpReLU with that threshold, as SAELens 6.54 does.
    """

    architecture = "batchtopk"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=cfg.device))
        self._warned = False

    def select(self, x, W, b):
        def values_fn(k_row: int):
            acts = ops.topk_encode(x, W, b, k_row, b_dec=self.b_dec_in(), relu=True)
            return acts.values, acts.indices

        values, indices, exact = batch_topk_select(
            values_fn, self.cfg.k, x.shape[0], self.cfg.d_sae, self.cfg.extra.get("batchtopk_max_k_row")
        )
        if not exact and not self._warned:
            self._warned = True
            warnings.warn(
                "BatchTopK: batchtopk_max_k_row capped the per-row candidates; the batch top-k "
                "is approximate on some rows",
                stacklevel=3,
            )
        return values, indices

    @torch.no_grad()
    def after_forward(self, values: Tensor, out: StepOutput) -> None:
        if not self.training:  # evaluation leaves the threshold alone
            return
        pos = values.detach()
        pos = pos[pos > 0]
        if pos.numel():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * pos.min().to(torch.float64)
        out.metrics["topk_threshold"] = float(self.topk_threshold)
