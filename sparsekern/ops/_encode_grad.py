"""Backward shared by the sparse encoders.

Given dL/dvalues for the kept slots (already masked), with pre[n, f] = xc[n] @ W_enc[:, f] + b_enc[f]:
  dx      = sum_j g[n, j] * W_enc[:, idx[n, j]]          -> ``sparsekern::encode_backward_input``
  dW_enc  = per feature f: sum of g * xc[n], [d_in, d_sae] -> ``sparsekern::encode_backward_weight``
  db_enc  = index_add of g
  db_dec  = -sum_n dx[n]
Nothing of size [N, d_sae] is built.

Backends of the two ops: the Triton kernels of ``sparsekern/triton/encode_grad.py`` (preferred on
CUDA: coalesced reads of ``W_enc`` and a ``[d_in, d_sae]`` weight gradient written in place), and
everywhere else the decode kernels of the selected backend (C++ on CPU): ``sparse_decode`` over the
view ``W_enc^T`` and the decode weight-grad kernel's ``[d_sae, d_in]`` result, transposed.
"""

import torch
from torch import Tensor

from .. import backends
from . import validate as V
from .sparse_decode import _backward_weight, _sparse_decode

IN, WEIGHT = "encode_backward_input", "encode_backward_weight"


def _via_decode_input(g: Tensor, indices: Tensor, W_enc: Tensor) -> Tensor:
    with V.own_indices():  # the encoder's own output: no range check (a GPU sync)
        return _sparse_decode(g, indices, W_enc.t(), None)


def _via_decode_weight(xc: Tensor, g: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    return _backward_weight(xc, g, indices, d_sae).t()


# the decode path under every backend that has sparse_decode (it then runs that backend's kernels)
for _name, _devices in (("ref", None), ("cpp", ("cpu",)), ("cuda", ("cuda",)), ("metal", ("mps",))):
    backends.register(IN, _name, _devices)(_via_decode_input)
    backends.register(WEIGHT, _name, _devices)(_via_decode_weight)

if backends.has_triton():

    @backends.register(IN, "triton", ("cuda", "cpu"))
    def _triton_input(g, indices, W_enc):
        from ..triton import encode_grad

        return encode_grad.encode_backward_input(g, indices, W_enc)

    @backends.register(WEIGHT, "triton", ("cuda", "cpu"))
    def _triton_weight(xc, g, indices, d_sae):
        from ..triton import encode_grad

        return encode_grad.encode_backward_weight(xc, g, indices, d_sae)

    for _op in (IN, WEIGHT):
        backends.prefer(_op, "cuda", ("triton", "cuda", "ref"))


@torch.library.custom_op("sparsekern::encode_backward_input", mutates_args=())
def encode_backward_input(g: Tensor, indices: Tensor, W_enc: Tensor) -> Tensor:
    """g/indices [N, K], W_enc [d_in, d_sae] -> dx [N, d_in] = sum_j g[n, j] W_enc[:, idx[n, j]]."""
    _, impl = backends.select(IN, g.device)
    return impl(g, indices, W_enc).contiguous()


@encode_backward_input.register_fake
def _(g, indices, W_enc):
    return W_enc.new_empty(indices.shape[0], W_enc.shape[0])


@torch.library.custom_op("sparsekern::encode_backward_weight", mutates_args=())
def encode_backward_weight(xc: Tensor, g: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """xc [N, d_in], g/indices [N, K] -> dW_enc [d_in, d_sae], contiguous (``W_enc``'s usual layout:
    autograd would copy any other layout into it when accumulating). The Triton kernel writes it so;
    the decode path transposes the decode kernel's [d_sae, d_in] result."""
    _, impl = backends.select(WEIGHT, g.device)
    return impl(xc, g, indices, d_sae).contiguous()


@encode_backward_weight.register_fake
def _(xc, g, indices, d_sae):
    return xc.new_empty(xc.shape[1], d_sae)


def save_encoder_inputs(ctx, x, W_enc, b_dec, values, indices, b_dec_pos: int) -> None:
    """b_dec_pos: position of b_dec among the op's inputs (for ctx.needs_input_grad)."""
    ctx.save_for_backward(x, W_enc, b_dec, values, indices)
    ctx.has_b_dec = b_dec is not None
    ctx.b_dec_pos = b_dec_pos


def encoder_backward(ctx, g):
    """g: [N, K] gradient of the kept values, zero on slots that pass no gradient."""
    x, W_enc, b_dec, _values, indices = ctx.saved_tensors
    d_sae = W_enc.shape[1]
    g = g.to(x.dtype).contiguous()
    need_x, need_W, need_b_enc = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b_dec = ctx.has_b_dec and ctx.needs_input_grad[ctx.b_dec_pos]
    dx = dW = db_enc = db_dec = None
    if need_x or need_b_dec:
        dx = encode_backward_input(g, indices, W_enc)
    if need_W:
        xc = x - b_dec if b_dec is not None else x
        dW = encode_backward_weight(xc.contiguous(), g, indices, d_sae)
    if need_b_enc:
        db_enc = x.new_zeros(d_sae, dtype=g.dtype).index_add_(0, indices.reshape(-1), g.reshape(-1))
    if need_b_dec:
        db_dec = -dx.sum(0)
    return dx if need_x else None, dW, db_enc, db_dec
