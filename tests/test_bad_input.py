"""Bad input gives a clear ValueError/TypeError naming the argument, on every backend."""

import pytest
import torch

import sparsekern as sk
from sparsekern.ops import SparseActs, dense_encode, sparse_decode, threshold_encode, topk_encode

from conftest import cpu_backends

BACKENDS = sorted(set(cpu_backends("topk_encode")) | set(cpu_backends("sparse_decode")))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with sk.use_backend(request.param):
        yield request.param


def enc():
    return torch.randn(4, 8), torch.randn(8, 20), torch.randn(20)


def dec():
    return torch.rand(4, 3), torch.randint(0, 20, (4, 3)), torch.randn(20, 8)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, W, b: topk_encode(x, W, b, 0), ValueError, "k must satisfy 1 <= k <= 20"),
        (lambda x, W, b: topk_encode(x, W, b, 21), ValueError, "k must satisfy"),
        (lambda x, W, b: topk_encode(x, W, b, 2.5), TypeError, "k must be an int"),
        (lambda x, W, b: topk_encode(x[:, :5], W, b, 2), ValueError, "x has last dim 5"),
        (lambda x, W, b: topk_encode(x, W[0], b, 2), ValueError, "W_enc must be 2-D"),
        (lambda x, W, b: topk_encode(x, W, b[:5], 2), ValueError, r"b_enc must have shape \[d_sae\]"),
        (lambda x, W, b: topk_encode(x, W.double(), b, 2), TypeError, "W_enc has dtype torch.float64"),
        (lambda x, W, b: topk_encode(x.long(), W, b, 2), TypeError, "x must be float"),
        (lambda x, W, b: topk_encode(x.numpy(), W, b, 2), TypeError, "x must be a torch.Tensor"),
        (lambda x, W, b: topk_encode(x, W, b, 2, b_dec=torch.zeros(3)), ValueError, "b_dec must have shape"),
        (lambda x, W, b: topk_encode(x, W, b, 2, b_dec=torch.zeros(8).half()), TypeError, "b_dec has dtype"),
        (lambda x, W, b: threshold_encode(x, W, b, float("nan")), ValueError, "threshold must be finite"),
        (lambda x, W, b: threshold_encode(x, W, b, torch.full((20,), float("inf"))), ValueError, "finite"),
        (lambda x, W, b: threshold_encode(x, W, b, torch.zeros(7)), ValueError, "threshold must have shape"),
        (lambda x, W, b: threshold_encode(x, W, b, "0.1"), TypeError, "threshold must be a float"),
        (lambda x, W, b: dense_encode(x, W, b, activation="gelu"), ValueError, "activation must be one of"),
        (lambda x, W, b: dense_encode(x, W, b, activation="topk"), ValueError, "needs k"),
        (lambda x, W, b: dense_encode(x, W, b, activation="jumprelu"), ValueError, "needs threshold"),
    ],
)
def test_encoder_errors(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(*enc())


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda v, i, W: (v, i + 20, W), ValueError, r"indices must lie in \[0, d_sae=20\)"),
        (lambda v, i, W: (v, i - 21, W), ValueError, "indices must lie in"),
        (lambda v, i, W: (v, i.float(), W), TypeError, "indices must be int64"),
        (lambda v, i, W: (v, i[:, :2], W), ValueError, "indices has shape"),
        (lambda v, i, W: (v, i, W.double()), TypeError, "W_dec has dtype"),
        (lambda v, i, W: (v, i, W[0]), ValueError, "W_dec must be 2-D"),
        (lambda v, i, W: (v.long(), i, W), TypeError, "values must be float"),
    ],
)
def test_decoder_errors(backend, mutate, exc, match):
    v, i, W = mutate(*dec())
    with pytest.raises(exc, match=match):
        sparse_decode(v, i, W)


def test_decoder_bias_and_meta_device(backend):
    v, i, W = dec()
    with pytest.raises(ValueError, match=r"b_dec must have shape \[d_out\]"):
        sparse_decode(v, i, W, torch.zeros(3))
    with pytest.raises(ValueError, match="is on meta"):
        sparse_decode(v, i, W.to("meta"))


def test_native_kernels_check_indices_themselves():
    """Even bypassing the Python checks, the C++ kernel refuses out-of-range indices."""
    C = sk.backends.native()
    if C is None:
        pytest.skip("C++ extension not built in this environment")
    v, i, W = dec()
    i[2, 1] = 10**9
    with pytest.raises(RuntimeError, match="ndices"):
        C.sparse_decode(v, i, W, None)
    with pytest.raises(RuntimeError, match="ndices"):
        C.sparse_decode_backward_values(torch.randn(4, 8), i, W)
    with pytest.raises(RuntimeError, match="ndices"):
        C.sparse_decode_backward_weight(torch.randn(4, 8), v, i, 20)


def test_sparse_acts_validation():
    with pytest.raises(ValueError, match="same shape"):
        SparseActs(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        SparseActs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range for d_sae=5"):
        SparseActs(torch.ones(1, 2), torch.tensor([[0, 7]])).to_dense(5)


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SPARSEKERN_BACKEND='nonsense'"):
        topk_encode(*enc(), 2)
    monkeypatch.setenv("SPARSEKERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        topk_encode(*enc(), 2)
