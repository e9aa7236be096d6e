"""Readers/writers for SAE checkpoints: SAELens folders, EleutherAI sparsify, circuit-tracer, Gemma Scope,
and SAELens's pretrained registry resolved against the local Hugging Face cache (no downloads).

The usual entry points are the classmethods ``sparsekern.SAE.load_from_disk`` / ``from_pretrained`` /
``load_sparsify`` / ``load_circuit_tracer`` / ``load_gemma_scope_npz``; the functions here do the work.
"""

from .formats import load_circuit_tracer, load_gemma_scope_npz, load_sparsify
from .pretrained import PretrainedNotCachedError, hf_cache_dir
from .sae_lens_format import handle_config_defaulting, read_sae_lens_dir, read_safetensors

__all__ = [
    "PretrainedNotCachedError",
    "handle_config_defaulting",
    "hf_cache_dir",
    "load_circuit_tracer",
    "load_gemma_scope_npz",
    "load_sparsify",
    "read_sae_lens_dir",
    "read_safetensors",
]
