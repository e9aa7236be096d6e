"""threshold_encode: JumpReLU / ReLU encode straight to an exact, variable-L0 sparse code."""

from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .. import backends, ref
from ..sparse_acts import SparseActs
from . import validate as V
from ._encode_grad import encoder_backward, save_encoder_inputs

backends.register("threshold_encode", "ref")(ref.threshold_encode)


@backends.register("threshold_encode", "cpp", ("cpu",))
def _cpp(x, W_enc, b_enc, threshold, b_dec):
    # detached: see ops/topk_encode.py (ATen calls on worker threads must not see requires_grad)
    b_dec = b_dec.detach() if b_dec is not None else None
    return backends.native().threshold_encode(
        x.detach(), W_enc.detach(), b_enc.detach(), threshold.detach(), b_dec
    )


if backends.has_triton():  # kernels in sparsekern/triton, imported on first call (cuda; cpu if interpreted)

    @backends.register("threshold_encode", "triton", ("cuda", "cpu"))
    def _triton(x, W_enc, b_enc, threshold, b_dec):
        from ..triton import encode

        b_dec = b_dec.detach() if b_dec is not None else None
        return encode.threshold_encode(x.detach(), W_enc.detach(), b_enc.detach(), threshold.detach(), b_dec)


@torch.library.custom_op("sparsekern::threshold_encode", mutates_args=())
def _threshold_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, b_dec: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    V.finite_threshold(threshold)  # here, not in the public fn: the op body sees real tensors
    _, impl = backends.select("threshold_encode", x.device)
    values, indices, l0 = impl(x, W_enc, b_enc, threshold, b_dec)
    return values, indices, l0


@_threshold_encode.register_fake
def _(x, W_enc, b_enc, threshold, b_dec):
    kmax = torch.library.get_ctx().new_dynamic_size()
    n = x.shape[0]
    return (
        x.new_empty(n, kmax),
        x.new_empty(n, kmax, dtype=torch.int64),
        x.new_empty(n, dtype=torch.int64),
    )


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, threshold, b_dec = inputs
    values, indices, l0 = output
    save_encoder_inputs(ctx, x, W_enc, b_dec, values, indices, b_dec_pos=4)
    ctx.l0 = l0


def _backward(ctx, grad_values, _grad_indices, _grad_l0):
    live = torch.arange(grad_values.shape[1], device=grad_values.device) < ctx.l0[:, None]
    dx, dW, db_enc, db_dec = encoder_backward(ctx, grad_values * live)
    return dx, dW, db_enc, None, db_dec


_threshold_encode.register_autograd(_backward, setup_context=_setup_context)


def threshold_encode(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, "d_sae"],
    threshold: Union[float, Float[Tensor, "d_sae"]],
    *,
    b_dec: Optional[Float[Tensor, "d_in"]] = None,
) -> SparseActs:
    """JumpReLU encode: keep every ``pre > threshold`` with value ``pre`` (ReLU = threshold 0).

    ``threshold`` is a finite scalar or a ``[d_sae]`` tensor. Exact, no cap on L0: the result's k
    is the largest row L0 in the batch (0 if nothing fires). Within a row the kept features are in
    ascending index order; padding slots hold value 0, index 0. Differentiable in x, W_enc, b_enc,
    b_dec (the threshold gets no gradient). SAELens's ``relu(pre) * (pre > t)`` equals this op with
    ``threshold=max(t, 0)``.
    """
    x2, _, d_sae = V.encoder_args(x, W_enc, b_enc, b_dec)
    if x.is_meta:  # torch's own error names the private op and suggests FakeTensors
        raise ValueError(
            "x is on meta: threshold_encode's output width (the largest row L0) depends on the data, "
            "which meta tensors lack; use topk_encode, or trace with FakeTensors (torch.compile)"
        )
    thr = V.threshold(threshold, d_sae, x)
    values, indices, _ = _threshold_encode(x2, W_enc, b_enc, thr, b_dec)
    lead = x.shape[:-1]
    kmax = values.shape[-1]
    return SparseActs(values.reshape(*lead, kmax), indices.reshape(*lead, kmax))
