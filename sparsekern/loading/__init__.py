"""Readers for SAE checkpoints: SAELens folders, EleutherAI sparsify, circuit-tracer, Gemma Scope, and
SAELens's pretrained registry resolved against the local Hugging Face cache (no downloads).

Every reader returns plain data, ``(cfg_dict, state_dict[, log_sparsity])``, and this package never
imports the SAE classes; the classmethods ``sparsekern.SAE.load_from_disk`` / ``from_pretrained`` /
``load_sparsify`` / ``load_circuit_tracer`` / ``load_gemma_scope_npz`` build the SAEs. The old names
``load_sparsify`` etc. are still here, as deprecated aliases of those classmethods (:mod:`.deprecated`;
``loading.pretrained.load_pretrained(cls, ...)`` calls ``cls.from_pretrained_with_cfg_and_sparsity``).
Where a reader needs to know the SAE classes (a class name in an error, a config's fields) it takes a
function argument instead (``label``, ``config_fields``).
"""

from typing import Any

from .deprecated import sae_alias
from .formats import read_circuit_tracer, read_gemma_scope_npz, read_sparsify
from .pretrained import PretrainedNotCachedError, hf_cache_dir, read_pretrained, resolve_release
from .sae_lens_format import handle_config_defaulting, read_sae_lens_dir, read_safetensors, read_sparsity


def __getattr__(name: str) -> Any:
    # the old load_* names: deprecated aliases of the SAE classmethods (see .deprecated)
    return sae_alias(__name__, name)


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
