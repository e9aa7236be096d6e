"""The SAE family: SAELens-compatible SAEs and transcoders whose encode/decode run on the sparse ops.

Rooms: ``config`` (``SAEMetadata``, ``SAEConfig``), ``pipeline`` (parameters, hook points, encode /
decode), ``normalize`` (run-time activation normalisation), ``sae`` (the ``SAE`` base: pipeline + weight
surgery + SAELens-named classmethods), ``io`` (the one build from a config and a state dict, loading,
saving), ``atomic`` (the folder swap behind ``save_model``). One file per architecture adds its config and
class (``standard``, ``gated``, ``jumprelu``, ``topk``, ``transcoder``). Importing this package registers
every architecture in :mod:`sparsekern.registry`.

Public seams for the packages above: :class:`TopKMixin` / :class:`JumpReLUMixin` (the activations, to mix
into a derived SAE class), :func:`has_hooks` (whether a hook point is observed), :func:`build_sae`
(``factory`` builds a derived module), :func:`register_shard_loader` (``load_from_disk(shard=True)``).
"""

from ..constants import (
    NORMALIZE_MODES,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    dtype_to_str,
    str_to_dtype,
)
from ..registry import get_sae_class, register_sae_class, register_shard_loader
from ..sparse_acts import dense_to_sparse
from .config import SAEConfig, SAEMetadata
from .gated import GatedSAE, GatedSAEConfig
from .io import build_sae, config_from_dict, handle_config_defaulting
from .jumprelu import JumpReLUMixin, JumpReLUSAE, JumpReLUSAEConfig
from .pipeline import has_hooks
from .sae import SAE
from .standard import StandardSAE, StandardSAEConfig
from .topk import TopKMixin, TopKSAE, TopKSAEConfig
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
    "JumpReLUMixin",
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
    "TopKMixin",
    "TopKSAE",
    "TopKSAEConfig",
    "TopKSkipTranscoder",
    "TopKSkipTranscoderConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "Transcoder",
    "TranscoderConfig",
    "build_sae",
    "config_from_dict",
    "dense_to_sparse",
    "dtype_to_str",
    "get_sae_class",
    "handle_config_defaulting",
    "has_hooks",
    "register_sae_class",
    "register_shard_loader",
    "str_to_dtype",
]
