"""sparse_decode forward/backward on every backend vs float64 reference and embedding_bag."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.ops import SparseActs, sparse_decode

from _bounds import acc, decoder_err, gamma, rel, rounded
from _cases import decoder_problem
from conftest import LOW_PRECISION, cpu_backends, rel_err

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
    # worst case of 13 products + 13 adds in any order: ~1.3e-6 in fp32, ~3e-15 in float64 here
    expected = dense64(v, i, W, b)
    assert rel_err(out, expected) <= rel(decoder_err(v, i, W, b), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_embedding_bag(backend):
    v, i, W, _ = decoder_problem(200, 32, 1000, 96, torch.float32)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W)
    bag = F.embedding_bag(i, W, per_sample_weights=v, mode="sum")
    # two fp32 sums of the same 32 products, each within E = gamma(33) * sum |terms| of the exact one:
    # |out - bag| <= 2 E and max |bag| >= M - E (M = max |exact|), so rel_err <= 2 r / (1 - r), r = E / M
    # (~7e-6 on this data)
    r = rel(decoder_err(v, i, W), dense64(v, i, W))
    assert rel_err(out, bag) <= 2 * r / (1 - r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(backend, dtype):
    """Every backend, ref included, against the float64 oracle on the same 16-bit inputs: at most one
    rounding of an fp32-accurate value, and within twice the fp32 reference's own error plus 2 * floor
    (the derivation is in test_topk_encode.py::test_low_precision_within_twice_reference_error)."""
    v, i, W, b = decoder_problem(64, 32, 500, 128, dtype)
    exact = dense64(v, i, W, b)
    floor = rel(decoder_err(v, i, W, b), exact)  # fp32 worst case of 32 products + 32 adds, ~3e-6
    with sk.use_backend("ref"):
        ref_lp = sparse_decode(v, i, W, b)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W, b)
    assert out.dtype == dtype
    got = rel_err(out, exact)
    assert got <= rounded(dtype, floor)
    assert got <= 2 * rel_err(ref_lp, exact) + 2 * floor


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_and_zero_padding(backend):
    W = torch.randn(10, 5, dtype=torch.float64)
    i = torch.tensor([[3, 3, 0], [9, 0, 0]])
    v = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W)
    # float64: 1 * W + 2 * W and 3 * W each round once (products by 1, 2 and 0.5 are exact), so they
    # differ by at most 2 u |3 W| ~ 4e-16 relative: far inside allclose's rtol 1e-5
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
    # fp32 worst case of 8 products + 8 adds (~8e-7 here); strides change the order, not the bound
    expected = dense64(v3, i3, W, b)
    assert rel_err(out, expected) <= rel(decoder_err(v3, i3, W, b), expected)
    assert torch.equal(out, out2)  # the same kernel on the same contiguous inputs: bitwise equal


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(0, 40), k=st.integers(0, 20), d_sae=st.integers(1, 120), d=st.integers(1, 70))
def test_fuzz(backend, n, k, d_sae, d):
    v, i, W, b = decoder_problem(n, k, d_sae, d, torch.float64, seed=n + k + d)
    with sk.use_backend(backend):
        out = sparse_decode(v, i, W, b)
    assert out.shape == (n, d)
    # float64 worst case, gamma(k + 1) * sum |terms|, whatever the cancellation of a small example
    expected = dense64(v, i, W, b)
    assert rel_err(out, expected) <= rel(decoder_err(v, i, W, b), expected)


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
    # Each gradient is a sum of products of the inputs, so the same backward on |inputs| and |G| gives
    # each entry's sum |terms|. Sum lengths: d = 40 for values, a feature's occurrences for W_dec, N = 77
    # for b_dec. Bound: gamma(n) in the accumulation dtype (plus the float64 side's own gamma(n)),
    # then one rounding to dtype (rel_err: ~3e-6 in fp32, 2^-8 + that in bf16, ~1e-15 in float64).
    a64 = [t.double().abs().requires_grad_() for t in (v, W, b)]
    (dense64(a64[0], i, a64[1], a64[2]) * G.to(dtype).double().abs()).sum().backward()
    lengths = (40, int(torch.bincount(i.reshape(-1)).max()), 77)
    for a, e, t, n in zip(args, d, a64, lengths):
        err = (gamma(n, acc(dtype)) + gamma(n, torch.float64)) * t.grad
        assert a.grad.dtype == dtype
        assert rel_err(a.grad, e.grad) <= rounded(dtype, rel(err, e.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    v, i, W, b = decoder_problem(7, 4, 12, 5, torch.float64)
    i[0, 1] = i[0, 0]  # a repeated feature in one row
    args = [t.clone().requires_grad_() for t in (v, W, b)]
    # torch's float64 defaults (eps 1e-6, atol 1e-5, rtol 1e-3); the op is linear in each argument, so
    # central differences are exact up to rounding, ~u / eps ~ 1e-10
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
