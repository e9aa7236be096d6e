"""dense_encode: the dense ``[..., d_sae]`` code SAELens returns, built from the sparse one."""

from typing import Optional, Union

from jaxtyping import Float
from torch import Tensor

from .threshold_encode import threshold_encode
from .topk_encode import topk_encode

ACTIVATIONS = ("relu", "jumprelu", "topk")


def dense_encode(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, "d_sae"],
    *,
    b_dec: Optional[Float[Tensor, "d_in"]] = None,
    activation: str,
    threshold: Union[float, Float[Tensor, "d_sae"], None] = None,
    k: Optional[int] = None,
) -> Float[Tensor, "*batch d_sae"]:
    """Dense activations as SAELens computes them, via the sparse kernels.

    activation: ``"relu"`` (relu(pre)), ``"jumprelu"`` (relu(pre) * (pre > threshold), needs
    ``threshold``) or ``"topk"`` (relu of the top-``k`` pre, needs ``k``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    d_sae = W_enc.shape[-1] if hasattr(W_enc, "shape") and W_enc.dim() == 2 else None
    if activation == "topk":
        if k is None:
            raise ValueError("dense_encode(activation='topk') needs k")
        acts = topk_encode(x, W_enc, b_enc, k, b_dec=b_dec, relu=True)
    elif activation == "relu":
        acts = threshold_encode(x, W_enc, b_enc, 0.0, b_dec=b_dec)
    else:
        if threshold is None:
            raise ValueError("dense_encode(activation='jumprelu') needs threshold")
        # relu(pre) * (pre > t) keeps pre exactly where pre > max(t, 0)
        thr = threshold.clamp_min(0) if isinstance(threshold, Tensor) else max(float(threshold), 0.0)
        acts = threshold_encode(x, W_enc, b_enc, thr, b_dec=b_dec)
    return acts.to_dense(d_sae)
