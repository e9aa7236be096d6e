"""The public base of the training modules: parameters, SAELens's initialisation, transcoder/skip plumbing.

A new architecture (or a variant, such as ``sparsekern.distributed``'s feature-sharded modules)
subclasses :class:`TrainingModule`, implements ``forward_train`` and returns a :class:`StepOutput`;
:func:`mse_loss` and :func:`fire_counts_sparse` are the shared pieces of a loss and of the firing
counts. (``sparsekern.training._base`` is a deprecated alias of this module.)

Parameter names and shapes are SAELens's training SAEs':

* ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]`` (not gated), ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``;
* ``W_skip [d_out, d_in]`` for skip transcoders (zero init, as SAELens's ``SkipTranscoder``);
* architecture extras (``threshold``; ``b_gate``, ``b_mag``, ``r_mag``) in the subclasses.

``d_out = d_in`` for an SAE. ``forward_train(x, y, dead_mask, coefficients) -> StepOutput`` is what a
subclass implements: ``x [N, d_in]`` the (already normalised) input, ``y [N, d_out]`` the target
(``x`` for an SAE), ``dead_mask [n_latents] bool`` (None in evaluation), ``coefficients`` the warmed-up
``{"l1": float, "l0": float}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .config import TrainingConfig


@dataclass
class StepOutput:
    """One training forward pass.

    loss: scalar total loss; losses: its named parts (``mse_loss``, ``l1_loss``, ``l0_loss``,
    ``auxiliary_reconstruction_loss``); sae_out ``[N, d_out]``; fire_counts ``[d_sae]`` number of rows
    on which each latent is non-zero; l0: scalar mean number of non-zero latents per row.
    """

    loss: Tensor
    losses: dict[str, Tensor]
    sae_out: Tensor
    fire_counts: Tensor
    l0: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def mse_loss(sae_out: Tensor, y: Tensor) -> Tensor:
    """SAELens's ``mse_loss``: per-row squared error summed over dims, averaged over rows."""
    return (sae_out - y).pow(2).sum(dim=-1).mean()


def fire_counts_sparse(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """``[d_sae]`` count of rows where each latent is non-zero, from a sparse ``[N, k]`` code."""
    live = values.detach() != 0
    return torch.bincount(indices[live], minlength=d_sae).to(torch.float32)


class TrainingModule(nn.Module):
    """Common parameters and helpers; see the module docstring.

    ``SAETrainer`` sizes its dead-feature counters by :attr:`n_latents` and reads ``cfg`` for the
    architecture's settings; everything else goes through ``forward_train``.
    """

    architecture: str = ""
    has_b_enc: bool = True

    def __init__(self, cfg: TrainingConfig):
        super().__init__()
        self.cfg = cfg
        dt, dev = cfg.torch_dtype, torch.device(cfg.device)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dt, device=dev))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dt, device=dev))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, dtype=dt, device=dev))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dt, device=dev))
        if cfg.skip_transcoder:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dt, device=dev))

    @property
    def n_latents(self) -> int:
        """Latents this module holds: ``cfg.d_sae`` (a feature shard: its own slice)."""
        return int(self.W_dec.shape[0])

    # ---- init ----------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self, seed: int) -> None:
        """SAELens's init, seeded: ``W_dec`` kaiming-uniform ``[d_sae, d_out]``, rows rescaled to
        ``decoder_init_norm``; ``W_enc = W_dec.T`` for an SAE (for a transcoder, whose shapes differ,
        an independent kaiming-uniform ``[d_in, d_sae]`` as SAELens's ``Transcoder``, its columns
        rescaled to ``decoder_init_norm`` too). Biases zero. Drawn on CPU so every device gets the same
        weights for a seed."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.empty(cfg.d_sae, cfg.d_out, dtype=self.W_dec.dtype)
        nn.init.kaiming_uniform_(w_dec, generator=g)
        if cfg.decoder_init_norm is not None:
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        if cfg.transcoder:
            w_enc = torch.empty(cfg.d_in, cfg.d_sae, dtype=self.W_enc.dtype)
            nn.init.kaiming_uniform_(w_enc, generator=g)
            if cfg.decoder_init_norm is not None:
                w_enc = w_enc / w_enc.norm(dim=0, keepdim=True) * cfg.decoder_init_norm
        else:
            w_enc = w_dec.T.clone()
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_enc.contiguous())

    # ---- helpers -------------------------------------------------------------------------------
    def b_dec_in(self) -> Optional[Tensor]:
        """``b_dec`` when it is subtracted from the input (``apply_b_dec_to_input``), else None."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def sae_in(self, x: Tensor) -> Tensor:
        """``x - b_dec * apply_b_dec_to_input`` (SAELens's ``process_sae_in``), ``[N, d_in]``."""
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def skip(self, x: Tensor) -> Optional[Tensor]:
        """``x @ W_skip.T`` ``[N, d_out]`` for skip transcoders, else None."""
        return x @ self.W_skip.T if self.cfg.skip_transcoder else None

    def add_skip(self, out: Tensor, x: Tensor) -> Tensor:
        """``out [N, d_out]`` plus the skip connection of ``x [N, d_in]`` (skip transcoders)."""
        s = self.skip(x)
        return out if s is None else out + s

    def forward_train(
        self, x: Tensor, y: Tensor, dead_mask: Optional[Tensor], coefficients: dict[str, float]
    ) -> StepOutput:
        """One training forward pass (see the module docstring); subclasses implement it."""
        raise NotImplementedError
