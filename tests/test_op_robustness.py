"""Op-level robustness: torch.compile(fullgraph=True), meta/fake tensors, device and size errors."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsekern.ops.validate as V
import sparsekern.ops.feature_topk as feature_topk_mod
from sparsekern.ops import (
    FeatureTopKState,
    SparseActs,
    feature_topk_update,
    sparse_decode,
    threshold_encode,
    topk_encode,
)

D_IN, D_SAE, K = 8, 20, 3


def enc_dec():
    return torch.randn(4, D_IN), torch.randn(D_IN, D_SAE), torch.randn(D_SAE), torch.randn(D_SAE, D_IN)


def encode_decode(x, W, b, W_dec, shift):
    acts = topk_encode(x, W, b, K)
    # shift != 0 pushes the indices out of range inside the compiled graph
    return sparse_decode(acts.values, acts.indices + shift, W_dec)


# ---- 1. whole-graph capture; bad indices still rejected when the compiled fn runs ----------
# Compiled and eager calls run the same deterministic kernels (the custom ops are opaque to the
# compiler; no atomics, the same thread count) on bitwise-equal inputs, so their results are equal bit
# for bit: assert_close's default tolerance is never used, on any machine.
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_encode_decode(backend):
    torch._dynamo.reset()
    args = enc_dec()
    f = torch.compile(encode_decode, fullgraph=True, backend=backend)
    torch.testing.assert_close(f(*args, 0), encode_decode(*args, 0))
    for shift in (D_SAE, -D_SAE):
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, d_sae={D_SAE}\), found values"):
            f(*args, shift)


def test_compile_fullgraph_decode_backward():
    torch._dynamo.reset()
    x, W, b, W_dec = enc_dec()
    W_dec.requires_grad_()
    f = torch.compile(encode_decode, fullgraph=True, backend="aot_eager")
    f(x, W, b, W_dec, 0).square().sum().backward()
    g_compiled, W_dec.grad = W_dec.grad, None
    encode_decode(x, W, b, W_dec, 0).square().sum().backward()
    torch.testing.assert_close(g_compiled, W_dec.grad)


def test_compile_fullgraph_feature_topk_update():
    torch._dynamo.reset()

    def f(state, v, i, shift):
        return feature_topk_update(state, SparseActs(v, i + shift)).values

    state = FeatureTopKState.empty(D_SAE, 2)
    v, i = torch.rand(2, 3, K), torch.randint(0, D_SAE, (2, 3, K))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(state, v, i, 0), f(state, v, i, 0))
    with pytest.raises(ValueError, match=rf"acts.indices must lie in \[0, d_sae={D_SAE}\)"):
        cf(state, v, i, D_SAE)


def test_compile_fullgraph_to_dense():
    torch._dynamo.reset()

    def f(v, i):
        return SparseActs(v, i).to_dense(5)

    v, i = torch.rand(2, 2), torch.tensor([[0, 1], [2, 4]])
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(v, i), f(v, i))
    for bad in (i + 1, i - 1):  # compiled: an async assert (RuntimeError), with the same wording
        with pytest.raises(RuntimeError, match=r"to_dense: indices out of range for d_sae=5"):
            cf(v, bad)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    args = enc_dec()
    f = torch.compile(encode_decode, fullgraph=True)
    torch.testing.assert_close(f(*args, 0), encode_decode(*args, 0))
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, d_sae={D_SAE}\)"):
        f(*args, D_SAE)


# ---- 2. meta and fake tensors: shapes out, no host syncs ---------------------------------
def test_meta_tensors():
    x, W, b, W_dec = (t.to("meta") for t in enc_dec())
    acts = topk_encode(x.reshape(2, 2, D_IN), W, b, K)
    assert acts.values.is_meta and acts.shape == (2, 2, K)
    out = sparse_decode(acts, W_dec)
    assert out.is_meta and out.shape == (2, 2, D_IN)
    assert acts.to_dense(D_SAE).shape == (2, 2, D_SAE)

    state = FeatureTopKState.empty(D_SAE, 4, device="meta")
    new = feature_topk_update(state, acts)
    assert new.values.is_meta and new.values.shape == (D_SAE, 4) and new.locations.shape == (D_SAE, 4, 2)
    loc = torch.zeros(4, 2, dtype=torch.int64, device="meta")
    assert feature_topk_update(state, acts, loc, inplace=True) is state

    # threshold_encode's k is data-dependent: a clear error instead of torch's note on the private op
    with pytest.raises(ValueError, match="x is on meta: threshold_encode's output width"):
        threshold_encode(x, W, b, 0.1)


def test_fake_tensors():
    with FakeTensorMode():
        v, i = torch.rand(4, K), torch.randint(0, D_SAE, (4, K))
        W_dec = torch.randn(D_SAE, D_IN)
        assert sparse_decode(v, i, W_dec).shape == (4, D_IN)
        assert SparseActs(v, i).to_dense(D_SAE).shape == (4, D_SAE)
        state = FeatureTopKState.empty(D_SAE, 2)
        assert feature_topk_update(state, SparseActs(v, i), torch.zeros(4, 2, dtype=torch.int64)).k == 2


# ---- 3. threshold on another device ------------------------------------------------------
@pytest.mark.parametrize("thr", [torch.tensor(0.1, device="meta"), torch.tensor([0.1], device="meta")])
def test_threshold_device_mismatch(thr):
    x, W, b, _ = enc_dec()
    with pytest.raises(ValueError, match="threshold is on meta but x is on cpu"):
        threshold_encode(x, W, b, thr)


def test_threshold_scalar_forms_agree():
    x, W, b, _ = enc_dec()
    ref = threshold_encode(x, W, b, 0.25)
    for thr in (torch.tensor(0.25), torch.tensor([0.25]), torch.full((D_SAE,), 0.25)):
        got = threshold_encode(x, W, b, thr)
        assert torch.equal(got.values, ref.values) and torch.equal(got.indices, ref.indices)


# ---- 4. to_dense rejects negative indices ------------------------------------------------
def test_to_dense_negative_indices():
    acts = SparseActs(torch.ones(1, 2), torch.tensor([[1, -3]]))
    with pytest.raises(ValueError, match=r"to_dense: indices in \[-3, 1\] are out of range for d_sae=5"):
        acts.to_dense(5)


# ---- 5. a state too large for the device -------------------------------------------------
def test_feature_topk_state_too_large():
    with pytest.raises(MemoryError, match=r"d_sae=1099511627776, k=1\) needs 20,480.0 GiB"):
        FeatureTopKState.empty(2**40, 1)


def test_feature_topk_state_allocator_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80 bytes")

    monkeypatch.setattr(feature_topk_mod, "_device_memory", lambda dev: None)
    monkeypatch.setattr(torch, "full", refuse)
    with pytest.raises(MemoryError, match=r"d_sae=4, k=1\) needs 0.0 GiB .*allocator refused: Default"):
        FeatureTopKState.empty(4, 1)


def test_feature_topk_state_empty_compiles():
    """The size check queries host memory; it is skipped while tracing so empty() still compiles."""
    torch._dynamo.reset()
    f = torch.compile(lambda: FeatureTopKState.empty(4, 2).values, fullgraph=True, backend="eager")
    assert torch.equal(f(), torch.full((4, 2), -torch.inf))


def test_own_indices_skips_the_range_check_only_inside():
    """The encoders' backward reuses sparse_decode on indices they produced: no check (no GPU sync)."""
    bad = torch.tensor([[5]])
    with V.own_indices():
        V.index_range("indices", bad, 3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, d_sae=3\)"):
        V.index_range("indices", bad, 3)
