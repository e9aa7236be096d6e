"""Deprecation shim (listed in tests/test_layering.py SHIMS): the old ``sparsekern.loading.load_sparsify`` /
``load_circuit_tracer`` / ``load_gemma_scope_npz`` (and ``sparsekern.loading.formats.load_*``) built SAEs.

They are now the classmethods ``sparsekern.SAE.load_*``. This module is the one place of ``loading/`` that
reaches up to them, through the package root's lazy attribute (``loading/`` imports no SAE module), and
warns on each use.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

SAE_ALIASES = ("load_sparsify", "load_circuit_tracer", "load_gemma_scope_npz")  # same names on sparsekern.SAE


def sae_alias(module: str, name: str) -> Any:
    """``sparsekern.SAE.<name>`` for the old ``<module>.<name>`` (DeprecationWarning), else AttributeError."""
    if name not in SAE_ALIASES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    msg = f"{module}.{name} is deprecated: use sparsekern.SAE.{name}"
    warnings.warn(msg, DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module("sparsekern").SAE, name)
