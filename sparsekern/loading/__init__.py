"""Readers for SAE checkpoints: SAELens folders, EleutherAI sparsify, circuit-tracer, Gemma Scope, and
SAELens's pretrained registry resolved against the local Hugging Face cache (no downloads).

Every reader returns plain data, ``(cfg_dict, state_dict[, log_sparsity])``, and this package never
imports the SAE classes; the classmethods ``sparsekern.SAE.load_from_disk`` / ``from_pretrained`` /
``load_sparsify`` / ``load_circuit_tracer`` / ``load_gemma_scope_npz`` build the SAEs. The old names
``load_sparsify`` etc. are still here, as lazy aliases of those classmethods (and
``loading.pretrained.load_pretrained(cls, ...)`` calls ``cls.from_pretrained_with_cfg_and_sparsity``).
"""

import importlib
from typing import Any

from .formats import read_circuit_tracer, read_gemma_scope_npz, read_sparsify
from .pretrained import PretrainedNotCachedError, hf_cache_dir, read_pretrained, resolve_release
from .sae_lens_format import handle_config_defaulting, read_sae_lens_dir, read_safetensors, read_sparsity

# name here -> classmethod of sparsekern.SAE
_SAE_ALIASES = {
    "load_sparsify": "load_sparsify",
    "load_circuit_tracer": "load_circuit_tracer",
    "load_gemma_scope_npz": "load_gemma_scope_npz",
}


def __getattr__(name: str) -> Any:
    # through the package root's own lazy attribute, so loading/ itself never imports the SAE family
    if name in _SAE_ALIASES:
        return getattr(importlib.import_module("sparsekern").SAE, _SAE_ALIASES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PretrainedNotCachedError",
    "handle_config_defaulting",
    "hf_cache_dir",
    "load_circuit_tracer",
    "load_gemma_scope_npz",
    "load_sparsify",
    "read_circuit_tracer",
    "read_gemma_scope_npz",
    "read_pretrained",
    "read_sae_lens_dir",
    "read_safetensors",
    "read_sparsity",
    "read_sparsify",
    "resolve_release",
]
