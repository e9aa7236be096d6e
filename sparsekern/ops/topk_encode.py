"""topk_encode: fused ``(x - b_dec) @ W_enc + b_enc`` + per-row top-k, never building [N, d_sae].

The native kernels tile the matmul over d_sae and merge a running top-k per row, so extra memory
is one tile, not the dense pre-activations. Ties are broken toward the lower feature index; the
result is sorted by value (descending). ReLU (if ``relu``) is applied after selection, as SAELens.
"""

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from .. import backends, ref
from ..sparse_acts import SparseActs
from . import validate as V
from ._encode_grad import encoder_backward, save_encoder_inputs

backends.register("topk_encode", "ref")(ref.topk_encode)


@backends.register("topk_encode", "cpp", ("cpu",))
def _cpp(x, W_enc, b_enc, b_dec, k, relu):
    # detached: the kernel's worker threads call ATen ops that must not see requires_grad
    # (autograd is handled by register_autograd below, not inside the kernel)
    b_dec = b_dec.detach() if b_dec is not None else None
    return backends.native().topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), b_dec, k, relu)


if backends.has_triton():  # kernels in sparsekern/triton, imported on first call (cuda; cpu if interpreted)

    @backends.register("topk_encode", "triton", ("cuda", "cpu"))
    def _triton(x, W_enc, b_enc, b_dec, k, relu):
        from ..triton import encode

        b_dec = b_dec.detach() if b_dec is not None else None
        return encode.topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), b_dec, k, relu)


@torch.library.custom_op("sparsekern::topk_encode", mutates_args=())
def _topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], k: int, relu: bool
) -> tuple[Tensor, Tensor]:
    _, impl = backends.select("topk_encode", x.device)
    values, indices = impl(x, W_enc, b_enc, b_dec, k, relu)
    return values, indices


@_topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k, relu):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, k, relu = inputs
    values, indices = output
    save_encoder_inputs(ctx, x, W_enc, b_dec, values, indices, b_dec_pos=3)
    ctx.relu = relu


def _backward(ctx, grad_values, _grad_indices):
    values = ctx.saved_tensors[3]
    g = grad_values * (values > 0) if ctx.relu else grad_values
    return (*encoder_backward(ctx, g), None, None)


_topk_encode.register_autograd(_backward, setup_context=_setup_context)


def topk_encode(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, "d_sae"],
    k: int,
    *,
    b_dec: Optional[Float[Tensor, "d_in"]] = None,
    relu: bool = True,
) -> SparseActs:
    """Top-k SAE encode straight to a sparse code.

    ``pre = (x - b_dec) @ W_enc + b_enc`` (``b_dec`` optional); keep the ``k`` largest ``pre`` per
    row (ties -> lower index), then ``relu`` them if asked. Returns :class:`SparseActs` with
    ``values``/``indices`` of shape ``[*batch, k]``, sorted by value descending. Slots whose value
    ReLU clamps to 0 keep their (valid) index. Differentiable in x, W_enc, b_enc, b_dec.
    """
    x2, _, d_sae = V.encoder_args(x, W_enc, b_enc, b_dec)
    k = V.int_arg("k", k, 1, d_sae)
    values, indices = _topk_encode(x2, W_enc, b_enc, b_dec, k, bool(relu))
    lead = x.shape[:-1]
    return SparseActs(values.reshape(*lead, k), indices.reshape(*lead, k))
