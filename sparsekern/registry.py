"""Architecture registry: cfg.json ``architecture`` name -> (SAE class, config class); and the shard loader.

A leaf module: the SAE types are imported only for type checking. ``sparsekern.saes`` registers its
classes when imported; ``get_sae_class`` imports it on a miss, so a lookup never depends on what the
caller happened to import first. Registering a different class under a taken name is an error.

The shard loader is the extension point behind ``SAE.load_from_disk(path, shard=True)``: the SAE family
sits below ``sparsekern.distributed`` and never imports it; the package root registers a loader that
imports ``sparsekern.distributed`` when first called (:func:`register_shard_loader`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .saes.config import SAEConfig
    from .saes.sae import SAE

_REGISTRY: dict[str, tuple[type["SAE"], type["SAEConfig"]]] = {}


def register_sae_class(architecture: str, sae_cls: type["SAE"], cfg_cls: type["SAEConfig"]) -> None:
    """Register an architecture name (the ``architecture`` key of cfg.json) -> (SAE class, config class).

    Registering the same pair again is a no-op; a different pair under a taken name raises ValueError.
    """
    old = _REGISTRY.get(architecture)
    if old is not None and old != (sae_cls, cfg_cls):
        raise ValueError(
            f"SAE architecture {architecture!r} is already registered to ({old[0].__qualname__}, "
            f"{old[1].__qualname__}); refusing to replace it with ({sae_cls.__qualname__}, "
            f"{cfg_cls.__qualname__}). Register the new class under another name."
        )
    _REGISTRY[architecture] = (sae_cls, cfg_cls)


def get_sae_class(architecture: str) -> tuple[type["SAE"], type["SAEConfig"]]:
    """(SAE class, config class) for an architecture name; ValueError listing the known ones."""
    if architecture not in _REGISTRY:
        importlib.import_module("sparsekern.saes")  # registers the built-in architectures
    if architecture not in _REGISTRY:
        hint = (
            " (BatchTopK / Matryoshka checkpoints are saved for inference as 'jumprelu')"
            if "batchtopk" in str(architecture)
            else ""
        )
        raise ValueError(
            f"unknown SAE architecture {architecture!r}{hint}; known architectures: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[architecture]


# (path, device, dtype, *, group, fold_W_dec_norm) -> this rank's shard of the SAE saved at path
ShardLoader = Callable[..., "SAE"]
_SHARD_LOADER: list[ShardLoader] = []


def register_shard_loader(loader: ShardLoader, *, replace: bool = False) -> None:
    """Set the function behind ``SAE.load_from_disk(path, shard=True)``.

    ``loader(path, device: str, dtype: str | None, *, group, fold_W_dec_norm: bool) -> SAE`` returns this
    rank's shard of the SAELens folder ``path`` over the process group ``group`` (None: WORLD). The
    package root registers :meth:`sparsekern.distributed.ShardedSAE.load_from_disk` (imported on first
    use). Registering the same loader again is a no-op; another one needs ``replace=True``.
    """
    if not callable(loader):
        raise TypeError(f"register_shard_loader: loader must be callable, got {type(loader).__name__}")
    if _SHARD_LOADER and _SHARD_LOADER[0] is not loader and not replace:
        raise ValueError(
            f"a shard loader is already registered ({_describe(_SHARD_LOADER[0])}); pass replace=True "
            f"to replace it with {_describe(loader)}"
        )
    _SHARD_LOADER[:] = [loader]


def shard_loader() -> ShardLoader:
    """The registered shard loader (see :func:`register_shard_loader`); RuntimeError if there is none."""
    if not _SHARD_LOADER:
        raise RuntimeError(
            "SAE.load_from_disk(shard=True) needs a shard loader and none is registered; import "
            "sparsekern (its root registers sparsekern.distributed's) or call "
            "sparsekern.registry.register_shard_loader"
        )
    return _SHARD_LOADER[0]


def _describe(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
