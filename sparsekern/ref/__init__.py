"""Pure-PyTorch references: the portable fallback (any device) and the test oracle.

They never build an ``[N, d_sae]`` tensor for the whole problem: work is chunked so the
fallback stays usable at 65k-1M features. Low-precision inputs are computed in float32.
"""

from .decode import sparse_decode, sparse_decode_backward_values, sparse_decode_backward_weight
from .encode import threshold_encode, topk_encode
from .feature_topk import feature_topk_update_

__all__ = [
    "feature_topk_update_",
    "sparse_decode",
    "sparse_decode_backward_values",
    "sparse_decode_backward_weight",
    "threshold_encode",
    "topk_encode",
]
