"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, pinned to the float64 reference.

Not collected by the normal run (no ``test_`` prefix): ``tests/test_triton.py`` runs this file in a
subprocess with ``TRITON_INTERPRET=1`` set before triton is imported. By hand:
``TRITON_INTERPRET=1 python -m pytest tests/triton_interp_cases.py -q -p no:cacheprovider``.
Shapes are tiny on purpose: every Triton program runs in Python here.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

import sparsekern as sk  # noqa: E402
from sparsekern import backends, ops  # noqa: E402
from sparsekern import triton as sk_triton  # noqa: E402
from sparsekern.triton import decode as tdec  # noqa: E402
from sparsekern.triton import encode as tenc  # noqa: E402

from _bounds import (acc, assert_threshold_decided, assert_topk_decided, decoder_err,  # noqa: E402
                     encoder_err, gamma, rel, rounded)
from _cases import decoder_problem, encoder_problem, f64  # noqa: E402
from conftest import rel_err  # noqa: E402

# Tolerances are the worst-case rounding bounds of tests/_bounds.py (any summation order, so the
# interpreter's numpy and a GPU's tiles alike); exact index / support comparisons run on data asserted
# to be decided by them.

LOW = (torch.bfloat16, torch.float16)


def dense_pre64(x, W, b, bd=None):
    x, W, b, bd = f64(x, W, b, bd)
    return (x - bd if bd is not None else x) @ W + b


def dense_topk64(x, W, b, k, bd=None):
    """Independent oracle: dense pre + stable sort (ties -> lower index)."""
    v, i = torch.sort(dense_pre64(x, W, b, bd), dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


def decided(x, W, b, k, bd=None):
    """The rounding bound of every pre-activation, after asserting the data's top-k is decided by it."""
    err = encoder_err(x, W, b, bd)
    assert_topk_decided(dense_pre64(x, W, b, bd), err, k)
    return err


# ---- topk_encode ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b_dec", [True, False])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_topk_kernel_matches_oracle(dtype, b_dec, splits):
    x, W, b, bd = encoder_problem(13, 20, 150, dtype, b_dec=b_dec)
    err = decided(x, W, b, 7, bd)
    v, i = tenc.topk_encode(x, W, b, bd, 7, False, splits=splits)
    ev, ei = dense_topk64(x, W, b, 7, bd)
    assert i.dtype == torch.int64 and torch.equal(i, ei)
    assert v.dtype == dtype
    # gamma(22) * sum |terms| at the kept entries: ~3e-6 in fp32, ~6e-15 in float64 here
    assert rel_err(v, ev) <= rel(err.gather(1, ei), ev)


@pytest.mark.parametrize("relu", [True, False])
def test_topk_public_op_noncontiguous_and_leading_dims(relu):
    x, W, b, bd = encoder_problem(0, 24, 200, torch.float32, lead=(2, 5))
    xs = torch.zeros(2, 5, 48)[..., ::2]
    xs.copy_(x)
    Wt = W.t().contiguous().t()  # column-major W_enc
    with sk.use_backend("triton"):
        out = ops.topk_encode(xs, Wt, b, 8, b_dec=bd, relu=relu)
    ev, ei = dense_topk64(x, W, b, 8, bd)
    err = decided(x, W, b, 8, bd)
    assert out.shape == (2, 5, 8) and torch.equal(out.indices, ei)
    expected = ev.clamp_min(0) if relu else ev
    assert rel_err(out.values, expected) <= rel(err.gather(-1, ei), expected)  # fp32, ~4e-6


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("b_dec", [True, False])  # True: b_dec folded into the bias (fp32)
def test_topk_low_precision_within_twice_reference_error(dtype, b_dec):
    # against the float64 oracle on the same 16-bit inputs: one rounding of an fp32-accurate value, and
    # within twice the fp32 reference's own error plus 2 * floor (derivation:
    # tests/test_topk_encode.py::test_low_precision_within_twice_reference_error)
    x, W, b, bd = encoder_problem(16, 32, 256, dtype, b_dec=b_dec)
    err = decided(x, W, b, 8, bd)
    ev, ei = dense_topk64(x, W, b, 8, bd)
    floor = rel(err.gather(1, ei), ev)
    with sk.use_backend("ref"):
        ref_lp = ops.topk_encode(x, W, b, 8, b_dec=bd, relu=False)
    with sk.use_backend("triton"):
        out = ops.topk_encode(x, W, b, 8, b_dec=bd, relu=False)
    assert out.values.dtype == dtype
    assert torch.equal(out.indices, ei)
    got = rel_err(out.values, ev)
    assert got <= rounded(dtype, floor)
    assert got <= 2 * rel_err(ref_lp.values, ev) + 2 * floor


@pytest.mark.parametrize("splits", [1, 3])
def test_topk_ties_go_to_lower_index_within_and_across_splits(splits):
    # columns 3, 40 (same split, other tile), 70 and 140 (other splits) are identical, as are 20/21.
    # Dyadic inputs (x on a 2^-10 grid below 2^-4, the tied W columns on a 2^-4 grid below 2, bias 8)
    # make the tied pre-activations exact in fp32 (multiples of 2^-14 below 16: 18 bits) in any order.
    x, W, b, _ = encoder_problem(5, 8, 150, torch.float32, b_dec=False)
    x = (x * 16).round().clamp(-63, 63) / 2**10
    for col in (3, 20):
        W[:, col] = (W[:, col] * 16).round().clamp(-31, 31) / 16
    for dup in (40, 70, 140):
        W[:, dup] = W[:, 3]
    W[:, 21] = W[:, 20]
    b[[3, 40, 70, 140, 20, 21]] = 8.0
    v, i = tenc.topk_encode(x, W, b, None, 6, False, splits=splits)
    ev, ei = dense_topk64(x, W, b, 6)
    assert torch.equal(i, ei)
    for row_v, row_i in zip(v, i):
        for a in range(5):
            if row_v[a] == row_v[a + 1]:
                assert row_i[a] < row_i[a + 1]


def test_topk_all_equal_and_k_equals_d_sae():
    x, W, b = torch.zeros(3, 4), torch.zeros(4, 50), torch.zeros(50)
    v, i = tenc.topk_encode(x, W, b, None, 6, True, splits=2)
    assert torch.equal(i, torch.arange(6).expand(3, 6))
    x, W, b, bd = encoder_problem(4, 6, 20, torch.float32)
    err = decided(x, W, b, 20, bd)
    v, i = tenc.topk_encode(x, W, b, bd, 20, False, splits=2)
    ev, ei = dense_topk64(x, W, b, 20, bd)
    assert torch.equal(i, ei) and rel_err(v, ev) <= rel(err.gather(1, ei), ev)  # fp32, gamma(8)
    v, i = tenc.topk_encode(x[:0], W, b, bd, 3, True)
    assert v.shape == (0, 3) and i.shape == (0, 3)


@pytest.mark.parametrize("splits", [1, 3])
def test_topk_minus_inf_pre_activations_rank_last_by_index(splits):
    # only 3 finite features per row: the rest of the top 5 are -inf, lowest indices first
    x, W, b, _ = encoder_problem(4, 8, 150, torch.float32, b_dec=False)
    b[:] = float("-inf")
    b[[140, 7, 77]] = 0.0
    live = [7, 77, 140]
    err = decided(x, W[:, live], b[live], 2)  # the 3 finite ones are decided; the -inf rank by index
    v, i = tenc.topk_encode(x, W, b, None, 5, False, splits=splits)
    ev, ei = dense_topk64(x, W, b, 5)
    assert torch.equal(i, ei)
    kept = ei[:, :3].clone().apply_(live.index)  # column of each kept feature within `live`
    assert torch.equal(v.isinf(), ev.isinf()) and rel_err(v[:, :3], ev[:, :3]) <= rel(err.gather(1, kept),
                                                                                        ev[:, :3])


def test_topk_large_k_falls_back_to_reference_with_warning():
    x, W, b, bd = encoder_problem(3, 4, tenc.MAX_K + 8, torch.float32)
    err = decided(x, W, b, tenc.MAX_K + 1, bd)
    with pytest.warns(RuntimeWarning, match="reference"):
        v, i = tenc.topk_encode(x, W, b, bd, tenc.MAX_K + 1, True)
    ev, ei = dense_topk64(x, W, b, tenc.MAX_K + 1, bd)
    expected = ev.clamp_min(0)
    assert torch.equal(i, ei) and rel_err(v, expected) <= rel(err.gather(1, ei), expected)  # gamma(6)


@pytest.mark.parametrize("relu", [True, False])
def test_topk_gradients_through_triton_decode_kernels(relu):
    x, W, b, bd = encoder_problem(9, 12, 70, torch.float64)
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    R = torch.randn(9, 5, dtype=torch.float64)
    with sk.use_backend("triton"):
        out = ops.topk_encode(params[0], params[1], params[2], 5, b_dec=params[3], relu=relu)
        (out.values * R).sum().backward()
    dense = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    kept = ((dense[0] - dense[3]) @ dense[1] + dense[2]).gather(1, out.indices)
    ((kept.relu() if relu else kept) * R).sum().backward()
    # float64: each entry sums at most N * k = 45 products, gamma(45) ~ 5e-15 per unit of sum |terms|
    # (a few times the largest entry for these gaussians): ~1e-13, far inside 1e-10
    for p, d in zip(params, dense):
        assert rel_err(p.grad, d.grad) < 1e-10


# ---- threshold_encode ----------------------------------------------------------------------
def check_threshold(values, indices, l0, expected_dense, d_sae, tol):
    exp_l0 = (expected_dense != 0).sum(-1)
    assert torch.equal(l0, exp_l0)  # exact per-row counts
    assert values.shape[1] == (int(exp_l0.max()) if exp_l0.numel() else 0)
    for r in range(values.shape[0]):
        n = int(l0[r])
        assert bool((values[r, n:] == 0).all()) and bool((indices[r, n:] == 0).all())
        assert bool((indices[r, 1:n] > indices[r, : n - 1]).all())
    dense = torch.zeros(values.shape[0], d_sae, dtype=torch.float64)
    live = torch.arange(values.shape[1]) < l0[:, None]
    rows = torch.arange(values.shape[0])[:, None].expand_as(indices)
    dense[rows[live], indices[live]] = values[live].double()
    assert rel_err(dense, expected_dense) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_threshold_kernel_exact_counts(dtype, per_feature, splits):
    x, W, b, bd = encoder_problem(14, 20, 150, dtype)
    thr = torch.rand(150, dtype=torch.float64) * 0.8 if per_feature else torch.full((150,), 0.5)
    thr = thr.to(dtype)
    pre = dense_pre64(x, W, b, bd)
    err = encoder_err(x, W, b, bd)
    assert_threshold_decided(pre, thr.double(), err, dtype)
    v, i, l0 = tenc.threshold_encode(x, W, b, thr, bd, splits=splits)
    fire = pre > thr.double()
    # gamma(22) * sum |terms| on the fired entries: ~3e-6 in fp32, ~6e-15 in float64 here
    check_threshold(v, i, l0, pre * fire, 150, rel(err * fire, pre * fire) * (1 + 1e-9))
    assert v.dtype == dtype and i.dtype == torch.int64 and l0.dtype == torch.int64


def test_threshold_public_op_negative_threshold_nothing_fires_empty():
    x, W, b, _ = encoder_problem(6, 8, 40, torch.float32, b_dec=False)
    with sk.use_backend("triton"):
        neg = ops.threshold_encode(x, W, b, -0.2)
        none = ops.threshold_encode(x, W, b, 1e6)
        empty = ops.threshold_encode(x[:0], W, b, 0.0)
    pre = dense_pre64(x, W, b)
    err = encoder_err(x, W, b, None)
    assert_threshold_decided(pre, -0.2, err, x.dtype)
    assert (neg.values < 0).any()
    expected = pre * (pre > -0.2)
    assert rel_err(neg.to_dense(40), expected) <= rel(err * (pre > -0.2), expected)  # fp32, gamma(10)
    assert none.shape == (6, 0) and empty.shape == (0, 0)


@pytest.mark.parametrize("dtype", LOW)
def test_threshold_low_precision(dtype):
    # the float64 oracle on the same 16-bit inputs; bounds as in test_topk_low_precision_... above
    x, W, b, bd = encoder_problem(12, 32, 200, dtype)
    pre = dense_pre64(x, W, b, bd)
    err = encoder_err(x, W, b, bd)
    assert_threshold_decided(pre, 0.6, err, dtype)
    exact = pre * (pre > 0.6)
    floor = rel(err * (pre > 0.6), exact)
    with sk.use_backend("ref"):
        ref_lp = ops.threshold_encode(x, W, b, 0.6, b_dec=bd).to_dense(200)
    with sk.use_backend("triton"):
        out = ops.threshold_encode(x, W, b, 0.6, b_dec=bd)
    assert out.values.dtype == dtype
    assert torch.equal(out.to_dense(200) != 0, exact != 0)
    got = rel_err(out.to_dense(200), exact)
    assert got <= rounded(dtype, floor)
    assert got <= 2 * rel_err(ref_lp, exact) + 2 * floor


def test_threshold_gradients():
    x, W, b, bd = encoder_problem(8, 10, 60, torch.float64)
    thr = torch.rand(60, dtype=torch.float64) * 0.5
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    dense = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    R = torch.randn(8, 60, dtype=torch.float64)
    with sk.use_backend("triton"):
        out = ops.threshold_encode(params[0], params[1], params[2], thr, b_dec=params[3])
        (out.to_dense(60) * R).sum().backward()
    pre = (dense[0] - dense[3]) @ dense[1] + dense[2]
    assert_threshold_decided(pre.detach(), thr, encoder_err(x, W, b, bd), x.dtype)  # same support
    (pre * (pre > thr) * R).sum().backward()
    # float64: each entry sums at most N * d_sae = 480 products, gamma(480) ~ 5e-14 per unit of
    # sum |terms| (< 10x the largest entry here): ~1e-12, far inside 1e-10
    for p, d in zip(params, dense):
        assert rel_err(p.grad, d.grad) < 1e-10


# ---- sparse_decode -------------------------------------------------------------------------
def dense_decode64(values, indices, W, b=None):
    out = (values.double()[..., None] * W.double()[indices]).sum(-2)
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decode_kernels_match_float64(dtype):
    v, i, W, b = decoder_problem(12, 7, 90, 40, dtype)
    i[0, 1] = i[0, 0]  # repeated feature in a row
    i[3, :] = 5  # one hot feature: a long segment in the weight grad
    G = torch.randn(12, 40, dtype=torch.float64).to(dtype)
    Wt = W.t().contiguous().t()  # column-major W_dec (the encoder backward passes W_enc.T)
    got = [
        tdec.sparse_decode(v, i, W, b),
        tdec.sparse_decode(v, i, Wt, None),
        tdec.sparse_decode_backward_values(G, i, Wt),
        tdec.sparse_decode_backward_weight(G, v, i, 90),
    ]
    v64, W64, G64 = v.double(), W.double(), G.double()

    def exact(v64, W64, G64, b):
        return [
            dense_decode64(v64, i, W64, b),
            dense_decode64(v64, i, W64),
            torch.einsum("nkd,nd->nk", W64[i], G64),
            torch.zeros(90, 40, dtype=torch.float64).index_add_(
                0, i.reshape(-1), (v64[..., None] * G64[:, None]).reshape(-1, 40)
            ),
        ]

    expected = exact(v64, W64, G64, b)
    # worst case per output in the accumulation dtype: gamma(n) * sum |terms| (the same sums on |inputs|),
    # n = k + 1, k, d = 40, and a feature's occurrences (the hot one: 13); 16-bit outputs then round
    # once (fp32 accumulation: the output rounding 2^-8, not k times that). ~1e-6 in fp32 here.
    terms = exact(v64.abs(), W64.abs(), G64.abs(), b.abs())
    lengths = (8, 7, 40, int(torch.bincount(i.reshape(-1)).max()))
    for a, e, t, n in zip(got, expected, terms, lengths):
        assert a.dtype == dtype
        assert rel_err(a, e) <= rounded(dtype, rel(gamma(n, acc(dtype)) * t, e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_public_backward_matches_dense_autograd(dtype):
    v, i, W, b = decoder_problem(10, 6, 60, 24, dtype)
    G = torch.randn(10, 24, dtype=torch.float64).to(dtype)
    args = [t.clone().requires_grad_() for t in (v, W, b)]
    with sk.use_backend("triton"):
        out = ops.sparse_decode(args[0], i, args[1], args[2])
        (out * G).sum().backward()
    d = [t.double().clone().requires_grad_() for t in (v, W, b)]
    (dense_decode64(d[0], i, d[1], d[2]) * G.double()).sum().backward()
    # as tests/test_sparse_decode.py::test_backward_matches_dense_autograd: gamma(n) * sum |terms| (the
    # backward on |inputs|), n = d, a feature's occurrences, N; then one rounding to dtype
    a64 = [t.double().abs().requires_grad_() for t in (v, W, b)]
    (dense_decode64(a64[0], i, a64[1], a64[2]) * G.double().abs()).sum().backward()
    expected = dense_decode64(v, i, W, b)
    assert rel_err(out.detach(), expected) <= rounded(dtype, rel(decoder_err(v, i, W, b), expected))
    lengths = (24, int(torch.bincount(i.reshape(-1)).max()), 10)
    for a, e, t, n in zip(args, d, a64, lengths):
        bound = rounded(dtype, rel(gamma(n, acc(dtype)) * t.grad, e.grad))
        assert a.grad.dtype == dtype and rel_err(a.grad, e.grad) <= bound


def test_decode_edge_shapes():
    v, i, W, b = decoder_problem(4, 0, 10, 6, torch.float32)
    assert torch.equal(tdec.sparse_decode(v, i, W, b), b.expand(4, 6))
    assert tdec.sparse_decode_backward_values(torch.randn(4, 6), i, W).shape == (4, 0)
    assert not tdec.sparse_decode_backward_weight(torch.randn(4, 6), v, i, 10).any()
    v, i, W, b = decoder_problem(0, 3, 10, 6, torch.float32)
    assert tdec.sparse_decode(v, i, W, b).shape == (0, 6)


# ---- dispatch ------------------------------------------------------------------------------
def test_dispatch_env_routes_public_ops_to_triton(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "triton")
    ops_names = ["topk_encode", "threshold_encode", "sparse_decode",
                 "sparse_decode_backward_values", "sparse_decode_backward_weight"]
    for op in ops_names:
        assert backends.select(op, torch.device("cpu"))[0] == "triton"
    sk_triton.CALLS.clear()
    x, W, b, bd = encoder_problem(6, 8, 40, torch.float32)
    Wd = torch.randn(40, 8, requires_grad=True)
    acts = ops.topk_encode(x, W, b, 4, b_dec=bd)
    ops.threshold_encode(x, W, b, 0.1, b_dec=bd)
    values = acts.values.clone().requires_grad_()
    ops.sparse_decode(values, acts.indices, Wd).sum().backward()
    assert all(sk_triton.CALLS[op] == 1 for op in ops_names), dict(sk_triton.CALLS)


def test_dispatch_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    assert "triton" in backends.implementations("topk_encode", "cpu")
    for op in ["topk_encode", "threshold_encode", "sparse_decode"]:
        assert backends.select(op, torch.device("cpu"))[0] in ("cpp", "ref")
