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
from sparsekern import _backend, ops  # noqa: E402
from sparsekern import triton as sk_triton  # noqa: E402
from sparsekern.triton import encode_grad as eg  # noqa: E402

from _cases import encoder_problem  # noqa: E402
from conftest import rel_err  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}


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
    assert rel_err(out, dx64(grad, idx, W)) < TOL[dtype]
    if n > 1 and k > 1:
        assert bool((out[1] == 0).all())


def test_input_grad_chunked_copy_and_layouts(monkeypatch):
    monkeypatch.setattr(eg, "CHUNK_BYTES", 1)  # 32-wide d_in chunks: 130 = 4 x 32 + 2
    x, W, grad, idx = problem(5, 4, 130, 60, torch.float32)
    exp = dx64(grad, idx, W)
    assert rel_err(eg.encode_backward_input(grad, idx, W, transpose=True), exp) < 1e-5
    Wc = W.t().contiguous().t()  # column-major W_enc: gathered in place, already coalesced
    assert rel_err(eg.encode_backward_input(grad, idx, Wc), exp) < 1e-5
    gs = torch.zeros(5, 8)[:, ::2]  # non-contiguous g and indices
    gs.copy_(grad)
    ids = torch.zeros(5, 8, dtype=torch.long)[:, 1::2]
    ids.copy_(idx)
    assert rel_err(eg.encode_backward_input(gs, ids, W, transpose=True), exp) < 1e-5


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
    assert rel_err(out, exp) < TOL[dtype]
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
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    sk_triton.CALLS.clear()
    with sk.use_backend("triton"):
        assert _backend.select("encode_backward_input", x.device)[0] == "triton"
        if op == "topk":
            out = ops.topk_encode(*params[:3], 6, b_dec=params[3], relu=False)
            vals, idx = out.values, out.indices
        else:
            out = ops.threshold_encode(*params[:3], torch.full((90,), 0.1), b_dec=params[3])
            vals, idx = out.values, out.indices
        R = torch.randn(vals.shape)
        (vals * R).sum().backward()
    assert sk_triton.CALLS["encode_backward_input"] == 1 and sk_triton.CALLS["encode_backward_weight"] == 1
    d = [t.double().clone().requires_grad_() for t in (x, W, b, bd)]
    pre = ((d[0] - d[3]) @ d[1] + d[2]).gather(1, idx)
    kept = (vals != 0).double() if op == "threshold" else torch.ones_like(pre)  # padding slots hold 0
    (pre * kept * R.double()).sum().backward()
    for p, e in zip(params, d):
        assert rel_err(p.grad, e.grad) < 1e-5
    assert params[1].grad.is_contiguous()
