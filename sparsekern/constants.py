"""Constants shared by the SAE family and the checkpoint readers (a leaf: imports nothing of sparsekern).

Checkpoint filenames, the dtype names a cfg.json may hold (``str_to_dtype`` / ``dtype_to_str``), the
``normalize_activations`` modes and the SAELens version written into new metadata.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Union

import torch

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

NORMALIZE_MODES = (
    "none",
    "expected_average_only_in",  # folded into the weights by from_pretrained; identity at inference
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",  # folded at save time by SAELens; identity at inference
)
DTYPE_MAP = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPES = DTYPE_MAP  # the old private name


def str_to_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``"float32"`` / ``"torch.float32"`` / ``torch.float32`` -> ``torch.float32`` (as SAELens)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_MAP:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {sorted(DTYPE_MAP)}")
    return DTYPE_MAP[key]


def dtype_to_str(dtype: Union[str, torch.dtype]) -> str:
    return str(str_to_dtype(dtype)).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def sae_lens_version() -> str:
    """The installed SAELens version (SAELens reads ``metadata.sae_lens_version`` to spot pre-6 configs)."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"
