"""Triton backend on a CUDA device at realistic shapes, pinned to float64 references on the GPU.

Skips cleanly without CUDA or triton. At these sizes a few pre-activations are closer than fp32
rounding to their neighbour (or to the threshold), so index/support comparisons allow swaps only
between entries whose float64 values are within ``NEAR`` of each other; everything else is exact.

Tolerances follow tests/test_gpu_kernels.py's module docstring: the worst-case bound of tests/_bounds.py
is 2e-4..1e-3 of max |pre| at d_in 768..2304, so fp32 tolerances use the probabilistic model of
rounding (independent mean-zero roundings, Higham & Mary 2019), under which the encoders' 6-sigma
error is <= 1.5e-6 of max |pre| (7e-6 absolute) and the decoder's and the backward sums' <= 2e-6.
16-bit outputs add one rounding, <= u / (1 + u) relative, u = 2^-8 (bf16) or 2^-11 (fp16).
"""

import pytest
import torch

import sparsekern as sk
from sparsekern import backends, ops

from _bounds import encoder_err, rounded
from _cases import decoder_problem, encoder_problem
from conftest import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not backends.has_triton(), reason="triton is not installed"),
]
# relative to the largest |pre| of the row: >= 3x two sides' 6-sigma fp32 error (1.5e-6 each), and 4x
# the tf32x3 dot's (3 x 2^-22 per product, ~sqrt(d_in) of them)
NEAR = 1e-5
STRATEGIES = ["blocks", "fused", "tiles"]  # sparsekern/triton/encode.py


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_ENCODE_STRATEGY", request.param)
    return request.param


def cuda(*ts):
    return tuple(t.cuda() if t is not None else None for t in ts)


def pre64(x, W, b, bd):
    x, W, b = x.double(), W.double(), b.double()
    return (x - bd.double() if bd is not None else x) @ W + b


def check_topk(out_v, out_i, pre, k, relu):
    """Selected (value desc, index asc) order vs the float64 oracle, near-ties allowed to swap."""
    ev, ei = torch.sort(pre, dim=1, descending=True, stable=True)
    ev, ei = ev[:, :k], ei[:, :k]
    scale = pre.abs().amax(1, keepdim=True)
    got = pre.gather(1, out_i)  # float64 value of what the kernel picked
    assert bool(((got - ev).abs() <= NEAR * scale).all()), "picked a feature that is not in the top k"
    swapped = out_i != ei
    # near-ties within 2 * 7e-6 absolute of each other: ~1e-3 of the top-k gaps (spacing ~1e-2), and a
    # swap moves two positions
    assert int(swapped.sum()) <= max(4, out_i.numel() // 1000), int(swapped.sum())
    exp_v = ev.clamp_min(0) if relu else ev
    # sorted values move by at most the largest error in the row (order statistics are 1-Lipschitz),
    # so near-tie swaps do not matter here: <= 1.5e-6 of max |pre|
    assert rel_err(out_v, exp_v) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [32, 64, 256])
def test_topk_encode_cuda(dtype, k, strategy):
    x, W, b, bd = cuda(*encoder_problem(1024, 768, 24576, dtype))
    with sk.use_backend("triton"):
        out = ops.topk_encode(x, W, b, k, b_dec=bd, relu=False)
    assert out.values.dtype == dtype
    pre = pre64(x, W, b, bd)
    if dtype == torch.float32:
        check_topk(out.values, out.indices, pre, k, relu=False)
    else:
        # triton and the fp32-accumulating reference against the float64 oracle on the same 16-bit inputs:
        # sorted values are within the row's largest fp32 error (floor: the worst case, any order) of the
        # exact sorted ones, then round once; and triton is within twice the reference's own error plus
        # 2 * floor (derivation: tests/test_topk_encode.py::test_low_precision_within_twice_reference_error)
        with sk.use_backend("ref"):
            ref_lp = ops.topk_encode(x, W, b, k, b_dec=bd, relu=False)
        ev = torch.sort(pre, dim=1, descending=True).values[:, :k]
        floor = float(encoder_err(x, W, b, bd).max() / ev.abs().max())  # 2.3e-4 here
        got, ref_err = rel_err(out.values, ev), rel_err(ref_lp.values, ev)
        assert got <= rounded(dtype, floor) and ref_err <= rounded(dtype, floor)
        assert got <= 2 * ref_err + 2 * floor
        # positions differ only at near-ties of the two fp32 sums (~1e-3 of them, two positions each)
        assert (out.indices == ref_lp.indices).float().mean() > 0.99


@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
def test_topk_and_threshold_fp32_dot_precisions(prec, monkeypatch):
    """SPARSEKERN_TRITON_FP32_DOT: both settings must meet the fp32 contract."""
    monkeypatch.setenv("SPARSEKERN_TRITON_FP32_DOT", prec)
    x, W, b, bd = cuda(*encoder_problem(512, 2304, 16384, torch.float32))
    pre = pre64(x, W, b, bd)
    with sk.use_backend("triton"):
        out = ops.topk_encode(x, W, b, 64, b_dec=bd, relu=False)
        thr = ops.threshold_encode(x, W, b, 1.0, b_dec=bd)
    check_topk(out.values, out.indices, pre, 64, relu=False)
    dense = thr.to_dense(16384).double()
    near = (pre - 1.0).abs() <= NEAR * pre.abs().amax(1, keepdim=True)
    assert bool(((dense != 0) == (pre > 1.0))[~near].all())


def test_topk_encode_cuda_forced_splits_and_ragged_shapes():
    from sparsekern.triton import encode

    x, W, b, bd = cuda(*encoder_problem(333, 300, 5001, torch.float32))
    pre = pre64(x, W, b, bd)
    for splits in (1, 7, 64):
        v, i = encode.topk_encode(x, W, b, bd, 40, True, splits=splits)
        check_topk(v, i, pre, 40, relu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_encode_cuda(dtype, strategy):
    x, W, b, bd = cuda(*encoder_problem(1024, 768, 24576, dtype))
    thr = torch.rand(24576, device="cuda", dtype=torch.float64) * 0.5 + 0.5
    with sk.use_backend("triton"):
        out = ops.threshold_encode(x, W, b, thr.to(dtype), b_dec=bd)
    pre = pre64(x, W, b, bd)
    t = thr.to(dtype).double()
    dense = out.to_dense(24576).double()
    near = (pre - t).abs() <= NEAR * pre.abs().amax(1, keepdim=True)
    assert bool(((dense != 0) == (pre > t))[~near].all())
    l0 = out.l0()
    assert torch.equal(l0, (dense != 0).sum(1))  # counts and contents agree exactly
    exp = pre * (pre > t)
    # fp32: <= 1.5e-6 at 6 sigma; bf16: one rounding, <= 2^-8 / (1 + 2^-8) = 2^-8 - 1.5e-5, plus that
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert rel_err(dense[~near], exp[~near]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 64, 128])
def test_sparse_decode_fwd_bwd_cuda(dtype, k):
    v, i, W, b = cuda(*decoder_problem(4096, k, 65536, 768, dtype))
    i[:64] = 7  # a hot feature: one long segment in the weight grad
    G = torch.randn(4096, 768, device="cuda", dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (v, W, b)]
    with sk.use_backend("triton"):
        out = ops.sparse_decode(args[0], i, args[1], args[2])
        (out * G.to(dtype)).sum().backward()
    d = [t.double().clone().requires_grad_() for t in (v, W, b)]
    exp = (d[0][..., None] * d[1][i]).sum(1) + d[2]
    (exp * G.to(dtype).double()).sum().backward()
    # fp32: <= 2e-6 at 6 sigma (the hot feature's 64 * k-term sum included: its partial sums stay below
    # ~1e3 of a total ~2e3); bf16: one rounding, <= 2^-8 - 1.5e-5, plus that
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    assert rel_err(out.detach(), exp.detach()) < tol
    for a, e in zip(args, d):
        assert a.grad.dtype == dtype and rel_err(a.grad, e.grad) < tol


def test_encoder_backward_cuda():
    x, W, b, bd = cuda(*encoder_problem(512, 256, 8192, torch.float32))
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    R = torch.randn(512, 32, device="cuda")
    with sk.use_backend("triton"):
        out = ops.topk_encode(*params[:3], 32, b_dec=params[3], relu=False)
        (out.values * R).sum().backward()
    dense = [t.double().clone().requires_grad_() for t in (x, W, b, bd)]
    kept = ((dense[0] - dense[3]) @ dense[1] + dense[2]).gather(1, out.indices)
    (kept * R.double()).sum().backward()
    # gradients of the kernel's own selection; sums of k = 32 (dx), N = 512 rows (db, db_dec): <= 2e-6
    # at 6 sigma
    for p, e in zip(params, dense):
        assert rel_err(p.grad, e.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transpose", [True, False])
def test_encode_grad_kernels_cuda(dtype, transpose):
    """The encoder-backward kernels (sparsekern/triton/encode_grad.py) at the training shape's width,
    both dx paths (chunked transposed copy / in-place gather), against float64 on the GPU."""
    from sparsekern.triton import encode_grad as eg

    n, k, d_in, d_sae = 2048, 32, 768, 24576
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(d_in, d_sae, device="cuda", generator=g).to(dtype)
    x = torch.randn(n, d_in, device="cuda", generator=g).to(dtype)
    grad = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    idx = torch.randint(0, d_sae, (n, k), device="cuda", generator=g)
    idx[:, 0] = 7  # a hot feature (2048 slots > HOT_SLOTS: the hot kernel), a row of one repeated feature
    idx[1] = 11
    grad[2] = 0
    dx = eg.encode_backward_input(grad, idx, W, transpose=transpose)
    exp = torch.einsum("nk,dnk->nd", grad.double(), W.double()[:, idx])
    # fp32: k = 32 terms (dx) and the hot feature's 2048 (dW), <= 2e-6 at 6 sigma; 16-bit: one output
    # rounding (<= 2^-8 for bf16, 2^-11 for fp16) plus that: 2^-7 holds twice over
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert dx.dtype == dtype and rel_err(dx, exp) < tol and bool((dx[2] == 0).all())
    dW = eg.encode_backward_weight(x, grad, idx, d_sae)
    contrib = (x.double()[:, :, None] * grad.double()[:, None, :]).permute(1, 0, 2).reshape(d_in, n * k)
    expW = torch.zeros(d_in, d_sae, device="cuda", dtype=torch.float64)
    expW.index_add_(1, idx.reshape(-1), contrib)
    assert dW.is_contiguous() and rel_err(dW, expW) < tol


def test_encoder_backward_uses_the_encode_grad_kernels_cuda():
    from sparsekern import triton as sk_triton

    assert backends.select("encode_backward_input", torch.device("cuda"))[0] == "triton"
    x, W, b, bd = cuda(*encoder_problem(256, 64, 1024, torch.float32))
    params = [t.clone().requires_grad_() for t in (x, W, b, bd)]
    sk_triton.CALLS.clear()
    out = ops.topk_encode(*params[:3], 16, b_dec=params[3])  # auto backend
    out.values.sum().backward()
    assert sk_triton.CALLS["encode_backward_input"] == 1 and sk_triton.CALLS["encode_backward_weight"] == 1


@pytest.mark.parametrize("shape", [(16384, 768, 24576, 32), (4096, 2304, 65536, 64)])
def test_issue_shapes_bf16_match_the_reference(shape, strategy):
    """Issue 10's shapes: the fp32-accumulating reference's indices (up to near-ties) and values."""
    n, d_in, d_sae, k = shape
    x, W, b, bd = cuda(*encoder_problem(n, d_in, d_sae, torch.bfloat16))
    with sk.use_backend("triton"):
        out = ops.topk_encode(x, W, b, k, b_dec=bd, relu=False)
    with sk.use_backend("ref"):
        ref_lp = ops.topk_encode(x, W, b, k, b_dec=bd, relu=False)
    assert (out.indices == ref_lp.indices).float().mean() > 0.99
    # two fp32 values within ~1e-5 of each other round to the same or adjacent bf16 numbers: at most one
    # ulp apart, <= 2^-7 of the largest |value| -- with equality possible, hence <=
    assert rel_err(out.values, ref_lp.values) <= 2**-7


def test_fused_overflow_rows_and_determinism_cuda(monkeypatch):
    """Pre-activations rising with the index overflow the fused epilogue's buffers (those rows are
    recomputed); slots are reserved with atomics, yet two runs are bitwise equal."""
    from sparsekern.triton import CALLS

    monkeypatch.setenv("SPARSEKERN_ENCODE_STRATEGY", "fused")
    x, W, _, bd = cuda(*encoder_problem(2048, 256, 40000, torch.bfloat16))
    b = torch.linspace(0, 40, 40000, device="cuda").to(torch.bfloat16)
    before = CALLS["topk_encode_overflow_rows"]
    with sk.use_backend("triton"):
        runs = [ops.topk_encode(x, W, b, 64, b_dec=bd) for _ in range(2)]
        thr = [ops.threshold_encode(x, W, b, 39.0, b_dec=bd) for _ in range(2)]
    assert CALLS["topk_encode_overflow_rows"] > before
    assert torch.equal(runs[0].indices, runs[1].indices) and torch.equal(runs[0].values, runs[1].values)
    assert torch.equal(thr[0].indices, thr[1].indices) and torch.equal(thr[0].values, thr[1].values)
    with sk.use_backend("ref"):
        ref_lp = ops.topk_encode(x, W, b, 64, b_dec=bd)
        ref_thr = ops.threshold_encode(x, W, b, 39.0, b_dec=bd)
    assert (runs[0].indices == ref_lp.indices).float().mean() > 0.99
    # a row's L0 moves only for features within rounding (~1e-5) of 39: ~400 per unit of pre there
    # (b rising by 1e3 per unit), so ~1e-2 of a feature per row on average, 10x inside 0.1
    assert (thr[0].l0() - ref_thr.l0()).abs().float().mean() < 0.1


@pytest.mark.slow
def test_topk_encode_peak_memory_at_the_issue_shape(strategy):
    """N=4096, d_sae=2^20, d_in=2304, k=64 (bf16): extra memory beyond inputs/outputs <= 1 GiB."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2304, device="cuda", generator=g).bfloat16()
    W = (torch.randn(2304, 1 << 20, device="cuda", generator=g, dtype=torch.bfloat16) / 48)
    b = torch.zeros(1 << 20, device="cuda", dtype=torch.bfloat16)
    bd = torch.zeros(2304, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with sk.use_backend("triton"):
        out = ops.topk_encode(x, W, b, 64, b_dec=bd)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert out.shape == (4096, 64)
    assert peak <= 1 << 30, f"peak extra memory {peak / 2**20:.0f} MiB"
    if strategy != "tiles":  # JumpReLU at L0 ~ 250 too (pre ~ N(0, 1))
        torch.cuda.reset_peak_memory_stats()
        with sk.use_backend("triton"):
            acts = ops.threshold_encode(x, W, b, 3.5, b_dec=bd)
        torch.cuda.synchronize()
        out_bytes = acts.values.numel() * 10  # bf16 values + int64 indices
        peak = torch.cuda.max_memory_allocated() - base - out_bytes
        assert peak <= 1 << 30, f"threshold_encode peak extra memory {peak / 2**20:.0f} MiB"
