"""topk_encode on every available backend, pinned to the float64 reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.ops import topk_encode

from _cases import encoder_problem, f64
from conftest import LOW_PRECISION, cpu_backends, rel_err, tol_for

BACKENDS = cpu_backends("topk_encode")


def ref64(x, W, b, k, b_dec=None, relu=True):
    with sk.use_backend("ref"):
        x, W, b, b_dec = f64(x, W, b, b_dec)
        return topk_encode(x, W, b, k, b_dec=b_dec, relu=relu)


def dense_topk64(x, W, b, k, b_dec=None):
    """Independent oracle: full dense pre + stable sort (ties -> lower index)."""
    x, W, b, b_dec = f64(x, W, b, b_dec)
    pre = (x - b_dec if b_dec is not None else x) @ W + b
    v, i = torch.sort(pre, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("b_dec", [True, False])
def test_matches_reference(backend, dtype, relu, b_dec):
    x, W, b, bd = encoder_problem(97, 48, 431, dtype, b_dec=b_dec)
    with sk.use_backend(backend):
        out = topk_encode(x, W, b, 17, b_dec=bd, relu=relu)
    v, i = dense_topk64(x, W, b, 17, bd)
    assert torch.equal(out.indices, i)
    assert out.values.dtype == dtype
    assert rel_err(out.values, v.clamp_min(0) if relu else v) < tol_for(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_twice_reference_error(backend, dtype):
    x, W, b, bd = encoder_problem(64, 96, 300, dtype)
    exact = ref64(x, W, b, 24, bd)
    with sk.use_backend("ref"):
        ref_lp = topk_encode(x, W, b, 24, b_dec=bd)
    with sk.use_backend(backend):
        out = topk_encode(x, W, b, 24, b_dec=bd)
    assert out.values.dtype == dtype
    assert torch.equal(out.indices, exact.indices)
    ref_err = rel_err(ref_lp.values, exact.values)
    assert rel_err(out.values, exact.values) <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_index(backend):
    # columns 3, 7, 11 are identical, as are 20 and 21: equal pre-activations
    x, W, b, _ = encoder_problem(5, 8, 32, torch.float32, b_dec=False)
    for dup in (7, 11):
        W[:, dup] = W[:, 3]
        b[dup] = b[3]
    W[:, 21], b[21] = W[:, 20], b[20]
    b[3] = b[20] = 50.0  # make the tied features the top ones
    b[7] = b[11] = 50.0
    b[21] = 50.0
    x = x * 1e-3
    with sk.use_backend(backend):
        out = topk_encode(x, W, b, 4, relu=False)
    v, i = dense_topk64(x, W, b, 4)
    assert torch.equal(out.indices, i)
    # among exactly-equal values the lower index comes first
    for row_v, row_i in zip(out.values, out.indices):
        for a in range(3):
            if row_v[a] == row_v[a + 1]:
                assert row_i[a] < row_i[a + 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_row_keeps_first_k(backend):
    x = torch.zeros(3, 4)
    W = torch.zeros(4, 50)
    b = torch.zeros(50)
    with sk.use_backend(backend):
        out = topk_encode(x, W, b, 6)
    assert torch.equal(out.indices, torch.arange(6).expand(3, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous(backend):
    x, W, b, bd = encoder_problem(0, 40, 150, torch.float32, lead=(3, 7))
    xs = torch.randn(3, 7, 80)[..., ::2]  # strided last dim
    xs.copy_(x)
    Wt = W.t().contiguous().t()  # same values, column-major strides
    with sk.use_backend(backend):
        out = topk_encode(xs, Wt, b, 9, b_dec=bd)
    v, i = dense_topk64(x, W, b, 9, bd)
    assert out.shape == (3, 7, 9)
    assert torch.equal(out.indices, i)
    assert rel_err(out.values, v.clamp_min(0)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    n=st.integers(0, 40),
    d_in=st.integers(1, 33),
    d_sae=st.integers(1, 160),
    data=st.data(),
)
def test_fuzz_shapes(backend, n, d_in, d_sae, data):
    k = data.draw(st.integers(1, d_sae))
    relu = data.draw(st.booleans())
    x, W, b, bd = encoder_problem(n, d_in, d_sae, torch.float64, seed=n * 7 + d_sae)
    with sk.use_backend(backend):
        out = topk_encode(x, W, b, k, b_dec=bd, relu=relu)
    v, i = dense_topk64(x, W, b, k, bd)
    assert out.shape == (n, k)
    assert torch.equal(out.indices, i)
    assert rel_err(out.values, v.clamp_min(0) if relu else v) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [True, False])
def test_gradients_match_dense_autograd(backend, relu):
    x, W, b, bd = encoder_problem(23, 12, 70, torch.float64)
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    R = torch.randn(23, 5, dtype=torch.float64)
    with sk.use_backend(backend):
        out = topk_encode(params[0], params[1], params[2], 5, b_dec=params[3], relu=relu)
        (out.values * R).sum().backward()
    got = [p.grad for p in params]

    dense = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    pre = (dense[0] - dense[3]) @ dense[1] + dense[2]
    kept = pre.gather(1, out.indices)
    kept = kept.relu() if relu else kept
    (kept * R).sum().backward()
    for g, d in zip(got, dense):
        assert rel_err(g, d.grad) < 1e-10


def test_gradcheck_float64():
    x, W, b, bd = encoder_problem(6, 5, 20, torch.float64)
    args = [t.clone().requires_grad_() for t in (x, W, b, bd)]

    def f(x, W, b, bd):
        return topk_encode(x, W, b, 4, b_dec=bd, relu=False).values

    assert torch.autograd.gradcheck(f, args)


def test_opcheck():
    x, W, b, bd = encoder_problem(9, 6, 30, torch.float32)
    for args in [(x, W, b, bd, 5, True), (x, W, b, None, 30, False)]:
        torch.library.opcheck(torch.ops.sparsekern.topk_encode.default, args)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.sparsekern.topk_encode.default, (xg, W, b, bd, 3, True))
