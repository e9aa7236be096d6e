"""sparsekern.HookedSAETransformer against sae_lens.HookedSAETransformer on a random-weight model."""

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import HookedSAETransformer as SLModel  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

import sparsekern as sk  # noqa: E402
from fp_tolerance import sum_sigma  # noqa: E402
from sparsekern.bench.timing import measure_peak  # noqa: E402

D_MODEL, D_SAE, VOCAB = 32, 256, 60
HOOK = "blocks.1.hook_resid_pre"


def model_cfg(**kw):
    base = dict(n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=VOCAB,
                act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = SLModel(model_cfg()).eval()
    ours = sk.HookedSAETransformer(model_cfg()).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def tokens(batch=2, pos=7, seed=3):
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def sae_lens_sae(arch, hook=HOOK, d_sae=D_SAE, d_in=D_MODEL, seed=1, **extra):
    cfg_cls, cls = {
        "standard": (sae_lens.StandardSAEConfig, sae_lens.StandardSAE),
        "gated": (sae_lens.GatedSAEConfig, sae_lens.GatedSAE),
        "jumprelu": (sae_lens.JumpReLUSAEConfig, sae_lens.JumpReLUSAE),
        "topk": (sae_lens.TopKSAEConfig, sae_lens.TopKSAE),
    }[arch]
    if arch == "topk":
        extra.setdefault("k", 12)
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, **extra)
    cfg.metadata.hook_name = hook
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.3 if p.dim() == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    return sae.eval()


ARCHS = ["standard", "gated", "jumprelu", "topk"]

# Tolerances (model: tests/fp_tolerance.py). The SAE at HOOK differs from SAELens's only by fp32 summation
# order: encoder sigma <= 7.4e-7 (n = 33), decoder sigma <= 4.1e-6 (n <= 141 active features, ||t||_2 <=
# 7.3; TopK 1.0e-6). The rest of the model is the same code on the same bits, so an output differs by that
# noise pushed through the later blocks: each LayerNorm divides by its row scale (>= 0.83 here) and the
# unembedding sums 32 of its components, ~ sigma * ||W_U[:, v]||_2 / scale ~ 2e-6 for a typical sigma of
# 2e-6. 1e-5 + 1e-5 |logit| is >= 5 sigma (observed: <= 1.1e-6). With caching, hook_sae_acts_pre is hooked
# and both sides run SAELens's dense expressions on the same bits (assert_cache_equal: equal here, 1e-5 is
# room only). Sparse codes against dense ones: a code entry is one encoder value (sigma <= 7.4e-7), so
# atol 1e-6 + rtol 1e-5 (a selected entry is > 0.01); other values of a sparse run: see sparse_tol.
LOGIT_TOL = {"rtol": 1e-5, "atol": 1e-5}


def sparse_tol(code, W_dec):
    """A sparse-kernel run against a dense one: 6 sigma of the decoder sum of this code (up to 2.5e-5 for
    the ReLU codes here, where 1e-5 would be 2.4 sigma), never below 1e-5; downstream values only shrink it
    (see above)."""
    return {"rtol": 1e-5, "atol": max(1e-5, 6 * float(sum_sigma(code, W_dec).max()))}


def assert_cache_equal(a, b, atol=1e-5):
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=atol, msg=k)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("as_sparsekern", [False, True], ids=["sae_lens_sae", "sparsekern_sae"])
@pytest.mark.parametrize("use_error_term", [False, True])
@torch.no_grad()
def test_run_with_saes_and_cache_match_sae_lens(models, arch, as_sparsekern, use_error_term):
    ref_model, model = models
    sae = sae_lens_sae(arch)
    ours = sk.SAE.from_sae_lens(sae, copy=True) if as_sparsekern else sae
    toks = tokens()
    want = ref_model.run_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    got = model.run_with_saes(toks, saes=[ours], use_error_term=use_error_term)
    torch.testing.assert_close(got, want, **LOGIT_TOL)
    want, cache_ref = ref_model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    got, cache = model.run_with_cache_with_saes(toks, saes=[ours], use_error_term=use_error_term)
    torch.testing.assert_close(got, want, **LOGIT_TOL)
    assert f"{HOOK}.hook_sae_acts_post" in cache.keys()
    assert_cache_equal(cache_ref, cache)
    if use_error_term:  # the error term restores the model's own output
        # up to one rounding at the hook, eps * (|recon| + |x - recon|) <= 1.2e-7 * 30 (tests/
        # test_sae_error_term.py), carried to the logits like the SAE noise above: <= ~4e-6 << 1e-4
        torch.testing.assert_close(got, model(toks), rtol=1e-4, atol=1e-4)
    assert model.acts_to_saes == {}  # reset at the end


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_sparse_cache_equals_dense_cache(models, arch):
    _, model = models
    sae = sk.SAE.from_sae_lens(sae_lens_sae(arch))
    toks = tokens(batch=3)
    _, dense = model.run_with_cache_with_saes(toks, saes=[sae])
    _, sparse = model.run_with_cache_with_saes(toks, saes=[sae], sparse=True)
    assert list(sparse.keys()) == list(dense.keys())
    post, pre = sparse[f"{HOOK}.hook_sae_acts_post"], sparse[f"{HOOK}.hook_sae_acts_pre"]
    assert isinstance(post, sk.SparseActs) and isinstance(pre, sk.SparseActs)
    assert post.values.shape[:2] == (3, 7) and post.indices.dtype == torch.int64
    torch.testing.assert_close(post.to_dense(D_SAE), dense[f"{HOOK}.hook_sae_acts_post"], rtol=1e-5, atol=1e-6)
    # pre-activations: exact at every feature the code selected
    dense_pre = dense[f"{HOOK}.hook_sae_acts_pre"].gather(-1, pre.indices)
    selected = post.values != 0 if arch != "topk" else torch.ones_like(post.values, dtype=torch.bool)
    torch.testing.assert_close(pre.values[selected], dense_pre[selected], rtol=1e-5, atol=1e-5)
    assert bool((pre.values[~selected] == 0).all())
    tol = sparse_tol(dense[f"{HOOK}.hook_sae_acts_post"], sae.W_dec)
    for k in dense.keys():
        if "hook_sae_acts" not in k:
            torch.testing.assert_close(sparse[k], dense[k], **tol, msg=k)


@torch.no_grad()
def test_sparse_cache_options(models):
    _, model = models
    sae = sk.SAE.from_sae_lens(sae_lens_sae("topk"))
    toks = tokens(batch=1)
    name = f"{HOOK}.hook_sae_acts_post"
    _, c = model.run_with_cache_with_saes(toks, saes=sae, sparse=True, names_filter=[name, "blocks.0.hook_resid_post"])
    assert list(c.keys()) == ["blocks.0.hook_resid_post", name]
    _, d = model.run_with_cache_with_saes(toks, saes=sae, sparse=True, names_filter=lambda n: n.endswith("acts_pre"),
                                          remove_batch_dim=True, return_cache_object=False)
    assert isinstance(d, dict) and list(d) == [f"{HOOK}.hook_sae_acts_pre"]
    assert d[f"{HOOK}.hook_sae_acts_pre"].values.shape == (7, 12)
    with pytest.raises(ValueError, match="incl_bwd"):
        model.run_with_cache_with_saes(toks, saes=sae, sparse=True, incl_bwd=True)
    assert sae._sparse_sink is None  # no capture left behind


def test_sparse_cache_memory_at_65k_features(models):
    """The d_sae=65536 cache: SparseActs vs dense tensors, in bytes and in peak memory of the run."""
    _, model = models
    d_sae = 65536
    sae = sk.SAE.from_sae_lens(sae_lens_sae("topk", d_sae=d_sae, k=32))
    toks = tokens(batch=4, pos=16)
    names = [f"{HOOK}.hook_sae_acts_pre", f"{HOOK}.hook_sae_acts_post"]

    def run(sparse):
        with torch.no_grad():
            return model.run_with_cache_with_saes(toks, saes=[sae], sparse=sparse, names_filter=names)[1]

    dense, peak_dense = measure_peak(lambda: run(False), torch.device("cpu"))
    sparse, peak_sparse = measure_peak(lambda: run(True), torch.device("cpu"))
    dense_bytes = sum(dense[n].numel() * dense[n].element_size() for n in names)
    stored = {t.data_ptr(): t.nbytes for n in names for t in (sparse[n].values, sparse[n].indices)}
    sparse_bytes = sum(stored.values())  # pre and post share their indices tensor
    ratio = dense_bytes / sparse_bytes
    print(f"\nd_sae=65536, 64 tokens, k=32: dense cache {dense_bytes / 2**20:.1f} MiB, sparse "
          f"{sparse_bytes / 2**20:.3f} MiB ({ratio:.0f}x smaller); run peak {peak_dense} vs {peak_sparse} MiB")
    assert ratio > 100
    if peak_dense is not None and peak_sparse is not None:  # Linux: VmHWM
        assert peak_sparse < 0.5 * dense_bytes / 2**20  # no [tokens, d_sae] tensor built


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
@torch.no_grad()
def test_hooks_on_sae_points_match_sae_lens(models, arch):
    ref_model, model = models
    sae = sae_lens_sae(arch)

    def kill(acts, hook):
        acts[..., :64] = 0
        return acts

    toks = tokens()
    name = f"{HOOK}.hook_sae_acts_post"
    for uet in (False, True):
        sae.use_error_term = uet
        want = ref_model.run_with_hooks_with_saes(toks, saes=[sae], fwd_hooks=[(name, kill)])
        got = model.run_with_hooks_with_saes(toks, saes=[sae], fwd_hooks=[(name, kill)])
        torch.testing.assert_close(got, want, **LOGIT_TOL)


@torch.no_grad()
def test_transcoders_match_sae_lens(models):
    ref_model, model = models
    g = torch.Generator().manual_seed(5)
    for cls, cfg_cls, hook_in in [
        (sae_lens.Transcoder, sae_lens.TranscoderConfig, "blocks.0.ln2.hook_normalized"),
        (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig, "blocks.0.mlp.hook_in"),
    ]:
        cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False)
        cfg.metadata.hook_name, cfg.metadata.hook_name_out = hook_in, "blocks.0.hook_mlp_out"
        tc = cls(cfg)
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        toks = tokens()
        for uet in (False, True):
            want, cw = ref_model.run_with_cache_with_saes(toks, saes=[tc], use_error_term=uet)
            got, cg = model.run_with_cache_with_saes(toks, saes=[tc], use_error_term=uet)
            torch.testing.assert_close(got, want, **LOGIT_TOL)
            assert_cache_equal(cw, cg)
            _, cs = model.run_with_cache_with_saes(toks, saes=[tc], use_error_term=uet, sparse=True)
            torch.testing.assert_close(cs["blocks.0.hook_mlp_out.hook_sae_acts_post"].to_dense(D_SAE),
                                       cw["blocks.0.hook_mlp_out.hook_sae_acts_post"], rtol=1e-5, atol=1e-6)
        assert model.acts_to_saes == {} and "blocks.0.hook_mlp_out" in model.hook_dict


@torch.no_grad()
def test_attach_reset_and_context(models):
    _, model = models
    a, b = sae_lens_sae("topk", seed=1), sae_lens_sae("topk", seed=2)
    other = sae_lens_sae("jumprelu", hook="blocks.0.hook_resid_post")
    toks = tokens()
    base = model(toks)
    model.add_sae(a)
    with_a = model(toks)
    assert not torch.allclose(with_a, base)
    with model.saes([b, other]):
        assert set(model.acts_to_saes) == {HOOK, "blocks.0.hook_resid_post"}
        assert model.acts_to_saes[HOOK] is b
    assert model.acts_to_saes == {HOOK: a}  # a restored
    torch.testing.assert_close(model(toks), with_a, rtol=0, atol=0)
    model.run_with_saes(toks, saes=[other], reset_saes_end=False)
    assert set(model.acts_to_saes) == {HOOK, "blocks.0.hook_resid_post"}
    model.reset_saes(HOOK)
    assert set(model.acts_to_saes) == {"blocks.0.hook_resid_post"}
    model.reset_saes()
    assert model.acts_to_saes == {} and isinstance(model.hook_dict[HOOK], torch.nn.Module)
    torch.testing.assert_close(model(toks), base, rtol=0, atol=0)


@torch.no_grad()
def test_exclude_special_tokens_matches_sae_lens(models):
    ref_model, model = models
    sae = sae_lens_sae("standard")
    toks = tokens()
    toks[:, 0] = 5
    want = ref_model.run_with_saes(toks, saes=[sae], exclude_special_tokens=[5])
    got = model.run_with_saes(toks, saes=[sae], exclude_special_tokens=[5])
    torch.testing.assert_close(got, want, **LOGIT_TOL)
    with pytest.raises(ValueError, match="tokenizer"):
        model.run_with_saes(toks, saes=[sae], exclude_special_tokens=True)


def test_gradients_match_sae_lens(models):
    ref_model, model = models
    sae = sae_lens_sae("topk")
    ours = sk.SAE.from_sae_lens(sae, copy=True)
    toks = tokens()
    ref_model.run_with_saes(toks, saes=[sae], return_type="loss").backward()
    model.run_with_saes(toks, saes=[ours], return_type="loss").backward()
    # the CE loss is a mean over 14 positions: the SAE's gradients are sums of 14 products of back-propagated
    # signals (|.| <~ 1e-2) and activations (|.| <~ 10), |grad| <~ 0.1, so their fp32 noise (~ u * sqrt(n) *
    # |grad|, n <= 141 * 14) is ~1e-7 relative: rtol 1e-4 / atol 1e-5 is >= 100 sigma
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(sae, name).grad, rtol=1e-4, atol=1e-5)
    ref_model.zero_grad()
    model.zero_grad()


def test_bad_input(models):
    _, model = models
    with pytest.raises(ValueError, match="hook_name='blocks.9.hook_resid_pre'"):
        model.add_sae(sae_lens_sae("topk", hook="blocks.9.hook_resid_pre"))
    with pytest.raises(TypeError, match="sparsekern.SAE or a sae_lens"):
        model.add_sae(torch.nn.Linear(2, 2))
    wrong = sae_lens_sae("topk", d_in=16)
    with pytest.raises(ValueError, match="d_in=16"):
        model.run_with_saes(tokens(), saes=[wrong])
    assert model.acts_to_saes == {}


@pytest.mark.parametrize("use_error_term", [False, True])
@torch.no_grad()
def test_hook_z_sae_matches_sae_lens(models, use_error_term):
    ref_model, model = models
    sae = sae_lens_sae("jumprelu", hook="blocks.0.attn.hook_z", reshape_activations="hook_z")
    toks = tokens()
    want, cw = ref_model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    got, cg = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term)
    torch.testing.assert_close(got, want, **LOGIT_TOL)
    assert_cache_equal(cw, cg)
    _, cs = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=use_error_term, sparse=True)
    torch.testing.assert_close(cs["blocks.0.attn.hook_z.hook_sae_acts_post"].to_dense(D_SAE),
                               cw["blocks.0.attn.hook_z.hook_sae_acts_post"], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_exclude_special_tokens_with_start_at_layer(models):
    """A residual input (start_at_layer) carries no tokens: the special-token mask comes from tokens=."""
    _, model = models
    sae = sae_lens_sae("standard")
    toks = tokens()
    toks[:, 0] = 5
    with model.saes([sae], exclude_special_tokens=[5]):
        want = model(toks)
        _, cache = model.run_with_cache(toks, names_filter=["blocks.0.hook_resid_pre"])
        resid = cache["blocks.0.hook_resid_pre"]
        got = model(resid, start_at_layer=0, tokens=toks)
        with pytest.raises(ValueError, match="tokens="):
            model(resid, start_at_layer=0)
    torch.testing.assert_close(got, want, **LOGIT_TOL)
