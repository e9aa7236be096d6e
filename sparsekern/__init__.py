"""sparsekern: sparse SAE / transcoder kernels for mechanistic interpretability.

``import sparsekern`` never fails because a backend is missing: without the compiled extension
every op runs the pure-PyTorch reference (a warning says so once).
"""

from . import ops
from ._backend import backends, forced_backend, use_backend
from .sparse_acts import SparseActs
from .sae import (
    SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, SAEConfig, SAEMetadata, StandardSAE,
    StandardSAEConfig, TopKSAE, TopKSAEConfig,
)
from .transcoder import (
    JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder, JumpReLUTranscoderConfig,
    SkipTranscoder, SkipTranscoderConfig, TopKSkipTranscoder, TopKSkipTranscoderConfig, TopKTranscoder,
    TopKTranscoderConfig, Transcoder, TranscoderConfig,
)

__version__ = "0.1.0"

__all__ = ["SparseActs", "backends", "forced_backend", "ops", "use_backend", "__version__",
    "SAE", "SAEConfig", "SAEMetadata", "StandardSAE", "StandardSAEConfig", "GatedSAE", "GatedSAEConfig",
    "JumpReLUSAE", "JumpReLUSAEConfig", "TopKSAE", "TopKSAEConfig", "Transcoder", "TranscoderConfig",
    "SkipTranscoder", "SkipTranscoderConfig", "JumpReLUTranscoder", "JumpReLUTranscoderConfig",
    "JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig", "TopKTranscoder", "TopKTranscoderConfig",
    "TopKSkipTranscoder", "TopKSkipTranscoderConfig",
]

# import the native extension now so a missing build is reported once, at import
from ._backend import native as _native  # noqa: E402

_native()
