"""The encoder-backward ops (``sparsekern::encode_backward_input`` / ``_weight``) and their dispatch."""

import pytest
import torch

import sparsekern as sk
from sparsekern import _backend, ops
from sparsekern.ops import _encode_grad as EG

from _cases import encoder_problem
from conftest import rel_err


def test_cpu_keeps_the_cpp_path_and_cuda_prefers_triton():
    assert _backend.select(EG.IN, torch.device("cpu"))[0] == "cpp"
    assert _backend.select(EG.WEIGHT, torch.device("cpu"))[0] == "cpp"
    if _backend.has_triton():
        assert _backend._OP_PRIORITY[EG.IN]["cuda"][0] == "triton"
        assert _backend._OP_PRIORITY[EG.WEIGHT]["cuda"][0] == "triton"
    for name in ("ref", "cpp"):  # every backend that has sparse_decode on CPU has the encoder backward
        assert name in _backend.implementations(EG.IN, "cpu")


def test_prefer_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.prefer(EG.IN, "cuda", ("nope",))


@pytest.mark.parametrize("backend", ["cpp", "ref"])
def test_ops_match_float64(backend):
    g0 = torch.Generator().manual_seed(0)
    W = torch.randn(33, 70, generator=g0)
    x = torch.randn(9, 33, generator=g0)
    grad = torch.randn(9, 5, generator=g0)
    idx = torch.randint(0, 70, (9, 5), generator=g0)
    idx[0] = 4  # duplicates in a row
    with sk.use_backend(backend):
        dx = EG.encode_backward_input(grad, idx, W)
        dW = EG.encode_backward_weight(x, grad, idx, 70)
    exp = torch.einsum("nk,dnk->nd", grad.double(), W.double()[:, idx])
    assert rel_err(dx, exp) < 1e-6
    expW = torch.zeros(33, 70, dtype=torch.float64)
    expW.index_add_(1, idx.reshape(-1), (x.double()[:, :, None] * grad.double()[:, None, :])
                    .permute(1, 0, 2).reshape(33, -1))
    assert dW.shape == (33, 70) and dW.is_contiguous() and rel_err(dW, expW) < 1e-6


def test_encoder_gradients_same_under_each_cpu_backend():
    x, W, b, bd = encoder_problem(12, 24, 100, torch.float32)
    grads = []
    for backend in ("cpp", "ref"):
        p = [t.clone().requires_grad_() for t in (x, W, b, bd)]
        with sk.use_backend(backend):
            out = ops.topk_encode(*p[:3], 7, b_dec=p[3])
            (out.values * torch.arange(7.0)).sum().backward()
        grads.append([t.grad for t in p])
        assert p[1].grad.is_contiguous()
    for a, e in zip(*grads):
        assert rel_err(a, e) < 1e-6
