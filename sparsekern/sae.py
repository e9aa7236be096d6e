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
from .saes.config import SPARSEKERN_ONLY_FIELDS as _SPARSEKERN_ONLY_FIELDS  # noqa: F401
from .saes.config import SAEConfig, SAEMetadata  # noqa: F401
from .saes.gated import GatedSAE, GatedSAEConfig  # noqa: F401
from .saes.io import check_class as _check_cls  # noqa: F401
from .saes.jumprelu import JumpReLUMixin as _JumpReLU  # noqa: F401
from .saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig  # noqa: F401
from .saes.pipeline import (  # noqa: F401
    _Code,
    _identity,
    _identity_out,
    _unflatten_heads,
    _version,
)
from .saes.pipeline import has_hooks as _has_hooks  # noqa: F401
from .saes.sae import SAE, T  # noqa: F401
from .saes.standard import StandardSAE, StandardSAEConfig  # noqa: F401
from .saes.topk import TopKMixin as _TopK  # noqa: F401
from .saes.topk import TopKSAE, TopKSAEConfig  # noqa: F401
from .sparse_acts import SparseActs, dense_to_sparse  # noqa: F401
