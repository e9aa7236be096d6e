"""Shim: the SAE family moved to :mod:`sparsekern.saes` (one file per architecture). Re-exports every name
this module used to define, so ``from sparsekern.sae import SAE, dense_to_sparse`` keeps working."""

from .constants import (  # noqa: F401
    _DTYPES,
    NORMALIZE_MODES,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    dtype_to_str,
    str_to_dtype,
)
from .constants import sae_lens_version as _sae_lens_version  # noqa: F401
from .registry import _REGISTRY, get_sae_class, register_sae_class  # noqa: F401
from .saes.gated import GatedSAE, GatedSAEConfig  # noqa: F401
from .saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig, _JumpReLU  # noqa: F401
from .saes.sae import (  # noqa: F401
    _SPARSEKERN_ONLY_FIELDS,
    SAE,
    SAEConfig,
    SAEMetadata,
    T,
    _check_cls,
    _Code,
    _has_hooks,
    _identity,
    _identity_out,
    _unflatten_heads,
    _version,
    dense_to_sparse,
)
from .saes.standard import StandardSAE, StandardSAEConfig  # noqa: F401
from .saes.topk import TopKSAE, TopKSAEConfig, _TopK  # noqa: F401
from .sparse_acts import SparseActs  # noqa: F401
