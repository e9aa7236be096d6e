"""sparsekern: sparse SAE / transcoder kernels for mechanistic interpretability.

``import sparsekern`` never fails because a backend is missing: without the compiled extension
every op runs the pure-PyTorch reference (a warning says so once).
"""

from . import ops
from . import backends
from .backends import forced_backend, use_backend
from .sparse_acts import SparseActs
__version__ = "0.1.0"

__all__ = ["SparseActs", "backends", "forced_backend", "ops", "use_backend", "__version__",
    "SAE", "SAEConfig", "SAEMetadata", "StandardSAE", "StandardSAEConfig", "GatedSAE", "GatedSAEConfig",
    "JumpReLUSAE", "JumpReLUSAEConfig", "TopKSAE", "TopKSAEConfig", "Transcoder", "TranscoderConfig",
    "SkipTranscoder", "SkipTranscoderConfig", "JumpReLUTranscoder", "JumpReLUTranscoderConfig",
    "JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig", "TopKTranscoder", "TopKTranscoderConfig",
    "TopKSkipTranscoder", "TopKSkipTranscoderConfig", "HookedSAETransformer",
]

_LAZY = {
    **{n: "saes" for n in __all__ if n.startswith("SAE") or n.endswith(("SAE", "Config", "Transcoder"))},
    "HookedSAETransformer": "hooked_sae_transformer",  # (after the line above, which also matches it)
}


def __getattr__(name: str):
    # the SAE classes pull in transformer_lens (~7 s): import them on first use, not at `import sparsekern`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")


def _load_shard(path, device="cpu", dtype=None, *, group=None, fold_W_dec_norm=False):
    """``SAE.load_from_disk(path, shard=True)``'s loader (the extension point is
    :func:`sparsekern.registry.register_shard_loader`): the SAE family sits below ``distributed`` and never
    imports it, so the root wires it in, importing ``sparsekern.distributed`` only when first called."""
    from .distributed import ShardedSAE

    return ShardedSAE.load_from_disk(path, device, dtype, group=group, fold_W_dec_norm=fold_W_dec_norm)


def _class_label(architecture: str) -> str:
    from .saes.io import class_label

    return class_label(architecture)


def _config_fields(architecture: str) -> set[str]:
    from .saes.io import config_fields

    return config_fields(architecture)


from . import registry as _registry  # noqa: E402  (a leaf: imports no SAE class)
from .loading import sae_lens_format as _sae_lens_format  # noqa: E402  (readers: no SAE class either)

_registry.register_shard_loader(_load_shard, replace=True)  # the default; a plug-in may replace it
# the readers' class names and pre-6.0 config fields come from the registry (saes imported on first use)
_sae_lens_format.set_class_info(_class_label, _config_fields)


# import the native extension now so a missing build is reported once, at import
from .backends import native as _native  # noqa: E402

_native()
