"""SAELens-compatible transcoders: encode at one hook point, decode to another (``d_out``).

``Transcoder`` (ReLU), ``SkipTranscoder`` (+ ``x @ W_skip.T``), ``JumpReLUTranscoder``,
``JumpReLUSkipTranscoder`` match SAELens's classes; ``TopKTranscoder`` / ``TopKSkipTranscoder`` are
sparsekern additions (EleutherAI sparsify and circuit-tracer top-k transcoders; SAELens cannot load
them). As SAELens: no ``b_dec`` is subtracted from the input, ``forward`` adds no error term and does not
call ``hook_sae_output``, and decode skips the run-time de-normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jaxtyping import Float
from torch import Tensor

from .config import SAEConfig
from .jumprelu import JumpReLUMixin
from .normalize import NormState
from .sae import SAE
from .topk import TopKMixin


@dataclass
class TranscoderConfig(SAEConfig):
    """``SAEConfig`` + ``d_out``; ``metadata.hook_name_out`` names the output hook.

    ``apply_b_dec_to_input`` must be False (as SAELens); unlike SAELens it defaults to False, so
    ``TranscoderConfig(d_in=..., d_sae=..., d_out=...)`` works without spelling it out.
    """

    apply_b_dec_to_input: bool = False
    d_out: int = 768

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input is not supported for transcoders")
        super().__post_init__()
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out <= 0:
            raise ValueError(f"{type(self).__name__}.d_out must be a positive int, got {self.d_out!r}")


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"


@dataclass
class JumpReLUTranscoderConfig(TranscoderConfig):
    """``apply_relu`` (sparsekern addition): False = circuit-tracer's ``pre * (pre > threshold)``."""

    apply_relu: bool = True

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder"


@dataclass
class JumpReLUSkipTranscoderConfig(JumpReLUTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder"


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """sparsekern addition: top-``k`` transcoder (``apply_relu=False`` = circuit-tracer's top-k)."""

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False
    apply_relu: bool = True

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"TopK k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")


@dataclass
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class Transcoder(SAE):
    """ReLU transcoder ``relu(x @ W_enc + b_enc) @ W_dec + b_dec``; W_dec [d_sae, d_out], b_dec [d_out]."""

    cfg: TranscoderConfig
    _is_transcoder = True
    _decode_undoes_norm = False

    @property
    def _d_out(self) -> int:
        return self.cfg.d_out

    @property
    def d_out(self) -> int:
        """Output dimension."""
        return self.cfg.d_out

    def _finish_decode(self, recon: Tensor, norm: NormState, hooks: bool) -> tuple[Tensor, bool]:
        # SAELens: hook_sae_recons only (no de-normalisation, no hook_z reshape: d_out differs)
        return self._hook("hook_sae_recons", recon, hooks)

    def _skip(self, x: Tensor) -> Optional[Tensor]:
        return None

    def forward_with_activations(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_out"], Float[Tensor, "*batch d_sae"]]:
        """``(output [..., d_out], dense feature activations [..., d_sae])``."""
        c = self._encode(x)
        self._norm_state = c.norm  # kept, as SAELens's encode keeps them (its decode does not undo them)
        out = self._finish_decode(self._decode_raw(c.acts), c.norm, True)[0]
        skip = self._skip(x)
        dense = (
            c.dense
            if c.dense is not None
            else (c.acts if isinstance(c.acts, Tensor) else c.acts.to_dense(self.cfg.d_sae))
        )
        return (out if skip is None else out + skip), dense

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Output ``[..., d_out]`` (no error term / ``hook_sae_output``, as SAELens transcoders)."""
        c = self._encode(x)
        self._norm_state = c.norm  # kept, as SAELens's encode keeps them (its decode does not undo them)
        out = self._finish_decode(self._decode_raw(c.acts), c.norm, True)[0]
        skip = self._skip(x)
        return out if skip is None else out + skip


class SkipTranscoder(Transcoder):
    """Transcoder + linear skip: ``... + x @ W_skip.T`` with ``W_skip [d_out, d_in]``."""

    cfg: SkipTranscoderConfig

    def _param_shapes(self):
        return {**super()._param_shapes(), "W_skip": (self.cfg.d_out, self.cfg.d_in)}

    def _skip(self, x: Tensor) -> Tensor:
        return x.to(self.dtype) @ self.W_skip.T


class JumpReLUTranscoder(JumpReLUMixin, Transcoder):
    """JumpReLU transcoder (Gemma Scope / circuit-tracer)."""

    cfg: JumpReLUTranscoderConfig

    def _not_sae_lens_loadable(self) -> Optional[str]:
        if not self.cfg.apply_relu and bool((self.threshold < 0).any()):
            return "apply_relu=False with negative thresholds; SAELens would apply a ReLU and differ"
        return None


class JumpReLUSkipTranscoder(JumpReLUTranscoder, SkipTranscoder):
    cfg: JumpReLUSkipTranscoderConfig


class TopKTranscoder(TopKMixin, Transcoder):
    """Top-k transcoder (sparsekern addition; sparsify / circuit-tracer)."""

    cfg: TopKTranscoderConfig

    def _not_sae_lens_loadable(self) -> Optional[str]:
        return f"architecture {self.cfg.architecture()!r} is a sparsekern addition that SAELens cannot load"


class TopKSkipTranscoder(TopKTranscoder, SkipTranscoder):
    cfg: TopKSkipTranscoderConfig
