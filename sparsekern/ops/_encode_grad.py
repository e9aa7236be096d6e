"""Backward shared by the sparse encoders.

Given dL/dvalues for the kept slots (already masked), with pre[n, f] = xc[n] @ W_enc[:, f] + b_enc[f]:
  dx      = sum_j g[n, j] * W_enc[:, idx[n, j]]          -> sparse_decode over W_enc^T
  dW_enc  = (per feature f: sum of g * xc[n]).T          -> the decode weight-grad kernel
  db_enc  = index_add of g
  db_dec  = -sum_n dx[n]
Nothing of size [N, d_sae] is built.
"""

from . import _validate as V
from .sparse_decode import _backward_weight, _sparse_decode


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
        with V.own_indices():  # the encoder's own output: no range check (a GPU sync)
            dx = _sparse_decode(g, indices, W_enc.t(), None)
    if need_W:
        xc = x - b_dec if b_dec is not None else x
        dW = _backward_weight(xc.contiguous(), g, indices, d_sae).t()
    if need_b_enc:
        db_enc = x.new_zeros(d_sae, dtype=g.dtype).index_add_(0, indices.reshape(-1), g.reshape(-1))
    if need_b_dec:
        db_dec = -dx.sum(0)
    return dx if need_x else None, dW, db_enc, db_dec
