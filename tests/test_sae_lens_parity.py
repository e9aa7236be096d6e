"""The ops reproduce sae_lens TopKSAE / JumpReLUSAE / StandardSAE encode and decode on the same weights."""

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (  # noqa: E402
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

import sparsekern as sk  # noqa: E402
from sparsekern.ops import dense_encode, sparse_decode, threshold_encode, topk_encode  # noqa: E402

from conftest import cpu_backends  # noqa: E402
from fp_tolerance import sum_sigma  # noqa: E402

D_IN, D_SAE = 64, 512
# Encoder values (codes, dense_encode) against SAELens: fp32 sums of n = d_in + 1 = 65 terms, ||t||_2 <= 4.7
# for these weights (|W| ~ 0.3, x ~ N(0, 1)), so sigma <= 1.9e-6 (tests/fp_tolerance.py) and 1e-5 (+ 1e-5
# |value|) is >= 6.9 sigma at the worst element.
ENC_TOL = {"rtol": 1e-5, "atol": 1e-5}


def dec_tol(code, W_dec):
    """Decoder outputs: sums over the active features (a ReLU code keeps ~half of 512: n <= 279, ||t||_2 up
    to 16, sigma up to 1.3e-5 -- 1e-5 would be 0.9 sigma), so 6 sigma of this code's own decode, and never
    below the 1e-5 it was (TopK: n = k + 1 = 17)."""
    return {"rtol": 1e-5, "atol": max(1e-5, 6 * float(sum_sigma(code, W_dec).max()))}


def randomize(sae, threshold=None):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae.eval()


@pytest.fixture(params=cpu_backends("topk_encode"))
def backend(request):
    with sk.use_backend(request.param):
        yield request.param


def inputs():
    return torch.randn(3, 11, D_IN, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_topk_sae(backend):
    sae = randomize(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=16)))
    x = inputs()
    expected = sae.encode(x)
    acts = topk_encode(x, sae.W_enc, sae.b_enc, 16, b_dec=sae.b_dec)
    dense = acts.to_dense(D_SAE)
    torch.testing.assert_close(dense, expected, **ENC_TOL)
    assert torch.equal(dense != 0, expected != 0)
    got = dense_encode(x, sae.W_enc, sae.b_enc, b_dec=sae.b_dec, activation="topk", k=16)
    torch.testing.assert_close(got, expected, **ENC_TOL)
    torch.testing.assert_close(
        sparse_decode(acts.values, acts.indices, sae.W_dec, sae.b_dec), sae.decode(expected),
        **dec_tol(expected, sae.W_dec),
    )


@torch.no_grad()
def test_jumprelu_sae(backend):
    thr = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.6
    thr[:40] = -0.3  # negative thresholds: SAELens still applies ReLU
    sae = randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)), thr)
    x = inputs()
    expected = sae.encode(x)
    got = dense_encode(x, sae.W_enc, sae.b_enc, b_dec=sae.b_dec, activation="jumprelu", threshold=sae.threshold)
    torch.testing.assert_close(got, expected, **ENC_TOL)
    acts = threshold_encode(x, sae.W_enc, sae.b_enc, sae.threshold.clamp_min(0), b_dec=sae.b_dec)
    assert torch.equal(acts.l0(), (expected != 0).sum(-1))
    torch.testing.assert_close(sparse_decode(acts, sae.W_dec, sae.b_dec), sae.decode(expected),
                               **dec_tol(expected, sae.W_dec))


@torch.no_grad()
def test_standard_sae(backend):
    sae = randomize(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    x = inputs()
    expected = sae.encode(x)
    got = dense_encode(x, sae.W_enc, sae.b_enc, b_dec=sae.b_dec, activation="relu")
    torch.testing.assert_close(got, expected, **ENC_TOL)
    acts = threshold_encode(x, sae.W_enc, sae.b_enc, 0.0, b_dec=sae.b_dec)
    tol = dec_tol(expected, sae.W_dec)
    torch.testing.assert_close(sparse_decode(acts, sae.W_dec, sae.b_dec), sae.decode(expected), **tol)
    torch.testing.assert_close(sparse_decode(acts, sae.W_dec, sae.b_dec), sae(x), **tol)
