"""threshold_encode (JumpReLU / ReLU to an exact sparse code) on every backend vs float64."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.ops import threshold_encode

from _bounds import assert_threshold_decided, encoder_err, rel, rounded, threshold_decided
from _cases import encoder_problem, f64
from conftest import LOW_PRECISION, cpu_backends, rel_err

BACKENDS = cpu_backends("threshold_encode")


def pre64(x, W, b, b_dec=None):
    x, W, b, b_dec = f64(x, W, b, b_dec)
    return (x - b_dec if b_dec is not None else x) @ W + b


def as64(thr):
    return thr.double() if isinstance(thr, torch.Tensor) else torch.tensor(float(thr), dtype=torch.float64)


def dense64(x, W, b, thr, b_dec=None):
    """Independent oracle: dense pre and mask, float64."""
    pre = pre64(x, W, b, b_dec)
    return pre * (pre > as64(thr))


def decided(x, W, b, thr, b_dec=None):
    """The per-element rounding bound of pre (tests/_bounds.py), zeroed where the exact code is 0, after
    asserting that no pre-activation is within it of the threshold: then the support is exact."""
    err = encoder_err(x, W, b, b_dec)
    pre = pre64(x, W, b, b_dec)
    assert_threshold_decided(pre, as64(thr), err, x.dtype)
    return err * (pre > as64(thr))


def check_structure(out, d_sae):
    """Ascending indices on live slots, 0/0 padding, k = max L0."""
    rows = math.prod(out.shape[:-1])
    v, i = out.values.reshape(rows, out.k), out.indices.reshape(rows, out.k)
    l0 = out.l0().reshape(-1)
    assert out.k == (int(l0.max()) if l0.numel() else 0)
    for row in range(v.shape[0]):
        n = int(l0[row])
        assert bool((v[row, n:] == 0).all()) and bool((i[row, n:] == 0).all())
        assert bool((i[row, 1:n] > i[row, : n - 1]).all()) if n > 1 else True
        assert bool((i[row] < d_sae).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_feature", [True, False])
def test_matches_dense_oracle(backend, dtype, per_feature):
    # seed 1: the first with no fp32 pre-activation within its rounding bound of either threshold
    x, W, b, bd = encoder_problem(123, 40, 431, dtype, seed=1)
    thr = (torch.rand(431, dtype=torch.float64) * 0.8).to(dtype) if per_feature else 0.5
    err = decided(x, W, b, thr, bd)
    with sk.use_backend(backend):
        out = threshold_encode(x, W, b, thr, b_dec=bd)
    check_structure(out, 431)
    expected = dense64(x, W, b, thr, bd)
    assert torch.equal(out.l0(), (expected != 0).sum(-1))
    assert out.values.dtype == dtype
    # worst case of 40 products + 2 adds in any order: ~4e-6 in fp32, ~1e-14 in float64 on this data
    assert rel_err(out.to_dense(431), expected) <= rel(err, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(backend, dtype):
    """Every backend, ref included, against the float64 oracle on the same 16-bit inputs: at most one
    rounding of an fp32-accurate value, and within twice the fp32 reference's own error plus 2 * floor
    (the derivation is in test_topk_encode.py::test_low_precision_within_twice_reference_error)."""
    # seed 2: the first with no pre-activation within its fp32 rounding bound of 0.6, bf16 and fp16
    x, W, b, bd = encoder_problem(50, 64, 256, dtype, seed=2)
    err = decided(x, W, b, 0.6, bd)
    exact = dense64(x, W, b, 0.6, bd)
    floor = rel(err, exact)  # fp32 worst case of 64 products + 2 adds, ~8e-6 in rel_err units
    with sk.use_backend("ref"):
        ref_lp = threshold_encode(x, W, b, 0.6, b_dec=bd).to_dense(256)
    with sk.use_backend(backend):
        out = threshold_encode(x, W, b, 0.6, b_dec=bd)
    assert out.values.dtype == dtype
    # selection is made on fp32 pre-activations, decided above, so the support matches the exact one
    assert torch.equal(out.to_dense(256) != 0, exact != 0)
    got = rel_err(out.to_dense(256), exact)
    assert got <= rounded(dtype, floor)
    assert got <= 2 * rel_err(ref_lp, exact) + 2 * floor


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_fires_and_empty_batch(backend):
    x, W, b, _ = encoder_problem(4, 8, 30, torch.float32, b_dec=False)
    with sk.use_backend(backend):
        none = threshold_encode(x, W, b, 1e6)
        empty = threshold_encode(x[:0], W, b, 0.0)
        lead = threshold_encode(x.reshape(2, 2, 8), W, b, 0.0)
    assert none.shape == (4, 0) and empty.shape == (0, 0)
    assert lead.shape[:2] == (2, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_threshold_keeps_negative_pre(backend):
    # circuit-tracer JumpReLU: x * (x > theta) with no ReLU, so theta < 0 keeps negative values
    x, W, b, _ = encoder_problem(10, 8, 40, torch.float64, b_dec=False)
    err = decided(x, W, b, -0.2)
    with sk.use_backend(backend):
        out = threshold_encode(x, W, b, -0.2)
    assert (out.values < 0).any()
    # float64 worst case of 8 products + 1 add (~2e-15 relative here)
    expected = dense64(x, W, b, -0.2)
    assert rel_err(out.to_dense(40), expected) <= rel(err, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(0, 30), d_in=st.integers(1, 20), d_sae=st.integers(1, 150), t=st.floats(-1, 1.5))
def test_fuzz(backend, n, d_in, d_sae, t):
    x, W, b, bd = encoder_problem(n, d_in, d_sae, torch.float64, seed=n + 3 * d_sae)
    err = encoder_err(x, W, b, bd)
    pre = pre64(x, W, b, bd)
    # a float64 pre-activation within ~1e-15 of t (never seen) could not be compared exactly: skipped
    assume(threshold_decided(pre, t, err, torch.float64))
    with sk.use_backend(backend):
        out = threshold_encode(x, W, b, t, b_dec=bd)
    check_structure(out, d_sae)
    expected = dense64(x, W, b, t, bd)
    # float64 worst case, gamma(d_in + 2) * sum |terms| on the fired entries
    assert rel_err(out.to_dense(d_sae), expected) <= rel(err * (pre > t), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_dense_autograd(backend):
    x, W, b, bd = encoder_problem(19, 10, 60, torch.float64)
    thr = torch.rand(60, dtype=torch.float64) * 0.5
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    dense = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    R = torch.randn(19, 60, dtype=torch.float64)
    with sk.use_backend(backend):
        out = threshold_encode(params[0], params[1], params[2], thr, b_dec=params[3])
        (out.to_dense(60) * R).sum().backward()
    pre = (dense[0] - dense[3]) @ dense[1] + dense[2]
    (pre * (pre > thr) * R).sum().backward()
    # both sides fire on the same support (every |pre - thr| here is > 8e-4, far beyond float64
    # rounding). Each gradient entry sums at most N * d_sae = 1140 products: gamma(1140) ~ 1.3e-13 per
    # unit of sum |terms|, which is at most 7.7x the largest entry (db_dec): |diff| <= ~2e-12 < 1e-10
    for p, d in zip(params, dense):
        assert rel_err(p.grad, d.grad) < 1e-10


def test_opcheck():
    x, W, b, bd = encoder_problem(9, 6, 30, torch.float32)
    thr = torch.full((30,), 0.1)
    torch.library.opcheck(
        torch.ops.sparsekern.threshold_encode.default,
        (x, W, b, thr, bd),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
