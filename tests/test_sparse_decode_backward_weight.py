"""sparsekern.ops.sparse_decode_backward_weight (the public weight backward of sparse_decode) on every
backend, pinned to the float64 reference ``dense(values, indices).T @ grad_out``."""

import pytest
import torch

import sparsekern as sk
from sparsekern.ops import sparse_decode, sparse_decode_backward_weight

from _cases import decoder_problem
from conftest import cpu_backends

BACKENDS = cpu_backends("sparse_decode_backward_weight")


def reference(grad_out, values, indices, d_sae):
    """float64 ``out[f] = sum_{(n, j): indices[n, j] = f} values[n, j] grad_out[n]`` and the same sum of
    absolute terms (the scale of the rounding error), both [d_sae, d]."""
    n, k = indices.shape
    dense = torch.zeros(n, d_sae, dtype=torch.float64).index_put_(
        (torch.arange(n)[:, None].expand(n, k), indices), values.double(), accumulate=True)
    absd = torch.zeros_like(dense).index_put_(
        (torch.arange(n)[:, None].expand(n, k), indices), values.double().abs(), accumulate=True)
    return dense.T @ grad_out.double(), absd.T @ grad_out.double().abs()


def bound(out_dtype, acc_eps, slots, abs_sum, exact):
    """Rounding bound of a sum of ``slots[f]`` products taken in any order at precision ``acc_eps``
    (Higham's gamma_m <= m eps / (1 - m eps), with one more rounding per product), then rounded to
    ``out_dtype`` once (half an ulp: eps_out / 2 of the result)."""
    m = slots[:, None].double() + 1
    acc = m * acc_eps / (1 - m * acc_eps) * abs_sum
    return acc + torch.finfo(out_dtype).eps / 2 * (exact.abs() + acc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_float64_reference(backend, dtype):
    n, k, d_sae, d = 150, 12, 97, 33
    values, indices, _, _ = decoder_problem(n, k, d_sae, d, dtype, seed=3)
    values[::7, 0] = 0  # padding slots add nothing
    indices[::5, 1] = indices[::5, 2]  # a feature twice in a row: both slots add
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    with sk.use_backend(backend):
        out = sparse_decode_backward_weight(grad_out, values, indices, d_sae)
    assert out.shape == (d_sae, d) and out.dtype == dtype
    exact, abs_sum = reference(grad_out, values, indices, d_sae)
    slots = torch.bincount(indices.reshape(-1), minlength=d_sae)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps  # bf16: fp32 sums
    err = (out.double() - exact).abs()
    assert bool((err <= bound(dtype, acc_eps, slots, abs_sum, exact)).all()), float(err.max())
    assert bool((out[slots == 0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_the_weight_gradient_of_sparse_decode(backend):
    values, indices, W, b = decoder_problem(40, 6, 30, 16, torch.float32)
    W.requires_grad_(True)
    grad_out = torch.randn(40, 16)
    with sk.use_backend(backend):
        sparse_decode(values, indices, W, b).backward(grad_out)
        direct = sparse_decode_backward_weight(grad_out, values, indices, 30)
    assert torch.equal(W.grad, direct)  # the same op: bitwise


def test_edge_cases_and_bad_input():
    g = torch.randn(4, 3)
    v = torch.rand(4, 2)
    i = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    assert sparse_decode_backward_weight(g[:0], v[:0], i[:0], 5).eq(0).all()  # no rows: zeros [5, 3]
    assert sparse_decode_backward_weight(g, v, i.int(), 5).shape == (5, 3)  # int32 ids are widened
    with pytest.raises(ValueError, match=r"indices must lie in \[0, d_sae=4\)"):
        sparse_decode_backward_weight(g, v, i, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        sparse_decode_backward_weight(g[:3], v, i, 5)
    with pytest.raises(ValueError, match="indices has shape"):
        sparse_decode_backward_weight(g, v, i[:, :1], 5)
    with pytest.raises(ValueError, match="grad_out must be 2-D"):
        sparse_decode_backward_weight(g[None], v, i, 5)
    with pytest.raises(TypeError, match="values must be float"):
        sparse_decode_backward_weight(g, i, i, 5)
    with pytest.raises(TypeError, match="indices must be int64"):
        sparse_decode_backward_weight(g, v, v, 5)
    with pytest.raises(TypeError, match="d_sae must be an int"):
        sparse_decode_backward_weight(g, v, i, 5.0)
    with pytest.raises(ValueError, match="values is on meta"):
        sparse_decode_backward_weight(g, v.to("meta"), i, 5)
