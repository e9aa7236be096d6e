"""The SAE family: SAELens-compatible SAEs and transcoders whose encode/decode run on the sparse ops.

``sae.py`` holds the base (``SAEMetadata``, ``SAEConfig``, ``SAE``, build/load/save classmethods); one file
per architecture adds its config and class (``standard``, ``gated``, ``jumprelu``, ``topk``,
``transcoder``). Importing this package registers every architecture in :mod:`sparsekern.registry`.
"""

from ..constants import (
    NORMALIZE_MODES,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    dtype_to_str,
    str_to_dtype,
)
from ..registry import get_sae_class, register_sae_class
from ..sparse_acts import dense_to_sparse
from .gated import GatedSAE, GatedSAEConfig
from .jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from .sae import SAE, SAEConfig, SAEMetadata
from .standard import StandardSAE, StandardSAEConfig
from .topk import TopKSAE, TopKSAEConfig
from .transcoder import (
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

register_sae_class("standard", StandardSAE, StandardSAEConfig)
register_sae_class("gated", GatedSAE, GatedSAEConfig)
register_sae_class("jumprelu", JumpReLUSAE, JumpReLUSAEConfig)
register_sae_class("topk", TopKSAE, TopKSAEConfig)
register_sae_class("transcoder", Transcoder, TranscoderConfig)
register_sae_class("skip_transcoder", SkipTranscoder, SkipTranscoderConfig)
register_sae_class("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig)
register_sae_class("jumprelu_skip_transcoder", JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)
register_sae_class("topk_transcoder", TopKTranscoder, TopKTranscoderConfig)
register_sae_class("topk_skip_transcoder", TopKSkipTranscoder, TopKSkipTranscoderConfig)

__all__ = [
    "NORMALIZE_MODES",
    "SAE",
    "SAEConfig",
    "SAEMetadata",
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "SPARSITY_FILENAME",
    "GatedSAE",
    "GatedSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "JumpReLUSkipTranscoder",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTranscoder",
    "JumpReLUTranscoderConfig",
    "SkipTranscoder",
    "SkipTranscoderConfig",
    "StandardSAE",
    "StandardSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKSkipTranscoder",
    "TopKSkipTranscoderConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "Transcoder",
    "TranscoderConfig",
    "dense_to_sparse",
    "dtype_to_str",
    "get_sae_class",
    "register_sae_class",
    "str_to_dtype",
]
