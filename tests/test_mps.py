"""The MPS path: registry behaviour without MPS (runs everywhere), float64-free float32 ops (what MPS
needs, checked here on CPU), and every op on MPS tensors (only on a Mac with MPS)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern import _backend
from sparsekern.ops import (FeatureTopKState, SparseActs, dense_encode, feature_topk_update, sparse_decode,
                            threshold_encode, topk_encode)

from _cases import decoder_problem, encoder_problem
from conftest import rel_err

MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
METAL = MPS and hasattr(torch.mps, "compile_shader")


# ---- without MPS -------------------------------------------------------------------------------
@pytest.mark.skipif(MPS, reason="checks the behaviour on machines without MPS")
def test_metal_registration_is_inert_without_mps():
    assert "metal" not in sk.backends()
    assert _backend.implementations("sparse_decode", "mps") == ["ref"]
    assert _backend.select("sparse_decode", torch.device("mps"))[0] == "ref"
    assert _backend.select("feature_topk_update", torch.device("mps"))[0] == "ref"
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
    m = lambda *ts: [t.to("mps") for t in ts]  # noqa: E731
    with sk.use_backend("ref"):
        want_t = topk_encode(x, W, b, 16, b_dec=bd)
        want_j = threshold_encode(x, W, b, 0.2, b_dec=bd)
    got_t = topk_encode(*m(x, W, b), 16, b_dec=bd.to("mps"))
    got_j = threshold_encode(*m(x, W, b), 0.2, b_dec=bd.to("mps"))
    assert rel_err(got_t.to_dense(512).cpu(), want_t.to_dense(512)) < 1e-5
    assert rel_err(got_j.to_dense(512).cpu(), want_j.to_dense(512)) < 1e-5

    v, i, Wd, bdec = decoder_problem(64, 8, 512, 48, torch.float32)
    leaves = [t.to("mps").requires_grad_() for t in (v, Wd)]
    out = sparse_decode(leaves[0], i.to("mps"), leaves[1], bdec.to("mps"))
    out.square().sum().backward()
    cpu = [t.clone().requires_grad_() for t in (v, Wd)]
    with sk.use_backend("ref"):
        want = sparse_decode(cpu[0], i, cpu[1], bdec)
    want.square().sum().backward()
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
    tol = 1e-5 if dtype == torch.float32 else 2 * rel_err(want, exact) + 1e-6
    assert rel_err(out.cpu(), exact) <= tol
