"""sparsekern transcoders reproduce sae_lens's (Transcoder, SkipTranscoder, JumpReLUTranscoder,
JumpReLUSkipTranscoder); the Dunefsky-converter construction path; the TopK transcoders."""

import os
import warnings

import pytest
import torch

sl = pytest.importorskip("sae_lens")

from conftest import cpu_backends  # noqa: E402

import sparsekern as sk  # noqa: E402

warnings.filterwarnings("ignore", module="sae_lens")

D_IN, D_SAE, D_OUT = 32, 128, 48
# fp32 on both sides, summed in different orders (tests/fp_tolerance.py): encoder values sum n = 33 terms,
# ||t||_2 <= 4.1, sigma <= 1.1e-6; decoder outputs sum <= 70 active features, ||t||_2 <= 6.5, sigma <=
# 2.6e-6 (the skip term x @ W_skip.T is the same dense matmul on both sides). 1e-5 + 1e-5 |value| is >= 5
# sigma at the worst element.
TOL = {"rtol": 1e-5, "atol": 1e-5}
BACKENDS = (
    [os.environ["SPARSEKERN_BACKEND"]]
    if os.environ.get("SPARSEKERN_BACKEND")
    else cpu_backends("threshold_encode")
)
KINDS = {
    "transcoder": (sl.Transcoder, sl.TranscoderConfig, sk.Transcoder),
    "skip_transcoder": (sl.SkipTranscoder, sl.SkipTranscoderConfig, sk.SkipTranscoder),
    "jumprelu_transcoder": (sl.JumpReLUTranscoder, sl.JumpReLUTranscoderConfig, sk.JumpReLUTranscoder),
    "jumprelu_skip_transcoder": (
        sl.JumpReLUSkipTranscoder,
        sl.JumpReLUSkipTranscoderConfig,
        sk.JumpReLUSkipTranscoder,
    ),
}


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return m


def make_pair(kind, **extra):
    cls, cfg_cls, _ = KINDS[kind]
    meta = sk.SAEMetadata(hook_name="blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out")
    ref = randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, **extra)))
    ref.cfg.metadata = type(ref.cfg.metadata)(**meta.to_dict())
    return ref, sk.SAE.from_sae_lens(ref, copy=True)


def x_in(lead=(3, 5), seed=2):
    return torch.randn(*lead, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _backend(request):
    name = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    with sk.use_backend(name or os.environ.get("SPARSEKERN_BACKEND") or "ref"):
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_transcoders_match_sae_lens(kind, backend):
    ref, ours = make_pair(kind)
    assert type(ours) is KINDS[kind][2]
    assert ours.d_out == D_OUT and ours.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    assert ours.W_dec.shape == (D_SAE, D_OUT) and ours.b_dec.shape == (D_OUT,)
    if "skip" in kind:
        assert ours.W_skip.shape == (D_OUT, D_IN)
    x = x_in()
    dense = ref.encode(x)
    torch.testing.assert_close(ours.encode(x), dense, **TOL)
    torch.testing.assert_close(ours.encode_sparse(x).to_dense(D_SAE), dense, **TOL)
    torch.testing.assert_close(ours.decode(dense), ref.decode(dense), **TOL)
    torch.testing.assert_close(ours.decode(ours.encode_sparse(x)), ref.decode(dense), **TOL)
    out = ours(x)
    assert out.shape == (3, 5, D_OUT)
    torch.testing.assert_close(out, ref(x), **TOL)
    o_ref, a_ref = ref.forward_with_activations(x)
    o, a = ours.forward_with_activations(x)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(a, a_ref, **TOL)
    # use_error_term is ignored by transcoders' forward, as in SAELens
    ref.use_error_term = ours.use_error_term = True
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_transcoder_hooks_match_sae_lens(kind):
    ref, ours = make_pair(kind)
    x = x_in()
    _, cache_ref = ref.run_with_cache(x)
    _, cache = ours.run_with_cache(x)
    assert set(cache.keys()) == set(cache_ref.keys())
    for name in cache_ref.keys():
        torch.testing.assert_close(cache[name], cache_ref[name], **TOL, msg=name)

    def edit(acts, hook):
        return acts * (torch.arange(D_SAE) % 2)

    torch.testing.assert_close(
        ours.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", edit)]),
        ref.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", edit)]),
        **TOL,
    )


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_transcoder_fold_W_dec_norm_matches_sae_lens(kind):
    ref, ours = make_pair(kind)
    ref.fold_W_dec_norm()
    ours.fold_W_dec_norm()
    x = x_in()
    torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_transcoder_gradients_match_sae_lens():
    ref, ours = make_pair("jumprelu_skip_transcoder")
    x1, x2 = x_in().requires_grad_(), x_in().requires_grad_()
    ref(x1).square().sum().backward()
    ours(x2).square().sum().backward()
    # as tests/test_sae_api.py::test_gradients_match_sae_lens (same sizes and weight scales): sigma ~ 2e-5
    # at an entry that cancels to ~0, so atol 1e-4 ~ 5 sigma; rtol 1e-4 >= 100 sigma where |grad| > 10
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dunefsky_style_construction():
    """As the Dunefsky converter does: TranscoderConfig(...) without apply_b_dec_to_input, load_state_dict."""
    cfg = sk.TranscoderConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        d_out=D_OUT,
        dtype="float32",
        device="cpu",
        metadata=sk.SAEMetadata(
            hook_name="blocks.8.ln2.hook_normalized", hook_name_out="blocks.8.hook_mlp_out"
        ),
    )
    assert cfg.apply_b_dec_to_input is False and cfg.architecture() == "transcoder"
    tc = sk.Transcoder(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_OUT, generator=g),
        "b_dec": torch.randn(D_OUT, generator=g),
    }
    tc.load_state_dict(sd)
    x = x_in()
    expected = torch.relu(x @ sd["W_enc"] + sd["b_enc"]) @ sd["W_dec"] + sd["b_dec"]
    torch.testing.assert_close(tc(x), expected, **TOL)
    assert tc.cfg.metadata.hook_name_out == "blocks.8.hook_mlp_out"
    # SAELens builds the same object from our cfg dict
    ref = sl.Transcoder(sl.TranscoderConfig.from_dict(tc.cfg.to_dict()))
    ref.load_state_dict(tc.state_dict())
    torch.testing.assert_close(ref(x), expected, **TOL)


def test_transcoder_config_rules():
    with pytest.raises(ValueError, match="apply_b_dec_to_input is not supported for transcoders"):
        sk.TranscoderConfig(d_in=4, d_sae=8, d_out=4, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="d_out must be a positive int"):
        sk.TranscoderConfig(d_in=4, d_sae=8, d_out=0)
    tc = sk.Transcoder(sk.TranscoderConfig(d_in=4, d_sae=8, d_out=6))
    with pytest.raises(ValueError, match=r"\[\.\.\., d_in=4\]"):
        tc(torch.randn(2, 6))


@torch.no_grad()
def test_topk_transcoders():
    cfg = sk.TopKSkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=6)
    tc = randomize(sk.TopKSkipTranscoder(cfg))
    x = x_in()
    pre = x @ tc.W_enc + tc.b_enc
    v, i = pre.topk(6, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, i, v.relu())
    torch.testing.assert_close(tc.encode(x), acts, **TOL)
    torch.testing.assert_close(tc(x), acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T, **TOL)
    no_relu = sk.TopKTranscoder(
        sk.TopKTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=6, apply_relu=False)
    )
    no_relu.load_state_dict({k: v for k, v in tc.state_dict().items() if k != "W_skip"})
    no_relu.b_enc.fill_(-100.0)  # all pre < 0: top-k keeps negative values without ReLU
    assert (no_relu.encode(x) < 0).sum(-1).eq(6).all()
    assert isinstance(sk.SAE.from_dict(cfg.to_dict()), sk.TopKSkipTranscoder)
