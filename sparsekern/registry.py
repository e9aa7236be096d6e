"""Architecture registry: cfg.json ``architecture`` name -> (SAE class, config class).

A leaf module: the SAE types are imported only for type checking. ``sparsekern.saes`` registers its
classes when imported; ``get_sae_class`` imports it on a miss, so a lookup never depends on what the
caller happened to import first. Registering a different class under a taken name is an error.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .saes.sae import SAE, SAEConfig

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
