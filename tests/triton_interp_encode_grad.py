"""The encoder-backward Triton kernels (``sparsekern/triton/encode_grad.py``) under TRITON_INTERPRET=1,
pinned to float64 references. Run by ``tests/test_triton.py`` in a child process; by hand:
``TRITON_INTERPRET=1 python -m pytest tests/triton_interp_encode_grad.py -q -p no:cacheprovider``."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

import sparsekern as sk  # noqa: E402
from sparsekern import backends, ops  # noqa: E402
from sparsekern import triton as sk_triton  # noqa: E402
from sparsekern.triton import encode_grad as eg  # noqa: E402

from _bounds import acc, assert_threshold_decided, assert_topk_decided, encoder_err, gamma, rel  # noqa: E402
from _bounds import rounded  # noqa: E402
from _cases import encoder_problem  # noqa: E402
from conftest import rel_err  # noqa: E402

# Tolerances: the worst case of a sum of n products in the accumulation dtype, in any order (tests/
# _bounds.py), gamma(n) * sum |terms| -- the same sums on |inputs| -- then one rounding of 16-bit outputs.
# n = k for the input gradient, a feature's occurrences (+ the rounding of x - b_dec) for the weight's.


def tol(dtype, n, terms, exact):
    return rounded(dtype, rel(gamma(n, acc(dtype)) * terms, exact))


def problem(n, k, d_in, d_sae, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, d_sae, (n, k), generator=g)
    if n > 1 and k > 1:
        idx[0] = idx[0, 0]  # the same feature in every slot of a row
        grad[1] = 0  # a row that passes no gradient
    if n > 2:
        idx[2:, 0] = 3  # a hot feature: one long segment for the weight gradient
    return x, W, grad, idx


def dx64(grad, idx, W):
    return torch.einsum("nk,dnk->nd", grad.double(), W.double()[:, idx])


def dW64(x, grad, idx, d_sae):
    n, k = idx.shape
    contrib = x.double()[:, :, None] * grad.double()[:, None, :]  # [N, d_in, K]
    return torch.zeros(x.shape[1], d_sae, dtype=torch.float64).index_add_(
        1, idx.reshape(-1), contrib.permute(1, 0, 2).reshape(x.shape[1], n * k))


SHAPES = [(6, 1, 7, 40), (9, 5, 33, 50), (4, 3, 130, 20), (3, 17, 19, 300)]  # K 1, odd d_in, K > BK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("transpose", [True, False, None])
def test_input_grad_matches_float64(dtype, shape, transpose):
    n, k, d_in, d_sae = shape
    x, W, grad, idx = problem(n, k, d_in, d_sae, dtype)
    out = eg.encode_backward_input(grad, idx, W, transpose=transpose)
    assert out.dtype == dtype and out.shape == (n, d_in) and out.is_contiguous()
    exp = dx64(grad, idx, W)
    assert rel_err(out, exp) <= tol(dtype, k, dx64(grad.abs(), idx, W.abs()), exp)
    if n > 1 and k > 1:
        assert bool((out[1] == 0).all())


def test_input_grad_chunked_copy_and_layouts(monkeypatch):
    monkeypatch.setattr(eg, "CHUNK_BYTES", 1)  # 32-wide d_in chunks: 130 = 4 x 32 + 2
    x, W, grad, idx = problem(5, 4, 130, 60, torch.float32)
    exp = dx64(grad, idx, W)
    bound = tol(torch.float32, 4, dx64(grad.abs(), idx, W.abs()), exp)  # fp32, gamma(4): ~2e-7
    assert rel_err(eg.encode_backward_input(grad, idx, W, transpose=True), exp) <= bound
    Wc = W.t().contiguous().t()  # column-major W_enc: gathered in place, already coalesced
    assert rel_err(eg.encode_backward_input(grad, idx, Wc), exp) <= bound
    gs = torch.zeros(5, 8)[:, ::2]  # non-contiguous g and indices
    gs.copy_(grad)
    ids = torch.zeros(5, 8, dtype=torch.long)[:, 1::2]
    ids.copy_(idx)
    assert rel_err(eg.encode_backward_input(gs, ids, W, transpose=True), exp) <= bound


def test_transposed_copy_rule():
    assert eg.use_transposed_copy(16384 * 32, 24576, 4) and eg.use_transposed_copy(16384 * 32, 24576, 2)
    assert not eg.use_transposed_copy(256 * 32, 2**20, 4)  # the d_sae 2^20 scale case gathers in place
    assert not eg.use_transposed_copy(32, 24576, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("hot", [128, 2], ids=["hot128", "hot2"])  # hot2: most features take the hot kernel
def test_weight_grad_matches_float64(dtype, shape, hot, monkeypatch):
    monkeypatch.setattr(eg, "HOT_SLOTS", hot)
    n, k, d_in, d_sae = shape
    x, W, grad, idx = problem(n, k, d_in, d_sae, dtype)
    out = eg.encode_backward_weight(x, grad, idx, d_sae)
    assert out.dtype == dtype and out.shape == (d_in, d_sae) and out.is_contiguous()
    exp = dW64(x, grad, idx, d_sae)
    occ = int(torch.bincount(idx.reshape(-1)).max())
    assert rel_err(out, exp) <= tol(dtype, occ, dW64(x.abs(), grad.abs(), idx, d_sae), exp)
    unused = torch.ones(d_sae, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert bool((out[:, unused] == 0).all())


def test_empty_problems():
    x, W, grad, idx = problem(3, 2, 9, 20, torch.float32)
    assert eg.encode_backward_input(grad[:0], idx[:0], W).shape == (0, 9)
    assert bool((eg.encode_backward_input(grad[:, :0], idx[:, :0], W) == 0).all())
    assert bool((eg.encode_backward_weight(x[:0], grad[:0], idx[:0], 20) == 0).all())


@pytest.mark.parametrize("op", ["topk", "threshold"])
def test_public_encoders_backward_run_here(op):
    x, W, b, bd = encoder_problem(11, 37, 90, torch.float32)
    # the kept features (and their support) are decided, so the gradients are of the exact selection
    err = encoder_err(x, W, b, bd)
    pre64 = (x.double() - bd.double()) @ W.double() + b.double()
    if op == "topk":
        assert_topk_decided(pre64, err, 6)
    else:
        assert_threshold_decided(pre64, 0.1, err, x.dtype)
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    sk_triton.CALLS.clear()
    with sk.use_backend("triton"):
        assert backends.select("encode_backward_input", x.device)[0] == "triton"
        if op == "topk":
            out = ops.topk_encode(*params[:3], 6, b_dec=params[3], relu=False)
            vals, idx = out.values, out.indices
        else:
            out = ops.threshold_encode(*params[:3], torch.full((90,), 0.1), b_dec=params[3])
            vals, idx = out.values, out.indices
        R = torch.randn(vals.shape)
        (vals * R).sum().backward()
    assert sk_triton.CALLS["encode_backward_input"] == 1 and sk_triton.CALLS["encode_backward_weight"] == 1
    kept = (vals != 0).double() if op == "threshold" else torch.ones(vals.shape, dtype=torch.float64)

    def grads(x, W, b, bd, R):
        d = [t.double().clone().requires_grad_() for t in (x, W, b, bd)]
        pre = ((d[0] - d[3]) @ d[1] + d[2]).gather(1, idx)
        (pre * kept * R.double()).sum().backward()  # padding slots (value 0) pass nothing
        return [t.grad for t in d]

    # fp32 worst case per gradient: n = K slots for dx, a feature's occurrences (+1: x - b_dec) for
    # dW_enc and db_enc, K + N for db_dec = -dx.sum(0); sum |terms| from the backward on |inputs|
    # (b_dec enters as x - b_dec, so as -|b_dec|; abs of its gradient)
    K, occ = vals.shape[1], int(torch.bincount(idx[kept.bool()]).max())
    terms = grads(x.abs(), W.abs(), b.abs(), -bd.abs(), R.abs())
    for p, e, t, n in zip(params, grads(x, W, b, bd, R), terms, (K, occ + 1, occ, K + 11)):
        assert rel_err(p.grad, e) <= rel(gamma(n, torch.float32) * t.abs(), e)
    assert params[1].grad.is_contiguous()
