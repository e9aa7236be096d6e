"""Standard (ReLU) SAE: ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec``.

The base :class:`~sparsekern.saes.sae.SAE` already computes this; the class adds only its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SAEConfig
from .sae import SAE


@dataclass
class StandardSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "standard"


class StandardSAE(SAE):
    """ReLU SAE: ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec``."""

    cfg: StandardSAEConfig
