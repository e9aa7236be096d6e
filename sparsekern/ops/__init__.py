"""Public sparse SAE ops (each a ``torch.library`` custom op with a backend registry)."""

from ..sparse_acts import SparseActs
from .dense_encode import dense_encode
from .sparse_decode import sparse_decode
from .threshold_encode import threshold_encode
from .topk_encode import topk_encode

__all__ = ["SparseActs", "dense_encode", "sparse_decode", "threshold_encode", "topk_encode"]
