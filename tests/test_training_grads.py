"""Every training loss and its gradients against a dense float64 autograd reference of SAELens's formulas.

The references below build ``[N, d_sae]`` and follow ``sae_lens/saes/*_sae.py`` line by line (the
JumpReLU / Step straight-through functions and ``calculate_topk_aux_acts`` are SAELens's own).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsekern.training import TrainingConfig
from sparsekern.training.trainer import build_module

sl_jr = pytest.importorskip("sae_lens.saes.jumprelu_sae")
sl_topk = pytest.importorskip("sae_lens.saes.topk_sae")

D = torch.float64


def _cfg(arch, n_in, n_sae, k, mode, apply_b_dec, rescale, **kw):
    return TrainingConfig(
        architecture=arch,
        d_in=n_in,
        d_sae=n_sae,
        k=k,
        transcoder=mode >= 1,
        skip_transcoder=mode == 2,
        d_out=n_in + 1 if mode else None,
        apply_b_dec_to_input=apply_b_dec and mode == 0,
        rescale_acts_by_decoder_norm=rescale,
        dtype="float64",
        jumprelu_bandwidth=0.5,
        aux_loss_coefficient=0.7,
        **kw,
    )


def _randomise(m, g):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g, dtype=D) * 0.6)
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.5)


def _reference(m, P, x, y, dead, coeffs):
    """Dense SAELens loss (float64); P: dict of leaf copies of the module's parameters."""
    cfg = m.cfg
    sae_in = x - P["b_dec"] if cfg.apply_b_dec_to_input else x
    skip = x @ P["W_skip"].T if cfg.skip_transcoder else 0.0
    arch = cfg.architecture
    if arch == "gated":
        pi_gate = sae_in @ P["W_enc"] + P["b_gate"]
        mag = (sae_in @ (P["W_enc"] * P["r_mag"].exp()) + P["b_mag"]).relu()
        f = (pi_gate > 0).to(D) * mag
        out = f @ P["W_dec"] + P["b_dec"]
        mse = (out - y).pow(2).sum(-1).mean()
        pga = pi_gate.relu()
        l1 = coeffs["l1"] * torch.sum(pga * P["W_dec"].norm(dim=1), dim=-1).mean()
        aux = (pga @ P["W_dec"] + P["b_dec"] - y).pow(2).sum(-1).mean()
        return mse + l1 + aux
    hidden_pre = sae_in @ P["W_enc"] + P["b_enc"]
    if arch == "standard":
        f = hidden_pre.relu()
        out = f @ P["W_dec"] + P["b_dec"] + skip
        l1 = (coeffs["l1"] * (f * P["W_dec"].norm(dim=1)).norm(p=1, dim=-1)).mean()
        return (out - y).pow(2).sum(-1).mean() + l1
    if arch == "jumprelu":
        t = P["threshold"].to(D)
        f = sl_jr.JumpReLU.apply(hidden_pre, t, cfg.jumprelu_bandwidth, False)
        out = f @ P["W_dec"] + P["b_dec"] + skip
        l0 = torch.sum(sl_jr.Step.apply(hidden_pre, t, cfg.jumprelu_bandwidth, False), dim=-1)
        return (out - y).pow(2).sum(-1).mean() + (coeffs["l0"] * l0).mean()
    # topk / batchtopk
    if cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * P["W_dec"].norm(dim=-1)
    if arch == "topk":
        top = torch.topk(hidden_pre, k=cfg.k, dim=-1)
        f = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    else:
        acts = hidden_pre.relu().flatten()
        top = torch.topk(acts, int(cfg.k * x.shape[0]))
        f = torch.zeros_like(acts).scatter(-1, top.indices, top.values).reshape(hidden_pre.shape)
    scale = 1 / P["W_dec"].norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else 1.0
    out = (f * scale) @ P["W_dec"] + P["b_dec"] + skip
    loss = (out - y).pow(2).sum(-1).mean()
    num_dead = int(dead.sum())
    if num_dead:
        residual = (y - out).detach()
        k_aux = x.shape[-1] // 2
        sc = min(num_dead / k_aux, 1.0)
        auxk = sl_topk.calculate_topk_aux_acts(min(k_aux, num_dead), hidden_pre, dead)
        recons = (auxk * scale) @ P["W_dec"]
        loss = loss + cfg.aux_loss_coefficient * sc * (recons - residual).pow(2).sum(-1).mean()
    return loss


CASES = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "n": st.integers(1, 7),
        "d_in": st.integers(2, 6),
        "d_sae": st.integers(3, 14),
        "k": st.integers(1, 4),
        "mode": st.sampled_from([0, 1, 2]),
        "apply_b_dec": st.booleans(),
        "rescale": st.booleans(),
        "dead_p": st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    }
)


def _check(arch, c, k=None):
    if arch == "gated" and c["mode"]:
        c = {**c, "mode": 0}
    kk = min(c["k"], c["d_sae"]) if k is None else k
    cfg = _cfg(arch, c["d_in"], c["d_sae"], kk, c["mode"], c["apply_b_dec"], c["rescale"])
    g = torch.Generator().manual_seed(c["seed"])
    m = build_module(cfg)
    _randomise(m, g)
    x = torch.randn(c["n"], cfg.d_in, generator=g, dtype=D)
    y = torch.randn(c["n"], cfg.d_out, generator=g, dtype=D) if cfg.transcoder else x
    dead = torch.rand(cfg.d_sae, generator=g) < c["dead_p"]
    coeffs = {"l1": 0.3, "l0": 0.2}
    out = m.forward_train(x, y, dead, coeffs)
    out.loss.backward()
    P = {name: p.detach().clone().requires_grad_(True) for name, p in m.named_parameters()}
    ref = _reference(m, P, x, y, dead, coeffs)
    ref.backward()
    # float64 both, the same formulas with different kernels (sparse ops vs the dense reference): each
    # value differs by the reordering of its sums, <= n * u * sum|terms| with n <= n_rows + d_in + d_sae
    # + d_out <= 7 + 6 + 14 + 7 = 34 and u = 1.1e-16, i.e. <= ~4e-15 * sum|terms|; with |loss|, |grad| and
    # sum|terms| below ~1e3 that is <= 4e-12, under 1e-9 (loss) and 1e-8 (gradients) by >= 250x.
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-9, atol=1e-9)
    for name, p in m.named_parameters():
        exp = P[name].grad if P[name].grad is not None else torch.zeros_like(P[name])
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        # the threshold is a float32 parameter (SAELens): each side rounds its float64 gradient to float32
        # once, so they differ by <= 1 ulp = 2^-23 |g| = 1.2e-7 |g| < rtol * |g|, whatever |g|
        tol = 1e-6 if name == "threshold" else 1e-8
        torch.testing.assert_close(got.to(D), exp.to(D), rtol=tol, atol=tol, msg=f"{arch} grad {name}")


@given(CASES)
def test_topk_loss_and_grads_match_dense(c):
    _check("topk", c)


@given(CASES)
def test_batchtopk_loss_and_grads_match_dense(c):
    _check("batchtopk", c, k=min(c["k"], c["d_sae"]) / 2)  # fractional average k


@given(CASES)
def test_jumprelu_loss_and_ste_grads_match_sae_lens_functions(c):
    _check("jumprelu", c)


@given(CASES)
def test_standard_loss_and_grads_match_dense(c):
    _check("standard", c)


@given(CASES)
def test_gated_loss_and_grads_match_dense(c):
    _check("gated", c)


def test_jumprelu_threshold_grad_is_nonzero_in_band():
    c = {
        "seed": 3,
        "n": 16,
        "d_in": 8,
        "d_sae": 32,
        "k": 1,
        "mode": 0,
        "apply_b_dec": True,
        "rescale": False,
        "dead_p": 0.0,
    }
    cfg = _cfg("jumprelu", 8, 32, 1, 0, True, False)
    m = build_module(cfg)
    _randomise(m, torch.Generator().manual_seed(c["seed"]))
    x = torch.randn(16, 8, dtype=D)
    m.forward_train(x, x, None, {"l1": 0.0, "l0": 0.5}).loss.backward()
    assert m.threshold.grad.abs().sum() > 0


def test_batchtopk_candidates_grow_until_exact():
    """One row holds most of the batch's top values: the per-row candidate set must grow."""
    from sparsekern.training.topk import batch_topk_select

    n, d_sae = 4, 64
    pre = torch.rand(n, d_sae, dtype=D) * 0.01
    pre[0] += 1.0  # row 0 dominates: the batch top-8 all sit there

    def values_fn(k_row):
        v, i = pre.relu().topk(k_row, dim=-1)
        return v, i

    vals, idx, exact = batch_topk_select(values_fn, 2.0, n, d_sae)
    assert exact
    dense = torch.zeros_like(pre).scatter(-1, idx, vals)
    flat = pre.relu().flatten()
    top = flat.topk(8)
    ref = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
    torch.testing.assert_close(dense, ref)
    _, _, exact_capped = batch_topk_select(values_fn, 2.0, n, d_sae, max_k_row=4)
    assert not exact_capped
