"""sparsekern.features.metrics.reconstruction_metrics against written-out formulas (plain torch + the
model run with replacement hooks / HookedSAETransformer splicing) and against SAELens's own eval
functions (``get_sparsity_and_variance_metrics`` / ``get_downstream_reconstruction_metrics``, fed the
same token batches through a minimal stand-in for their ActivationsStore)."""

import math

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.evals import (  # noqa: E402
    get_downstream_reconstruction_metrics,
    get_sparsity_and_variance_metrics,
)
from sae_lens.training.activation_scaler import ActivationScaler  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.features.metrics import ReconstructionMetrics, reconstruction_metrics  # noqa: E402

D_MODEL, D_SAE, VOCAB, POS = 32, 96, 50, 12
HOOK = "blocks.1.hook_resid_pre"
SCALARS = ["explained_variance", "explained_variance_legacy", "mse", "cossim", "l2_norm_in", "l2_norm_out",
           "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "ce_loss_without_sae", "ce_loss_with_sae",
           "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation",
           "kl_div_score"]


def model_cfg(**kw):
    base = dict(n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=VOCAB,
                act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sk.HookedSAETransformer(model_cfg()).eval()


def batches(n=3, batch=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(1, VOCAB, (batch, POS), generator=g)
        t[:, 0] = 0  # a BOS-like token to ignore
        t[0, 5] = 0
        out.append(t)
    return out


def sae_lens_sae(arch, hook=HOOK, d_in=D_MODEL, seed=1, **extra):
    cfg_cls, cls = {
        "standard": (sae_lens.StandardSAEConfig, sae_lens.StandardSAE),
        "jumprelu": (sae_lens.JumpReLUSAEConfig, sae_lens.JumpReLUSAE),
        "topk": (sae_lens.TopKSAEConfig, sae_lens.TopKSAE),
    }[arch]
    if arch == "topk":
        extra.setdefault("k", 10)
    cfg = cfg_cls(d_in=d_in, d_sae=D_SAE, **extra)
    cfg.metadata.hook_name = hook
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.3)
        sae.b_enc[:8] = -100.0  # dead
        sae.b_enc[8:10] = 100.0  # fire on every token...
        sae.W_dec[8:10] = 0.0  # ...without swamping the reconstruction
    return sae.eval()


class FakeStore:
    """What SAELens's eval functions use of an ActivationsStore: get_batch_tokens."""

    def __init__(self, toks):
        self.it = iter(toks)

    def get_batch_tokens(self, n):
        t = next(self.it)
        assert t.shape[0] == n
        return t


def kl(clean, new):
    lp, lq = clean.double().log_softmax(-1), new.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def written_out(model, hook_in, hook_out, toks_list, encode_decode, splice, ignore=None):
    """Every metric by its definition, on the concatenated stream, in float64."""
    xs, xhs, fs, legacy = [], [], [], []
    ce = {"clean": [], "sae": [], "zero": []}
    kls = {"sae": [], "zero": []}
    for toks in toks_list:
        keep = ~torch.isin(toks, torch.tensor(ignore or [], dtype=torch.int64))
        logits, loss = model(toks, return_type="both", loss_per_token=True)
        _, cache = model.run_with_cache(toks, names_filter=[hook_in, hook_out])
        f, xh = encode_decode(cache[hook_in])
        x = cache[hook_out].flatten(2)[keep].double()
        xh = xh.flatten(2)[keep].double()
        xs.append(x), xhs.append(xh), fs.append(f[keep].double())
        legacy.append(1 - (x - xh).pow(2).sum(-1) / (x - x.mean(0)).pow(2).sum(-1))
        s_logits, s_loss = splice(toks)
        z_logits, z_loss = model.run_with_hooks(
            toks, fwd_hooks=[(hook_out, lambda a, hook: torch.zeros_like(a))], return_type="both",
            loss_per_token=True)
        for name, lo, lg in (("clean", loss, logits), ("sae", s_loss, s_logits), ("zero", z_loss, z_logits)):
            ce[name].append(lo[keep[:, :-1]].double())
            if name != "clean":
                kls[name].append(kl(logits, lg)[keep])
    x, xh, f = torch.cat(xs), torch.cat(xhs), torch.cat(fs)
    res = (x - xh).pow(2).sum(-1)
    n_in, n_out = x.norm(dim=-1), xh.norm(dim=-1)
    c = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    k_ = {k: torch.cat(v).mean().item() for k, v in kls.items()}
    return {
        "explained_variance": 1 - res.sum().item() / (x - x.mean(0)).pow(2).sum().item(),
        "explained_variance_legacy": torch.cat(legacy).mean().item(),
        "mse": res.mean().item(),
        "cossim": ((x * xh).sum(-1) / (n_in * n_out)).mean().item(),
        "l2_norm_in": n_in.mean().item(),
        "l2_norm_out": n_out.mean().item(),
        "l2_ratio": (n_out / n_in).mean().item(),
        "relative_reconstruction_bias": (n_out.pow(2).mean() / (x * xh).sum(-1).mean()).item(),
        "l0": (f != 0).sum(-1).double().mean().item(),
        "l1": f.abs().sum(-1).mean().item(),
        "density": (f != 0).double().mean(0),
        "n": x.shape[0],
        "ce_loss_without_sae": c["clean"], "ce_loss_with_sae": c["sae"], "ce_loss_with_ablation": c["zero"],
        "ce_loss_score": (c["zero"] - c["sae"]) / (c["zero"] - c["clean"]),
        "kl_div_with_sae": k_["sae"], "kl_div_with_ablation": k_["zero"],
        "kl_div_score": (k_["zero"] - k_["sae"]) / k_["zero"],
    }


def assert_metrics(got, want, keys=SCALARS, rtol=2e-5, atol=1e-6):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("ignore", [None, [0]], ids=["all_tokens", "ignore_bos"])
def test_matches_written_out_formulas_and_splicing(model, arch, ignore):
    sl = sae_lens_sae(arch)
    ours = sk.SAE.from_sae_lens(sl)
    toks = batches()
    got = reconstruction_metrics(model, ours, toks, ignore_tokens=ignore, progress=False)
    assert isinstance(got, ReconstructionMetrics)

    def enc_dec(x):
        f = sl.encode(x)
        return f, sl.decode(f)

    def splice(t):  # HookedSAETransformer splicing (full forward), special tokens left alone
        return model.run_with_saes(t, saes=[sl], use_error_term=False, exclude_special_tokens=ignore or False,
                                   return_type="both", loss_per_token=True)

    want = written_out(model, HOOK, HOOK, toks, enc_dec, splice, ignore)
    d = got.to_dict()
    assert_metrics(d, want)
    assert got.n_tokens == want["n"] and got.n_sequences == 12
    torch.testing.assert_close(got.feature_density, want["density"], rtol=0, atol=1e-12)
    assert torch.equal(got.dead_features, (want["density"] == 0).nonzero().flatten())
    assert set(range(8)) <= set(got.dead_features.tolist())
    assert torch.equal(got.dense_features, (want["density"] > 0.1).nonzero().flatten())
    assert {8, 9} <= set(got.dense_features.tolist())
    assert d["n_dead_features"] == got.dead_features.numel()
    assert all(math.isfinite(d[k]) for k in SCALARS)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
@pytest.mark.parametrize("ignore", [None, [0]], ids=["all_tokens", "ignore_bos"])
def test_matches_sae_lens_evals(model, arch, ignore):
    sl = sae_lens_sae(arch, seed=2)
    toks = batches(seed=4)
    got = reconstruction_metrics(model, sk.SAE.from_sae_lens(sl), toks, ignore_tokens=ignore, progress=False)
    scaler = ActivationScaler()
    sv, feats = get_sparsity_and_variance_metrics(
        sl, model, FakeStore(toks), scaler, n_batches=3, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=4,
        model_kwargs={}, ignore_tokens=ignore)
    down = get_downstream_reconstruction_metrics(
        sl, model, FakeStore(toks), scaler, compute_kl=True, compute_ce_loss=True, n_batches=3,
        eval_batch_size_prompts=4, ignore_tokens=ignore)
    keys = [k for k in SCALARS if k != "relative_reconstruction_bias"]  # SAELens: mean of per-batch ratios
    assert_metrics(got.to_dict(), {**sv, **down}, keys)
    torch.testing.assert_close(got.feature_density.float(), torch.tensor(feats["feature_density"]))
    # one batch: the stream ratio and SAELens's per-batch ratio coincide
    one = reconstruction_metrics(model, sk.SAE.from_sae_lens(sl), toks[:1], ignore_tokens=ignore,
                                 compute_downstream=False, progress=False)
    sv1, _ = get_sparsity_and_variance_metrics(
        sl, model, FakeStore(toks[:1]), scaler, n_batches=1, compute_l2_norms=True,
        compute_sparsity_metrics=False, compute_variance_metrics=False,
        compute_featurewise_density_statistics=False, eval_batch_size_prompts=4, model_kwargs={},
        ignore_tokens=ignore)
    assert one.relative_reconstruction_bias == pytest.approx(sv1["relative_reconstruction_bias"], rel=1e-5)


@pytest.mark.parametrize("cls", ["transcoder", "topk_transcoder"])
def test_transcoder(model, cls):
    """Reconstruction against the output hook; splice = HookedSAETransformer's transcoder splicing."""
    hook_in, hook_out = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"
    if cls == "transcoder":
        cfg = sk.TranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL)
    else:
        cfg = sk.TopKTranscoderConfig(d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, k=8)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = hook_in, hook_out
    tc = sk.SAE.from_dict(cfg.to_dict())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    toks = batches(n=2, seed=5)
    got = reconstruction_metrics(model, tc, toks, progress=False)

    def enc_dec(x):  # plain torch: relu / top-k of x @ W_enc + b_enc, then @ W_dec + b_dec
        pre = x @ tc.W_enc + tc.b_enc
        if cls == "topk_transcoder":
            v, i = pre.topk(8, dim=-1)
            pre = torch.zeros_like(pre).scatter(-1, i, v)
        f = pre.relu()
        return f, f @ tc.W_dec + tc.b_dec

    def splice(t):
        return model.run_with_saes(t, saes=[tc], return_type="both", loss_per_token=True)

    want = written_out(model, hook_in, hook_out, toks, enc_dec, splice)
    assert_metrics(got.to_dict(), want)


def test_hook_z_sae_matches_sae_lens(model):
    sl = sae_lens_sae("jumprelu", hook="blocks.0.attn.hook_z", reshape_activations="hook_z", seed=7)
    ours = sk.SAE.from_sae_lens(sl, copy=True)
    toks = batches(n=2, seed=8)
    got = reconstruction_metrics(model, ours, toks, progress=False)
    sl.turn_off_forward_pass_hook_z_reshaping()  # as sae_lens.evals.run_evals does
    scaler = ActivationScaler()
    sv, _ = get_sparsity_and_variance_metrics(
        sl, model, FakeStore(toks), scaler, n_batches=2, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=4, model_kwargs={})
    down = get_downstream_reconstruction_metrics(sl, model, FakeStore(toks), scaler, compute_kl=True,
                                                 compute_ce_loss=True, n_batches=2, eval_batch_size_prompts=4)
    assert_metrics(got.to_dict(), {**sv, **down}, [k for k in SCALARS if k != "relative_reconstruction_bias"])


@pytest.mark.parametrize("pos_type", ["standard", "shortformer", "rotary"])
def test_skip_early_layers_changes_nothing(pos_type):
    """Spliced / ablated runs started at the hook's layer from the cached residual == full runs; plain
    HookedTransformer; compute_downstream=False gives the same reconstruction metrics."""
    torch.manual_seed(1)
    m = HookedTransformer(model_cfg(positional_embedding_type=pos_type, n_layers=3)).eval()
    sae = sk.SAE.from_sae_lens(sae_lens_sae("topk", hook="blocks.2.hook_resid_post", seed=9))
    toks = batches(n=2, seed=10)
    fast = reconstruction_metrics(m, sae, toks, progress=False).to_dict()
    full = reconstruction_metrics(m, sae, toks, skip_early_layers=False, progress=False).to_dict()
    assert_metrics(fast, full, rtol=1e-6, atol=1e-7)
    recon = reconstruction_metrics(m, sae, toks, compute_downstream=False, progress=False).to_dict()
    assert recon["ce_loss_score"] is None and recon["kl_div_score"] is None
    assert_metrics(recon, full, SCALARS[:10], rtol=1e-12, atol=0)


def test_bad_input(model):
    sae = sk.SAE.from_sae_lens(sae_lens_sae("topk"))
    toks = batches(n=1)
    with pytest.raises(ValueError, match="not a hook of this model"):
        reconstruction_metrics(model, sae, toks, hook_name="blocks.7.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match=r"int token tensors \[batch, pos\]"):
        reconstruction_metrics(model, sae, [toks[0][0]], progress=False)
    with pytest.raises(ValueError, match=r"int token tensors \[batch, pos\]"):
        reconstruction_metrics(model, sae, [toks[0].float()], progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(model, sae, [], progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        reconstruction_metrics(model, sae, toks, ignore_tokens=list(range(VOCAB)), progress=False)
    with pytest.raises(ValueError, match="dense_threshold"):
        reconstruction_metrics(model, sae, toks, dense_threshold=2, progress=False)
    with pytest.raises(ValueError, match="does not match the activation"):
        reconstruction_metrics(model, sae, toks, hook_name_out="blocks.0.mlp.hook_post", progress=False)
    head = sae_lens_sae("topk", hook="blocks.0.attn.hook_z", d_in=8)
    head.cfg.metadata.hook_head_index = 1
    with pytest.raises(ValueError, match="hook_head_index"):
        reconstruction_metrics(model, head, toks, progress=False)
    model.add_sae(sae)
    try:
        with pytest.raises(ValueError, match="an SAE is attached"):
            reconstruction_metrics(model, sae, toks, progress=False)
    finally:
        model.reset_saes()
    assert not math.isnan(reconstruction_metrics(model, sae, toks, progress=False).ce_loss_score)
