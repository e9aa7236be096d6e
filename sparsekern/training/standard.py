"""Standard (ReLU + L1) training, as SAELens 6.54's ``StandardTrainingSAE``. Dense: builds ``[N, d_sae]``.

::

    hidden_pre = (x - b_dec*apply) @ W_enc + b_enc          [N, d_sae]
    f          = relu(hidden_pre)                            [N, d_sae]
    sae_out    = f @ W_dec + b_dec (+ x @ W_skip.T)          [N, d_out]
    loss       = ||sae_out - y||^2 (sum dims, mean rows)
                 + mean_rows(l1_coefficient * ||f * ||W_dec[f]|| ||_p)     (p = lp_norm, 1 by default)

Dense on purpose: early in training a ReLU SAE fires on about half its latents, so a sparse code
would be larger than the dense one. ``l1_coefficient`` warms up linearly over ``l1_warm_up_steps``.
"""

from __future__ import annotations

from .base import StepOutput, TrainingModule, mse_loss


class StandardTrainingModule(TrainingModule):
    """ReLU SAE / transcoder training module (``cfg.architecture == "standard"``)."""

    architecture = "standard"

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        f = (self.sae_in(x) @ self.W_enc + self.b_enc).relu()
        sae_out = self.add_skip(f @ self.W_dec + self.b_dec, x)
        mse = mse_loss(sae_out, y)
        sparsity = (f * self.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)
        l1 = (coefficients["l1"] * sparsity).mean()
        fired = f.detach() != 0
        counts = fired.sum(0).float()
        return StepOutput(
            loss=mse + l1,
            losses={"mse_loss": mse, "l1_loss": l1},
            sae_out=sae_out,
            fire_counts=counts,
            l0=fired.sum(-1).float().mean(),
        )
