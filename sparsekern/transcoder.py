"""Shim: the transcoders moved to :mod:`sparsekern.saes.transcoder`; this re-exports them."""

from .saes.transcoder import (  # noqa: F401
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    TopKSkipTranscoder,
    TopKSkipTranscoderConfig,
    TopKTranscoder,
    TopKTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from .saes.transcoder import SAE, SAEConfig, _JumpReLU, _TopK  # noqa: F401
from .registry import register_sae_class  # noqa: F401
