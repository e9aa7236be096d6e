"""Public sparse SAE ops (each a ``torch.library`` custom op with a backend registry)."""

from ..sparse_acts import SparseActs
from .dense_encode import dense_encode
from .feature_topk import FeatureTopKState, feature_topk_update
from .gram_topk import gram_topk
from .sparse_decode import sparse_decode, sparse_decode_backward_weight
from .threshold_encode import threshold_encode
from .topk_encode import topk_encode

__all__ = [
    "FeatureTopKState",
    "SparseActs",
    "dense_encode",
    "feature_topk_update",
    "gram_topk",
    "sparse_decode",
    "sparse_decode_backward_weight",
    "threshold_encode",
    "topk_encode",
]
