"""Shim: the transcoders moved to :mod:`sparsekern.saes.transcoder`; this re-exports them."""

from .registry import register_sae_class  # noqa: F401
from .saes.config import SAEConfig  # noqa: F401
from .saes.jumprelu import JumpReLUMixin as _JumpReLU  # noqa: F401
from .saes.sae import SAE  # noqa: F401
from .saes.topk import TopKMixin as _TopK  # noqa: F401
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
