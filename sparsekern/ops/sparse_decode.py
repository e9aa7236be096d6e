"""sparse_decode: out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec).

Custom ops: ``sparsekern::sparse_decode`` and its two backward ops, each dispatched to the
best registered backend. Backward never builds an ``N*k*d`` buffer and uses no atomics:
``dW_dec`` is a per-feature segmented reduction, public as :func:`sparse_decode_backward_weight`
(``FeatureStats`` uses it for its conditioned sums).
"""

import math
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import backends, ref
from ..sparse_acts import SparseActs
from . import validate as V

# ---- backend implementations -------------------------------------------------------------
backends.register("sparse_decode", "ref")(ref.sparse_decode)
backends.register("sparse_decode_backward_values", "ref")(ref.sparse_decode_backward_values)
backends.register("sparse_decode_backward_weight", "ref")(ref.sparse_decode_backward_weight)


@backends.register("sparse_decode", "cpp", ("cpu",))
def _cpp_fwd(values, indices, W_dec, b_dec):
    return backends.native().sparse_decode(values, indices, W_dec, b_dec)


@backends.register("sparse_decode_backward_values", "cpp", ("cpu",))
def _cpp_bwd_values(grad_out, indices, W_dec):
    return backends.native().sparse_decode_backward_values(grad_out, indices, W_dec)


@backends.register("sparse_decode_backward_weight", "cpp", ("cpu",))
def _cpp_bwd_weight(grad_out, values, indices, d_sae):
    return backends.native().sparse_decode_backward_weight(grad_out, values, indices, d_sae)


@backends.register("sparse_decode", "cuda", ("cuda",))
def _cuda_fwd(values, indices, W_dec, b_dec):
    return backends.native().sparse_decode_cuda(values, indices, W_dec, b_dec)


@backends.register("sparse_decode_backward_values", "cuda", ("cuda",))
def _cuda_bwd_values(grad_out, indices, W_dec):
    return backends.native().sparse_decode_backward_values_cuda(grad_out, indices, W_dec)


@backends.register("sparse_decode_backward_weight", "cuda", ("cuda",))
def _cuda_bwd_weight(grad_out, values, indices, d_sae):
    return backends.native().sparse_decode_backward_weight_cuda(grad_out, values, indices, d_sae)


if backends.has_triton():  # kernels in sparsekern/triton, imported on first call (cuda; cpu if interpreted)

    @backends.register("sparse_decode", "triton", ("cuda", "cpu"))
    def _triton_fwd(values, indices, W_dec, b_dec):
        from ..triton import decode

        return decode.sparse_decode(values, indices, W_dec, b_dec)

    @backends.register("sparse_decode_backward_values", "triton", ("cuda", "cpu"))
    def _triton_bwd_values(grad_out, indices, W_dec):
        from ..triton import decode

        return decode.sparse_decode_backward_values(grad_out, indices, W_dec)

    @backends.register("sparse_decode_backward_weight", "triton", ("cuda", "cpu"))
    def _triton_bwd_weight(grad_out, values, indices, d_sae):
        from ..triton import decode

        return decode.sparse_decode_backward_weight(grad_out, values, indices, d_sae)


@backends.register("sparse_decode", "metal", ("mps",))
def _metal_fwd(values, indices, W_dec, b_dec):
    from ..mps.sparse_decode import sparse_decode_metal  # only reached when MPS is available

    return sparse_decode_metal(values, indices, W_dec, b_dec)


# ---- custom ops ----------------------------------------------------------------------------
@torch.library.custom_op("sparsekern::sparse_decode", mutates_args=())
def _sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor]
) -> Tensor:
    # range check here, not in the public fn: op bodies see real tensors even under torch.compile
    V.index_range("indices", indices, W_dec.shape[0])
    _, impl = backends.select("sparse_decode", values.device)
    return impl(values, indices, W_dec, b_dec)


@_sparse_decode.register_fake
def _(values, indices, W_dec, b_dec):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("sparsekern::sparse_decode_backward_values", mutates_args=())
def _backward_values(grad_out: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    _, impl = backends.select("sparse_decode_backward_values", grad_out.device)
    return impl(grad_out, indices, W_dec)


@_backward_values.register_fake
def _(grad_out, indices, W_dec):
    return W_dec.new_empty(indices.shape)


@torch.library.custom_op("sparsekern::sparse_decode_backward_weight", mutates_args=())
def _backward_weight(grad_out: Tensor, values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    _, impl = backends.select("sparse_decode_backward_weight", grad_out.device)
    return impl(grad_out, values, indices, d_sae)


@_backward_weight.register_fake
def _(grad_out, values, indices, d_sae):
    return grad_out.new_empty(d_sae, grad_out.shape[1])


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_b_dec = b_dec is not None


def _backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    g_values = g_W = g_b = None
    if ctx.needs_input_grad[0]:
        g_values = _backward_values(grad_out, indices, W_dec)
    if ctx.needs_input_grad[2]:
        g_W = _backward_weight(grad_out, values, indices, W_dec.shape[0])
    if ctx.has_b_dec and ctx.needs_input_grad[3]:
        g_b = grad_out.sum(0)
    return g_values, None, g_W, g_b


_sparse_decode.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ----------------------------------------------------------------------------
def sparse_decode(
    values: Union[Float[Tensor, "*batch k"], SparseActs],
    indices: Optional[Int[Tensor, "*batch k"]] = None,
    W_dec: Optional[Float[Tensor, "d_sae d_out"]] = None,
    b_dec: Optional[Float[Tensor, "d_out"]] = None,
) -> Float[Tensor, "*batch d_out"]:
    """Decode a sparse code: ``out[..., :] = sum_j values[..., j] * W_dec[indices[..., j]] (+ b_dec)``.

    Args:
        values:  [..., k] activations (or a :class:`SparseActs`, then pass ``W_dec`` next).
        indices: [..., k] int64 feature ids in ``[0, d_sae)``.
        W_dec:   [d_sae, d_out] decoder, same dtype/device as ``values``.
        b_dec:   optional [d_out] bias.

    Returns ``[..., d_out]`` in ``W_dec.dtype`` (bf16/fp16 accumulate in fp32). Differentiable in
    ``values``, ``W_dec`` and ``b_dec``.
    """
    if isinstance(values, SparseActs):
        if W_dec is not None and b_dec is None and indices is not None:
            W_dec, b_dec = indices, W_dec  # sparse_decode(acts, W_dec, b_dec)
        elif W_dec is None:
            W_dec = indices
        values, indices = values.values, values.indices
    V.tensor("values", values, min_dim=1)
    V.floating("values", values)
    V.tensor("W_dec", W_dec, dim=2)
    V.same_dtype("W_dec", W_dec, "values", values)
    V.same_device("W_dec", W_dec, "values", values)
    d_sae, d_out = W_dec.shape
    indices = V.indices("indices", indices, values.shape, d_sae, values.device)
    if b_dec is not None:
        V.companion("b_dec", b_dec, "W_dec", W_dec, (d_out,), "[d_out]")
    lead = values.shape[:-1]
    k = values.shape[-1]
    n = math.prod(lead)
    out = _sparse_decode(values.reshape(n, k), indices.reshape(n, k), W_dec, b_dec)
    return out.reshape(*lead, d_out)


def sparse_decode_backward_weight(
    grad_out: Float[Tensor, "n d_out"],
    values: Float[Tensor, "n k"],
    indices: Int[Tensor, "n k"],
    d_sae: int,
) -> Float[Tensor, "d_sae d_out"]:
    """The weight gradient of :func:`sparse_decode`, a per-feature segmented reduction:
    ``out[f] = sum over (n, j) with indices[n, j] == f of values[n, j] * grad_out[n]``.

    Equals ``dense(values, indices).T @ grad_out`` (duplicate indices in a row add up) without building
    the dense ``[n, d_sae]`` code, with no atomics (the ``sparsekern::sparse_decode_backward_weight``
    custom op, on the best registered backend).

    Args:
        grad_out: ``[n, d_out]`` float rows (the gradient of the decoder output, or any ``y`` to sum).
        values:   ``[n, k]`` float weights of the slots (any float dtype; taken at the accumulation
            precision of ``grad_out``).
        indices:  ``[n, k]`` int64 (or int32) feature ids in ``[0, d_sae)``, on the device of ``grad_out``.
        d_sae:    number of output rows (features), an int ``>= 0``.

    Returns ``[d_sae, d_out]`` in ``grad_out.dtype`` (bf16/fp16 accumulate in fp32); rows of features that
    no slot names are 0.
    """
    V.tensor("grad_out", grad_out, dim=2)
    V.floating("grad_out", grad_out)
    V.tensor("values", values, dim=2)
    V.floating("values", values)
    V.same_device("values", values, "grad_out", grad_out)
    if values.shape[0] != grad_out.shape[0]:
        raise ValueError(f"values [n, k]={tuple(values.shape)} and grad_out [n, d_out]="
                         f"{tuple(grad_out.shape)} must have the same number of rows n")
    d_sae = V.int_arg("d_sae", d_sae, 0, 2**62)
    indices = V.indices("indices", indices, values.shape, d_sae, values.device)
    V.index_range("indices", indices, d_sae)
    return _backward_weight(grad_out, values, indices, d_sae)
