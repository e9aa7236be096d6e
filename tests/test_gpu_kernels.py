"""Every op on CUDA tensors, every CUDA-capable backend, realistic shapes, vs the reference.

Skipped cleanly without a CUDA device (`@pytest.mark.gpu`). The oracle is the float64 reference
on the CPU (or the same-dtype reference where rounding is the point); top-k indices must match
exactly wherever the float64 gap between the k-th and (k+1)-th pre-activation is above the
kernel's rounding error.

Tolerances. At these sizes the worst-case bound of tests/_bounds.py, gamma(n) * sum |terms|, is
2e-4 (d_in 768) to 1e-3 (d_in 2304) of max |pre| -- it holds for any order but is far above what
fp32 does, so the fp32 tolerances below use the probabilistic model of rounding (Higham & Mary, SIAM
J. Sci. Comput. 2019): roundings are independent, mean zero, |d| <= u = 2^-24, so a sum's error is
sum_j d_j S_j over its partial sums S_j, with standard deviation <= u sqrt(sum_j S_j^2 / 3). For n
gaussian terms of rms s, sqrt(sum S_j^2) ~ s n / sqrt(2) in sequential order (tiled GPU sums are
smaller). Encoders (s = 1/sqrt(d_in), max |pre| ~ 5): std <= 7e-7 (d_in 768) / 1.2e-6 (2304), so
6 sigma over the ~1e7 entries is <= 7e-6 absolute, <= 1.5e-6 of max |pre|. Decoder (k <= 128 terms of
rms 0.67 plus the bias, max |out| ~ 40): <= 1.3e-5 absolute, <= 4e-7 relative. Backward sums (d = 512
for the values, N = 1024 for b_dec): <= 2e-6 relative. Each margin against a tolerance is >= 5x.
"""

import math

import pytest
import torch

import sparsekern as sk
from sparsekern import backends, ref
from sparsekern.ops import FeatureTopKState, SparseActs, feature_topk_update, sparse_decode
from sparsekern.ops import threshold_encode, topk_encode

from _bounds import decoder_err, rel, rounded
from _cases import decoder_problem, encoder_problem
from conftest import rel_err

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
DEV = "cuda"


def gpu_backends(op):
    """CUDA-capable backends of ``op`` other than the reference (empty without CUDA: skipped)."""
    return [b for b in backends.implementations(op, "cuda") if b != "ref"] if CUDA else []


def cuda(*ts):
    return tuple(t.to(DEV) if t is not None else None for t in ts)


# ---- encoders ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", gpu_backends("topk_encode"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d_in,d_sae,k", [(512, 768, 24576, 32), (256, 2304, 65536, 64)])
def test_topk_encode(backend, dtype, n, d_in, d_sae, k):
    x, W, b, bd = encoder_problem(n, d_in, d_sae, dtype)
    pre = (x.double() - bd.double()) @ W.double() + b.double()  # float64 oracle on the same inputs
    top = pre.topk(k + 1, dim=1)
    with sk.use_backend(backend):
        acts = topk_encode(*cuda(x, W, b), k, b_dec=bd.to(DEV), relu=False)
    assert acts.values.dtype == dtype and acts.values.device.type == DEV
    # margin for the selection: >= 60x the fp32 accumulation's 6-sigma error (module docstring; 16-bit
    # inputs fold b_dec into an fp32 bias, sparsekern/triton/_tile.py, so x - b_dec is never rounded)
    err = 1e-4 * float(pre.abs().max())
    clear = (top.values[:, k - 1] - top.values[:, k]) > 2 * err  # rows whose top-k set is decided
    got_sorted = acts.indices.cpu().sort(1).values
    want_sorted = top.indices[:, :k].sort(1).values
    assert clear.float().mean() > 0.5, "too few decided rows for a meaningful test"
    assert torch.equal(got_sorted[clear], want_sorted[clear])
    exact_v = pre.gather(1, acts.indices.cpu())
    # fp32: <= 1.5e-6 at 6 sigma (module docstring). bf16: one output rounding (2^-8) plus the fp32
    # accumulation, <= 5e-3 even with the worst-case bound (1e-3 of max |pre| at d_in 2304): 4x inside
    assert rel_err(acts.values.cpu(), exact_v) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", gpu_backends("threshold_encode"))
@pytest.mark.parametrize("n,d_in,d_sae", [(512, 768, 24576), (128, 2304, 65536)])
def test_threshold_encode(backend, n, d_in, d_sae):
    x, W, b, bd = encoder_problem(n, d_in, d_sae, torch.float32)
    thr = torch.full((d_sae,), 2.5)
    with sk.use_backend("ref"):
        want = threshold_encode(x, W, b, thr, b_dec=bd)
    with sk.use_backend(backend):
        got = threshold_encode(*cuda(x, W, b), thr.to(DEV), b_dec=bd.to(DEV))
    pre = ((x.double() - bd.double()) @ W.double() + b.double())
    # rows with a pre within 1e-4 of the threshold (>= 14x the fp32 6-sigma error, module docstring)
    near = ((pre - 2.5).abs() < 1e-4).any(1)
    g = got.to_dense(d_sae).cpu()[~near]
    w = want.to_dense(d_sae)[~near]
    assert torch.equal(g != 0, w != 0)
    assert rel_err(g, pre[~near] * (w != 0)) < 1e-5
    assert torch.equal(got.l0().cpu()[~near], want.l0()[~near])


# ---- decoder -------------------------------------------------------------------------------
def dense64(values, indices, W, b=None):
    out = torch.zeros(values.shape[0], W.shape[1], dtype=torch.float64)
    out.index_add_(0, torch.arange(values.shape[0]).repeat_interleave(values.shape[1]),
                   values.double().reshape(-1, 1) * W.double()[indices.reshape(-1)])
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("backend", gpu_backends("sparse_decode"))
@pytest.mark.parametrize("k", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_decode_forward(backend, k, dtype):
    v, i, W, b = decoder_problem(2048, k, 24576, 768, dtype)
    with sk.use_backend(backend):
        out = sparse_decode(*cuda(v, i, W, b))
    exact = dense64(v, i, W, b)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(out.cpu(), exact) < 1e-5  # <= 4e-7 at 6 sigma (module docstring)
    else:
        # the backend and the reference (on CUDA too) against the float64 oracle: one rounding of an
        # fp32-accurate value (floor: the worst case gamma(k + 1) * sum |terms|, 3e-6 to 2e-5 here), and
        # within twice the reference's own error plus 2 * floor (derivation:
        # tests/test_topk_encode.py::test_low_precision_within_twice_reference_error)
        floor = rel(decoder_err(v, i, W, b), exact)
        with sk.use_backend("ref"):
            ref_lp = sparse_decode(*cuda(v, i, W, b))
        got, ref_err = rel_err(out.cpu(), exact), rel_err(ref_lp.cpu(), exact)
        assert got <= rounded(dtype, floor) and ref_err <= rounded(dtype, floor)
        assert got <= 2 * ref_err + 2 * floor


@pytest.mark.parametrize("backend", gpu_backends("sparse_decode"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_backward(backend, dtype):
    n, k, d_sae, d = 1024, 64, 16384, 512
    v, i, W, b = decoder_problem(n, k, d_sae, d, dtype)
    G = torch.randn(n, d, dtype=torch.float64)
    leaves = [t.detach().clone().to(DEV).requires_grad_() for t in (v, W, b)]
    with sk.use_backend(backend):
        out = sparse_decode(leaves[0], i.to(DEV), leaves[1], leaves[2])
        out.backward(G.to(dtype).to(DEV))
    d64 = [t.detach().double().requires_grad_() for t in (v, W, b)]
    dense64(d64[0], i, d64[1], d64[2]).backward(G.to(dtype).double())
    # fp32: <= 2e-6 at 6 sigma (module docstring); bf16: one output rounding, 2^-8, plus that: 1e-2
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(leaves, d64):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad.cpu(), want.grad) < tol


@pytest.mark.parametrize("backend", gpu_backends("sparse_decode"))
def test_sparse_decode_rejects_bad_indices_on_gpu(backend):
    v, i, W, b = decoder_problem(8, 4, 100, 16, torch.float32)
    with sk.use_backend(backend), pytest.raises(ValueError, match=r"must lie in \[0, d_sae=100\)"):
        sparse_decode(*cuda(v, i + 100, W, b))


# ---- feature top-k -------------------------------------------------------------------------
def _stream(n_batches, rows, kc, d_sae, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        idx = torch.rand(rows, d_sae, generator=g).argsort(1)[:, :kc]  # distinct features per row
        if ties:
            val = torch.randint(-1, 5, (rows, kc), generator=g).float() * 0.25
        else:
            val = torch.rand(rows, kc, generator=g) * 2 - 0.2
        loc = torch.stack([torch.arange(rows) + b * rows, torch.randint(0, 128, (rows,), generator=g)], 1)
        yield val, idx, loc


@pytest.mark.parametrize("backend", gpu_backends("feature_topk_update"))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("d_sae,k,rows,kc", [(24576, 32, 2048, 32), (4096, 64, 1024, 64), (512, 16, 4096, 8)])
def test_feature_topk_update(backend, ties, d_sae, k, rows, kc):
    """Bit-identical to the CPU reference (same total order), tie-heavy streams included."""
    want = FeatureTopKState.empty(d_sae, k)
    got = FeatureTopKState.empty(d_sae, k, device=DEV)
    for v, i, l in _stream(3, rows, kc, d_sae, seed=d_sae + k, ties=ties):
        with sk.use_backend("ref"):
            want = feature_topk_update(want, SparseActs(v, i), l)
        with sk.use_backend(backend):
            got = feature_topk_update(got, SparseActs(*cuda(v, i)), l.to(DEV))
    assert torch.equal(got.values.cpu(), want.values)
    assert torch.equal(got.locations.cpu(), want.locations)


@pytest.mark.parametrize("backend", gpu_backends("feature_topk_update"))
def test_feature_topk_update_hot_feature_and_large_k(backend):
    """One feature active in every row (one block merges 4096 candidates) and k = 2048."""
    rows, kc, d_sae, k = 4096, 4, 64, 2048
    g = torch.Generator().manual_seed(0)
    i = torch.stack([torch.zeros(rows, dtype=torch.int64), *[torch.randint(1, d_sae, (rows,), generator=g)
                                                             for _ in range(kc - 1)]], 1)
    v = torch.rand(rows, kc, generator=g)
    l = torch.stack([torch.arange(rows), torch.zeros(rows, dtype=torch.int64)], 1)
    with sk.use_backend("ref"):
        want = feature_topk_update(FeatureTopKState.empty(d_sae, k), SparseActs(v, i), l)
    with sk.use_backend(backend):
        got = feature_topk_update(FeatureTopKState.empty(d_sae, k, device=DEV), SparseActs(*cuda(v, i)), l.to(DEV))
    assert torch.equal(got.values.cpu(), want.values) and torch.equal(got.locations.cpu(), want.locations)


def test_feature_topk_update_rejects_k_above_cuda_limit():
    st = FeatureTopKState.empty(4, 2049, device=DEV)
    acts = SparseActs(torch.ones(1, 1, device=DEV), torch.zeros(1, 1, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="k <= 2048"):
        feature_topk_update(st, acts, torch.zeros(1, 2, dtype=torch.int64, device=DEV))


def test_reference_runs_on_cuda_tensors():
    """The pure-PyTorch fallback itself on CUDA tensors (what a CUDA tensor gets when nothing
    native is built)."""
    v, i, W, b = decoder_problem(64, 8, 500, 32, torch.float32)
    out = ref.sparse_decode(*cuda(v, i, W, b))
    # worst case gamma(9) * sum |terms|: 7.5e-7 of max |out| on this data, any order
    assert rel_err(out.cpu(), dense64(v, i, W, b)) < 1e-5
    st = FeatureTopKState.empty(500, 4, device=DEV)
    l = torch.stack([torch.arange(64), torch.zeros(64, dtype=torch.int64)], 1)
    ref.feature_topk_update_(st.values, st.locations, *cuda(v, i, l))
    want = FeatureTopKState.empty(500, 4)
    ref.feature_topk_update_(want.values, want.locations, v, i, l)
    assert torch.equal(st.values.cpu(), want.values) and math.isfinite(float(st.values.max()))


def test_top_activating_examples_on_cuda():
    """The streaming helper end to end on CUDA (auto backend) vs the same run on CPU. A ReLU SAE
    (no discrete top-k in the encoder); locations must agree wherever neighbouring values are
    further apart than GPU-vs-CPU rounding, and every kept value is the code at its location."""
    from sparsekern.features import top_activating_examples

    torch.manual_seed(0)
    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=64, d_sae=2048))
    acts = torch.randn(32, 16, 64)
    with sk.use_backend("ref"):
        want = top_activating_examples(sae, acts.split(8), k=8, progress=False)
    sae_gpu = sae.to(DEV)
    got = top_activating_examples(sae_gpu, acts.to(DEV).split(8), k=8, progress=False)
    gv, gl = got.values.cpu(), got.locations.cpu()
    # fp32 encodes of d_in = 64 (W_enc rms ~0.18): 6-sigma error <= 2e-6 absolute (module docstring's
    # model), against kept values of ~4-7 (rtol 1e-5: >= 4e-5); gaps above 1e-4 are decided (50x)
    assert torch.allclose(gv, want.values, rtol=1e-5, atol=1e-6)
    gap = (want.values[:, :-1] - want.values[:, 1:]).nan_to_num(posinf=1.0)
    clear = torch.cat([gap, torch.ones(gap.shape[0], 1)], 1).clamp_max(1.0) > 1e-4
    clear[:, 1:] &= gap > 1e-4
    assert torch.equal(gl[clear], want.locations[clear])
    with torch.no_grad():
        dense = sae_gpu.encode(acts.to(DEV)).cpu()
    filled = gl[..., 0] >= 0
    f_ids = torch.arange(2048)[:, None].expand(-1, 8)[filled]
    at_loc = dense[gl[filled][:, 0], gl[filled][:, 1], f_ids]
    assert torch.allclose(at_loc, gv[filled], rtol=1e-5, atol=1e-6)
