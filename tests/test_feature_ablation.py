"""sparsekern.patching.feature_ablation == one hooked forward per ablation, on tiny random models.

The oracle is written here from the SAE's public API only: the dense code ``sae.encode`` of the cached
hook activation, and per ablation one ``model.run_with_hooks`` whose hook subtracts ``a_f * W_dec[f]``
(after replacing the activation by ``sae(act)`` when there is no error term). It runs on a sample of the
entries; the function under test runs the full sweep. A second oracle ablates the SAELens way (zeroing
``hook_sae_acts_post[..., f]`` with the SAE attached to a HookedSAETransformer).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens")
from test_patching import V, make_model
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
from sparsekern.patching.feature_ablation import FeatureAblationResult, ablate_features

B, T, D_SAE = 2, 5, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box
    yield
    torch.set_num_threads(n)


_MODELS: dict = {}


def model_for(arch: str) -> HookedTransformer:
    if arch not in _MODELS:
        if arch == "bidirectional":  # non-causal: every ablation recomputes all positions
            cfg = HookedTransformerConfig(
                n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=V, n_ctx=16,
                act_fn="gelu_new", normalization_type="LN", attention_dir="bidirectional", seed=0,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _MODELS[arch] = HookedTransformer(cfg).eval()
        else:
            _MODELS[arch] = make_model(arch)
    return _MODELS[arch]


def randomize(sae, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    return sae.eval()


def make_sae(kind: str, hook: str, d_in: int = 32, seed: int = 1, **extra):
    if kind == "topk":
        cfg = sk.TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=6, **extra)
        sae = sk.TopKSAE(cfg)
    elif kind == "jumprelu":
        cfg = sk.JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE, **extra)
        sae = sk.JumpReLUSAE(cfg)
    else:
        raise AssertionError(kind)
    sae.cfg.metadata.hook_name = hook
    return randomize(sae, seed)


def tokens(seed: int = 2, batch: int = B, pos: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, pos), generator=torch.Generator().manual_seed(seed))


def logit_diff(logits):  # last position: one logit position is read (lazy unembedding)
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def mean_logprob(logits):  # every position
    return logits.log_softmax(-1)[..., 11].mean()


METRICS = (logit_diff, mean_logprob)


class Oracle:
    """One ``run_with_hooks`` per ablation, from the SAE's dense ``encode`` / ``decode``: ablating ``f``
    subtracts ``decode(code) - decode(code with f zeroed)`` (its contribution, whatever the SAE's code
    scaling or input normalisation)."""

    def __init__(self, model, toks, sae, use_error_term: bool):
        meta = sae.cfg.metadata
        self.hook_in = meta.hook_name
        self.hook_out = getattr(meta, "hook_name_out", None) or self.hook_in
        self.model, self.toks, self.sae, self.uet = model, toks, sae, use_error_term
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=[self.hook_in, self.hook_out])
            x = cache[self.hook_in]
            self.x = x.flatten(2) if x.dim() == 4 else x
            self.shape = cache[self.hook_out].shape
            self.code = sae.encode(self.x)  # [B, T, d_sae]
            self.recon = self.decode(self.code)

    def decode(self, code):
        self.sae.encode(self.x)  # decode reads the input-normalisation statistics of the last encode
        return self.sae.decode(code).reshape(self.shape)

    def logits(self, f: int | None, pos: int | None):
        """Logits with feature ``f`` removed at position ``pos`` (None: everywhere; f None: no ablation)."""
        d = torch.zeros(self.shape)
        if f is not None:
            code = self.code.clone()
            code[:, slice(None) if pos is None else pos, f] = 0
            with torch.no_grad():
                d = self.recon - self.decode(code)

        def hook(act, hook=None):
            return (act if self.uet else self.recon) - d

        with torch.no_grad():
            return self.model.run_with_hooks(self.toks, fwd_hooks=[(self.hook_out, hook)])


def close(got, want, tol=1e-5):
    # tol: the derivation of tests/test_patching.py's close() (same models: K ~ 20 rounded fp32 stages of
    # reductions n <= 64, K * sqrt(n) * u ~ 1e-5 of max(1, |want|)); the oracle's ablation adds one stage,
    # recon - decode(code without f) (a d_sae = 64 reduction, same order), where ours multiplies
    # a_f * W_dec[f] directly. (Observed on an AVX2 EPYC: <= 1e-6.)
    scale = max(1.0, float(torch.as_tensor(want).abs().max()))
    err = float((torch.as_tensor(got) - torch.as_tensor(want)).abs().max())
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} * {scale:.3g}"


def check_against_oracle(model, toks, sae, per_position, uet, features, n_sample=6):
    oracle = Oracle(model, toks, sae, uet)
    base_logits = oracle.logits(None, None)
    results = {
        m: ablate_features(
            model, toks, sae, m, features, per_position=per_position, use_error_term=uet, progress=False
        )
        for m in METRICS
    }
    res = results[METRICS[0]]
    assert isinstance(res, FeatureAblationResult)
    n = len(features) if features is not None else int((oracle.code != 0).any(1).any(0).sum())
    assert res.values.shape == ((n, T) if per_position else (n,))
    assert res.values.dtype == torch.float32 and res.feature_ids.dtype == torch.int64
    # feature ids and the active mask, from the dense code
    active_ft = (oracle.code != 0).any(0).T  # [d_sae, T]
    if features is None:
        assert torch.equal(res.feature_ids, active_ft.any(1).nonzero().flatten())
    else:
        assert res.feature_ids.tolist() == list(features)
    want_active = active_ft[res.feature_ids] if per_position else active_ft[res.feature_ids].any(1)
    assert torch.equal(res.active, want_active)
    # the inactive entries are exactly zero (nothing to ablate)
    for r in results.values():
        assert bool((r.values[~r.active] == 0).all())
    # sampled active entries (and one inactive one) against one hooked forward each
    cells = res.active.nonzero().tolist()
    g = torch.Generator().manual_seed(0)
    picks = [cells[i] for i in torch.randperm(len(cells), generator=g)[:n_sample].tolist()]
    inactive = (~res.active).nonzero().tolist()
    picks += inactive[:1]
    assert picks
    for m, r in results.items():
        close(r.baseline, m(base_logits))
    for cell in picks:
        f = int(res.feature_ids[cell[0]])
        lg = oracle.logits(f, cell[1] if per_position else None)
        for m, r in results.items():
            close(r.values[tuple(cell)], m(lg) - m(base_logits))
    return res


CASES = [  # arch, hook, SAE kind, per_position, use_error_term, features (None: all active)
    ("gpt2", "blocks.1.hook_resid_pre", "topk", False, True, None),
    ("gpt2", "blocks.0.hook_mlp_out", "jumprelu", True, False, [5, 0, 17, 63, 5]),
    ("gpt2", "blocks.1.hook_resid_post", "topk", True, True, None),  # late join into the final norm
    ("llama_gqa", "blocks.1.hook_resid_pre", "jumprelu", True, True, None),
    ("llama_gqa", "blocks.1.attn.hook_z", "topk", False, False, [3, 9, 12, 40]),
    ("llama_gqa", "blocks.0.hook_mlp_out", "topk", True, True, None),
    ("attn_only", "blocks.0.hook_attn_out", "topk", True, True, [1, 2, 3, 4, 5, 6, 7, 8]),
    ("attn_only", "blocks.1.hook_resid_pre", "jumprelu", False, False, None),
    ("parallel", "blocks.0.attn.hook_z", "jumprelu", True, True, None),
    ("parallel", "blocks.1.hook_mlp_out", "topk", False, True, None),
    ("bidirectional", "blocks.1.hook_resid_pre", "topk", True, False, None),
]


@pytest.mark.parametrize(
    "arch,hook,kind,per_position,uet,features", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
)
def test_matches_one_hooked_forward_per_ablation(arch, hook, kind, per_position, uet, features):
    model = model_for(arch)
    check_against_oracle(model, tokens(), make_sae(kind, hook), per_position, uet, features)


def test_topk_rescaled_code_and_normalised_input():
    model = model_for("gpt2")
    sae = make_sae("topk", "blocks.1.hook_resid_pre", rescale_acts_by_decoder_norm=True)
    check_against_oracle(model, tokens(), sae, True, True, None, n_sample=3)
    sae = make_sae("jumprelu", "blocks.1.hook_resid_pre", normalize_activations="constant_norm_rescale")
    check_against_oracle(model, tokens(), sae, False, False, None, n_sample=3)
    sae = make_sae("jumprelu", "blocks.1.hook_resid_pre", normalize_activations="layer_norm")
    check_against_oracle(model, tokens(), sae, True, True, None, n_sample=3)


def test_transcoder_ablates_at_its_output_hook():
    model = model_for("gpt2")
    cfg = sk.TopKTranscoderConfig(d_in=32, d_sae=D_SAE, d_out=32, k=5)
    cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    tc = randomize(sk.TopKTranscoder(cfg))
    for per_position, uet in ((True, True), (False, False)):
        check_against_oracle(model, tokens(), tc, per_position, uet, None, n_sample=3)


@pytest.mark.parametrize("use_error_term", [True, False])
def test_equals_sae_lens_style_ablation(use_error_term):
    """Zeroing ``hook_sae_acts_post[..., f]`` with the SAE attached is the same ablation."""
    sae_lens = pytest.importorskip("sae_lens")
    base = make_model("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = sk.HookedSAETransformer(base.cfg).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    hook = "blocks.1.hook_resid_pre"
    cfg = sae_lens.JumpReLUSAEConfig(d_in=32, d_sae=D_SAE)
    cfg.metadata.hook_name = hook
    sl_sae = randomize(sae_lens.JumpReLUSAE(cfg))  # a sae_lens SAE: converted inside
    toks = tokens()
    res = ablate_features(model, toks, sl_sae, logit_diff, per_position=True, use_error_term=use_error_term,
                          progress=False)  # fmt: skip

    def run(f=None, pos=None):
        def zero(acts, hook=None):
            acts[:, pos, f] = 0
            return acts

        hooks = [] if f is None else [(f"{hook}.hook_sae_acts_post", zero)]
        with torch.no_grad(), model.saes([sl_sae], use_error_term=use_error_term):
            return logit_diff(model.run_with_hooks(toks, fwd_hooks=hooks))

    base_val = run()
    close(res.baseline, base_val)
    for row, p in res.active.nonzero().tolist()[::7]:
        close(res.values[row, p], run(int(res.feature_ids[row]), p) - base_val)
    assert model.acts_to_saes == {}


def test_options_reference_backend_and_fallback(monkeypatch):
    import sparsekern.patching._common as common
    import sparsekern.patching.feature_ablation as fa

    model = model_for("gpt2")
    toks = tokens(seed=5)
    sae = make_sae("topk", "blocks.0.hook_resid_post")
    everything = ablate_features(model, toks, sae, logit_diff, progress=False).feature_ids.tolist()
    inactive = min(set(range(D_SAE)) - set(everything))
    feats = [everything[3], everything[3], inactive, everything[0], everything[-1], everything[5]]
    kw = {"per_position": True, "progress": False}
    reference = fa.run_reference
    with monkeypatch.context() as mp:  # the default path is the engine, never one forward per ablation
        mp.setattr(fa, "run_reference", None)
        auto = ablate_features(model, toks, sae, mean_logprob, feats, **kw)
        one = ablate_features(model, toks, sae, mean_logprob, torch.tensor(feats), max_batch=1, **kw)
        small = ablate_features(model, toks, sae, mean_logprob, feats, memory_budget=1, **kw)
    assert fa.run_reference is reference
    ref = ablate_features(model, toks, sae, mean_logprob, feats, backend="reference", **kw)
    for r in (ref, one, small):
        close(r.values, auto.values)
        assert torch.equal(r.active, auto.active)
    assert int(auto.active.sum()) >= 6 and not bool(auto.active[2].any())
    assert torch.equal(auto.values[0], auto.values[1])  # a repeated id: same row
    raw = ablate_features(model, toks, sae, mean_logprob, feats, return_delta=False, **kw)
    close(raw.values, auto.values + auto.baseline)
    assert bool((raw.values[~raw.active] == raw.baseline).all())
    # no feature given: empty result
    empty = ablate_features(model, toks, sae, mean_logprob, [], progress=False)
    assert empty.values.shape == (0,) and empty.feature_ids.shape == (0,)
    # a 1-D prompt is a batch of one
    one_row = ablate_features(model, toks[0], sae, logit_diff, progress=False)
    assert one_row.values.dim() == 1
    # a hook outside the blocks runs one forward per ablation (warned), same numbers
    emb = make_sae("topk", "hook_embed")
    monkeypatch.setattr(common, "_WARNED", set())  # warned once per process
    with pytest.warns(UserWarning, match="one forward per ablation"):
        check_against_oracle(model, toks, emb, False, True, None, n_sample=3)


def test_bad_input():
    model = model_for("gpt2")
    toks = tokens()
    sae = make_sae("topk", "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match=r"features: id\(s\) \[64\] out of range \[0, d_sae=64\)"):
        ablate_features(model, toks, sae, logit_diff, [3, 64])
    with pytest.raises(ValueError, match=r"out of range"):
        ablate_features(model, toks, sae, logit_diff, [-1])
    with pytest.raises(TypeError, match="features"):
        ablate_features(model, toks, sae, logit_diff, [1.5])
    with pytest.raises(ValueError, match="is not a hook of this model"):
        ablate_features(model, toks, make_sae("topk", "blocks.7.hook_resid_pre"), logit_diff)
    with pytest.raises(ValueError, match="hook_name must name a hook"):
        ablate_features(model, toks, make_sae("topk", None), logit_diff)
    with pytest.raises(ValueError, match=r"tokens must have shape \[batch, pos\]"):
        ablate_features(model, toks[None], sae, logit_diff)
    with pytest.raises(TypeError, match="integer tensor"):
        ablate_features(model, toks.float(), sae, logit_diff)
    with pytest.raises(ValueError, match=r"needs \[batch=2, pos=5, 48\]"):
        ablate_features(model, toks, make_sae("topk", "blocks.1.hook_resid_pre", d_in=48), logit_diff)
    with pytest.raises(TypeError, match="metric must return a scalar"):
        ablate_features(model, toks, sae, lambda lg: lg[:, -1, 0], progress=False)
    with pytest.raises(TypeError, match="metric must be callable"):
        ablate_features(model, toks, sae, None)
    with pytest.raises(ValueError, match="max_batch"):
        ablate_features(model, toks, sae, logit_diff, max_batch=0)
    with pytest.raises(ValueError, match="backend"):
        ablate_features(model, toks, sae, logit_diff, backend="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        hst = sk.HookedSAETransformer(model.cfg).eval()
    hst.add_sae(sae)
    with pytest.raises(ValueError, match="already attached"):
        ablate_features(hst, toks, sae, logit_diff)


def test_other_saes_attached_stay_in_the_model():
    """A HookedSAETransformer with an SAE spliced upstream: the baseline and every ablation include it."""
    base = make_model("llama_gqa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = sk.HookedSAETransformer(base.cfg).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    model.add_sae(make_sae("jumprelu", "blocks.0.hook_resid_post", seed=3), use_error_term=False)
    toks = tokens(seed=7)
    sae = make_sae("topk", "blocks.1.hook_mlp_out")
    kw = {"per_position": True, "progress": False}
    auto = ablate_features(model, toks, sae, mean_logprob, **kw)
    ref = ablate_features(model, toks, sae, mean_logprob, backend="reference", **kw)
    close(auto.values, ref.values)
    close(auto.baseline, ref.baseline)
    with torch.no_grad():
        close(auto.baseline, mean_logprob(model(toks)))
    assert "blocks.0.hook_resid_post" in model.acts_to_saes
