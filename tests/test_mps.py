"""The MPS path: registry behaviour without MPS (runs everywhere), float64-free float32 ops (what MPS
needs, checked here on CPU), and every op on MPS tensors (only on a Mac with MPS)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern import backends
from sparsekern.ops import (FeatureTopKState, SparseActs, dense_encode, feature_topk_update, sparse_decode,
                            threshold_encode, topk_encode)

from _bounds import (assert_threshold_decided, assert_topk_decided, decoder_err, encoder_err, rel,
                     rounded)
from _cases import decoder_problem, encoder_problem
from conftest import rel_err

MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
METAL = MPS and hasattr(torch.mps, "compile_shader")


# ---- without MPS -------------------------------------------------------------------------------
@pytest.mark.skipif(MPS, reason="checks the behaviour on machines without MPS")
def test_metal_registration_is_inert_without_mps():
    assert "metal" not in sk.backends()
    assert backends.implementations("sparse_decode", "mps") == ["ref"]
    assert backends.select("sparse_decode", torch.device("mps"))[0] == "ref"
    assert backends.select("feature_topk_update", torch.device("mps"))[0] == "ref"
    from sparsekern.mps import metal_available, sparse_decode_metal

    assert not metal_available()
    with pytest.raises(RuntimeError, match="MPS with torch.mps.compile_shader is not available"):
        sparse_decode_metal(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), torch.ones(2, 3), None)
    with pytest.raises(RuntimeError, match="backend 'metal' was forced"), sk.use_backend("metal"):
        sparse_decode(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), torch.ones(2, 3))


class _Float64Spy(TorchDispatchMode):
    """Records every aten op that produces a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outs):
            self.hits.append(str(func))
        return out


def test_reference_path_never_makes_float64_from_float32():
    """MPS has no float64: the reference path (what MPS tensors run) must stay float32 throughout,
    validation included. Checked with a dispatch spy on CPU tensors forced through 'ref'."""
    x, W, b, bd = encoder_problem(16, 24, 96, torch.float32)
    v, i, Wd, bdec = decoder_problem(16, 6, 96, 24, torch.float32)
    spy = _Float64Spy()
    with sk.use_backend("ref"), spy:
        topk_encode(x, W, b, 8, b_dec=bd)
        threshold_encode(x, W, b, 0.1, b_dec=bd)
        threshold_encode(x, W, b, torch.full((96,), 0.1), b_dec=bd)
        dense_encode(x, W, b, b_dec=bd, activation="relu")
        dense_encode(x, W, b, b_dec=bd, activation="topk", k=8)
        vv, ww = v.clone().requires_grad_(), Wd.clone().requires_grad_()
        sparse_decode(vv, i, ww, bdec).sum().backward()
        st = FeatureTopKState.empty(96, 4)
        feature_topk_update(st, SparseActs(v, i), torch.zeros(16, 2, dtype=torch.int64))
    assert spy.hits == []


# ---- on MPS ------------------------------------------------------------------------------------
mps_only = pytest.mark.skipif(not MPS, reason="needs an Apple GPU (torch.backends.mps)")


@mps_only
def test_every_op_on_mps_matches_cpu_reference():
    x, W, b, bd = encoder_problem(32, 48, 512, torch.float32)
    # MPS and the CPU reference each land within E = gamma(50) * sum |terms| of the exact fp32 pre; the
    # data is decided (top-16 gaps and |pre - 0.2| clear the bound, checked here on the CPU), so both
    # pick the same features and two results differ by <= 2 E: rel_err <= 2 r / (1 - r), r ~ 5e-6
    err = encoder_err(x, W, b, bd)
    pre = (x.double() - bd.double()) @ W.double() + b.double()
    assert_topk_decided(pre, err, 16)
    assert_threshold_decided(pre, 0.2, err, x.dtype)
    r = rel(err, pre)
    enc_tol = 2 * r / (1 - r)
    m = lambda *ts: [t.to("mps") for t in ts]  # noqa: E731
    with sk.use_backend("ref"):
        want_t = topk_encode(x, W, b, 16, b_dec=bd)
        want_j = threshold_encode(x, W, b, 0.2, b_dec=bd)
    got_t = topk_encode(*m(x, W, b), 16, b_dec=bd.to("mps"))
    got_j = threshold_encode(*m(x, W, b), 0.2, b_dec=bd.to("mps"))
    assert rel_err(got_t.to_dense(512).cpu(), want_t.to_dense(512)) <= enc_tol
    assert rel_err(got_j.to_dense(512).cpu(), want_j.to_dense(512)) <= enc_tol

    v, i, Wd, bdec = decoder_problem(64, 8, 512, 48, torch.float32)
    leaves = [t.to("mps").requires_grad_() for t in (v, Wd)]
    out = sparse_decode(leaves[0], i.to("mps"), leaves[1], bdec.to("mps"))
    out.square().sum().backward()
    cpu = [t.clone().requires_grad_() for t in (v, Wd)]
    with sk.use_backend("ref"):
        want = sparse_decode(cpu[0], i, cpu[1], bdec)
    want.square().sum().backward()
    # forward: both within gamma(9) * sum |terms| of exact, r ~ 8e-7 here, so <= 2 r / (1 - r) ~ 1.5e-6
    # (the 1e-5 below leaves 6x). Gradients of the square loss take G = 2 * out from each side's own out
    # (differing by <= 4 r max |out|), then sum 48 (values) or <= 6 (W_dec) products: 2 gamma(48) R +
    # 4 r R with R = sum |terms| / max |grad| <= 1.5 on this data, ~1.3e-5 (the 1e-4 leaves 7x).
    assert rel_err(out.detach().cpu(), want.detach()) < 1e-5
    for g, w in zip(leaves, cpu):
        assert rel_err(g.grad.cpu(), w.grad) < 1e-4

    loc = torch.stack([torch.arange(64), torch.zeros(64, dtype=torch.int64)], 1)
    st = feature_topk_update(FeatureTopKState.empty(512, 4, device="mps"), SparseActs(*m(v, i)), loc.to("mps"))
    with sk.use_backend("ref"):
        ref_st = feature_topk_update(FeatureTopKState.empty(512, 4), SparseActs(v, i), loc)
    assert torch.equal(st.values.cpu(), ref_st.values) and torch.equal(st.locations.cpu(), ref_st.locations)


@pytest.mark.skipif(not METAL, reason="needs MPS and torch.mps.compile_shader")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_metal_sparse_decode_matches_reference(dtype):
    v, i, W, b = decoder_problem(256, 32, 4096, 384, dtype)
    with sk.use_backend("metal"):
        out = sparse_decode(v.to("mps"), i.to("mps"), W.to("mps"), b.to("mps"))
    with sk.use_backend("ref"):
        want = sparse_decode(v, i, W, b)
    exact = (v.double()[..., None] * W.double()[i]).sum(-2) + b.double()
    assert out.dtype == dtype
    # fp32 accumulation of 32 products + 32 adds in any order: floor = gamma(33) * sum |terms| (~3.3e-6
    # in rel_err units); 16-bit outputs round that once. So: at most one rounding of an fp32-accurate
    # value, and within twice the CPU reference's own error plus 2 * floor (derivation:
    # test_topk_encode.py::test_low_precision_within_twice_reference_error). The reference itself is
    # bound the same way in test_sparse_decode.py::test_low_precision.
    floor = rel(decoder_err(v, i, W, b), exact)
    got = rel_err(out.cpu(), exact)
    assert got <= rounded(dtype, floor)
    if dtype != torch.float32:
        assert got <= 2 * rel_err(want, exact) + 2 * floor
