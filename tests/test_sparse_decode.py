"""sparse_decode forward/backward on every backend vs float64 reference and embedding_bag."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.ops import SparseActs, sparse_decode

from _cases import decoder_problem
from conftest import LOW_PRECISION, cpu_backends, rel_err, tol_for

BACKENDS = cpu_backends("sparse_decode")


def dense64(values, indices, W, b=None):
    out = (values.double()[..., None] * W.double()[indices]).sum(-2)
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward(backend, dtype, bias):
    v, i, W, b = decoder_problem(123, 13, 431, 67, dtype)
    b = b if bias else None
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W, b)
    assert out.dtype == dtype and out.shape == (123, 67)
    assert rel_err(out, dense64(v, i, W, b)) < tol_for(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_embedding_bag(backend):
    v, i, W, _ = decoder_problem(200, 32, 1000, 96, torch.float32)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W)
    bag = F.embedding_bag(i, W, per_sample_weights=v, mode="sum")
    assert rel_err(out, bag) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(backend, dtype):
    v, i, W, b = decoder_problem(64, 32, 500, 128, dtype)
    exact = dense64(v, i, W, b)
    with sk.use_backend("ref"):
        ref_lp = sparse_decode(v, i, W, b)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W, b)
    assert out.dtype == dtype
    assert rel_err(out, exact) <= 2 * rel_err(ref_lp, exact) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_and_zero_padding(backend):
    W = torch.randn(10, 5, dtype=torch.float64)
    i = torch.tensor([[3, 3, 0], [9, 0, 0]])
    v = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W)
    assert torch.allclose(out[0], 3 * W[3]) and torch.allclose(out[1], 0.5 * W[9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_noncontiguous_and_sparse_acts(backend):
    v, i, W, b = decoder_problem(2 * 5, 8, 100, 30, torch.float32)
    v3, i3 = v.reshape(2, 5, 8), i.reshape(2, 5, 8)
    vt = v3.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, same values
    Wt = W.t().contiguous().t()
    with sk.use_backend(backend):
        out = sparse_decode(vt, i3, Wt, b)
        out2 = sparse_decode(SparseActs(v3, i3), W, b)
    assert out.shape == (2, 5, 30)
    assert rel_err(out, dense64(v3, i3, W, b)) < 1e-5
    assert torch.equal(out, out2)


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(0, 40), k=st.integers(0, 20), d_sae=st.integers(1, 120), d=st.integers(1, 70))
def test_fuzz(backend, n, k, d_sae, d):
    v, i, W, b = decoder_problem(n, k, d_sae, d, torch.float64, seed=n + k + d)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W, b)
    assert out.shape == (n, d)
    assert rel_err(out, dense64(v, i, W, b)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_matches_dense_autograd(backend, dtype):
    v, i, W, b = decoder_problem(77, 9, 150, 40, dtype)
    G = torch.randn(77, 40, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (v, W, b)]
    with sk.use_backend(backend):
        out = sparse_decode(args[0], i, args[1], args[2])
        (out * G.to(dtype)).sum().backward()
    d = [t.double().clone().requires_grad_() for t in (v, W, b)]
    (dense64(d[0], i, d[1], d[2]) * G.to(dtype).double()).sum().backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, e in zip(args, d):
        assert a.grad.dtype == dtype
        assert rel_err(a.grad, e.grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    v, i, W, b = decoder_problem(7, 4, 12, 5, torch.float64)
    i[0, 1] = i[0, 0]  # a repeated feature in one row
    args = [t.clone().requires_grad_() for t in (v, W, b)]
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v, W, b: sparse_decode(v, i, W, b), args)


def test_opcheck():
    v, i, W, b = decoder_problem(11, 5, 40, 9, torch.float32)
    for vv, WW in [(v, W), (v.clone().requires_grad_(), W.clone().requires_grad_())]:
        torch.library.opcheck(torch.ops.sparsekern.sparse_decode.default, (vv, i, WW, b))
        torch.library.opcheck(torch.ops.sparsekern.sparse_decode.default, (vv, i, WW, None))
    G = torch.randn(11, 9)
    torch.library.opcheck(torch.ops.sparsekern.sparse_decode_backward_values.default, (G, i, W))
    torch.library.opcheck(torch.ops.sparsekern.sparse_decode_backward_weight.default, (G, v, i, 40))
