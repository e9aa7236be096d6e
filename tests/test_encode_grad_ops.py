"""The encoder-backward ops (``sparsekern::encode_backward_input`` / ``_weight``) and their dispatch."""

import pytest
import torch

import sparsekern as sk
from sparsekern import backends, ops
from sparsekern.ops import _encode_grad as EG

from _bounds import assert_threshold_decided, assert_topk_decided, encoder_err, gamma, rel
from _cases import encoder_problem
from conftest import rel_err


def test_cpu_keeps_the_cpp_path_and_cuda_prefers_triton():
    assert backends.select(EG.IN, torch.device("cpu"))[0] == "cpp"
    assert backends.select(EG.WEIGHT, torch.device("cpu"))[0] == "cpp"
    if backends.has_triton():
        assert backends._OP_PRIORITY[EG.IN]["cuda"][0] == "triton"
        assert backends._OP_PRIORITY[EG.WEIGHT]["cuda"][0] == "triton"
    for name in ("ref", "cpp"):  # every backend that has sparse_decode on CPU has the encoder backward
        assert name in backends.implementations(EG.IN, "cpu")


def test_prefer_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.prefer(EG.IN, "cuda", ("nope",))


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

    def dx64(grad, W):
        return torch.einsum("nk,dnk->nd", grad.double(), W.double()[:, idx])

    def dW64(x, grad):
        expW = torch.zeros(33, 70, dtype=torch.float64)
        return expW.index_add_(1, idx.reshape(-1), (x.double()[:, :, None] * grad.double()[:, None, :])
                               .permute(1, 0, 2).reshape(33, -1))

    # fp32 worst case, any order: dx sums k = 5 products, a dW entry one per occurrence of its feature;
    # the same sums on |inputs| give sum |terms| (~4e-7 relative for both here)
    exp = dx64(grad, W)
    assert rel_err(dx, exp) <= rel(gamma(5, torch.float32) * dx64(grad.abs(), W.abs()), exp)
    expW = dW64(x, grad)
    occ = int(torch.bincount(idx.reshape(-1)).max())
    bound = rel(gamma(occ, torch.float32) * dW64(x.abs(), grad.abs()), expW)
    assert dW.shape == (33, 70) and dW.is_contiguous() and rel_err(dW, expW) <= bound


def test_encoder_gradients_same_under_each_cpu_backend():
    x, W, b, bd = encoder_problem(12, 24, 100, torch.float32)
    # both backends must keep the same features (and the same relu mask) for their gradients to agree
    err = encoder_err(x, W, b, bd)
    pre = (x.double() - bd.double()) @ W.double() + b.double()
    assert_topk_decided(pre, err, 7)
    kept = pre.topk(7, 1).indices
    assert_threshold_decided(pre.gather(1, kept), 0.0, err.gather(1, kept), x.dtype)
    R = torch.arange(7.0)
    grads = []
    for backend in ("cpp", "ref"):
        p = [t.clone().requires_grad_() for t in (x, W, b, bd)]
        with sk.use_backend(backend):
            out = ops.topk_encode(*p[:3], 7, b_dec=p[3])
            (out.values * R).sum().backward()
        grads.append([t.grad for t in p])
        assert p[1].grad.is_contiguous()

    # Each backend's gradient is within E = gamma(n) * sum |terms| of the exact one, n = the longest sum:
    # dx k = 7 products; dW one per occurrence (+ the rounding of x - b_dec); db_enc one per occurrence;
    # db_dec = -dx.sum(0), k + N = 19. sum |terms| is the float64 backward of |inputs| (b_dec enters as
    # x - b_dec, so as -|b_dec|). Then |a - e| <= 2 E and rel_err <= 2 r / (1 - r), r = E / max |exact|:
    # ~1e-6 for dx, dW, db_enc and ~6e-6 for db_dec here (a 1e-6 there only held by this CPU's rounding).
    def exact(x, W, b, bd, R):
        q = [t.double().clone().requires_grad_() for t in (x, W, b, bd)]
        kept_pre = ((q[0] - q[3]) @ q[1] + q[2]).gather(1, kept) * (pre.gather(1, kept) > 0)
        (kept_pre * R.double()).sum().backward()
        return [t.grad for t in q]

    occ = int(torch.bincount(kept.reshape(-1)).max())
    lengths = (7, occ + 1, occ, 7 + 12)
    for a, e, e64, s, n in zip(*grads, exact(x, W, b, bd, R), exact(x.abs(), W.abs(), b.abs(), -bd.abs(),
                                                                    R.abs()), lengths):
        r = rel(gamma(n, torch.float32) * s.abs(), e64)  # abs: d/d(b_dec) carries x - b_dec's sign
        assert rel_err(a, e) <= 2 * r / (1 - r)
