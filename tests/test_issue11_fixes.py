"""Issue 11: notebook code run as a new user would, and bad inputs that gave silent wrong answers or
unclear errors. One test (or a few) per item of the issue's list; tiny random-weight models throughout."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

sae_lens = pytest.importorskip("sae_lens")
import transformer_lens.patching as tlp  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.utilities.slice import Slice  # noqa: E402

import sparsekern as sk  # noqa: E402
import sparsekern.patching as skp  # noqa: E402
from sparsekern import cli  # noqa: E402
from sparsekern.compat.transcoder_circuits import LanguageModelSAERunnerConfig, SparseAutoencoder  # noqa: E402
from sparsekern.features import top_activating_examples  # noqa: E402

D, D_SAE, VOCAB, B, T = 16, 48, 40, 2, 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box
    yield
    torch.set_num_threads(n)


def model_cfg(**kw) -> HookedTransformerConfig:
    base = dict(n_layers=2, d_model=D, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB,
                act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model() -> sk.HookedSAETransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sk.HookedSAETransformer(model_cfg()).eval()


def tokens(batch: int = B, pos: int = T, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def dunefsky(transcoder: bool = True, seed: int = 0) -> SparseAutoencoder:
    """His SparseAutoencoder (his init) with random biases, reading blocks.0.ln2.hook_normalized."""
    torch.manual_seed(seed)
    cfg = LanguageModelSAERunnerConfig(
        d_in=D, d_sae=D_SAE, is_transcoder=transcoder, d_out=D if transcoder else None,
        hook_point="blocks.0.ln2.hook_normalized" if transcoder else "blocks.0.hook_resid_post",
        hook_point_layer=0, out_hook_point="blocks.0.hook_mlp_out" if transcoder else None,
        out_hook_point_layer=0 if transcoder else None, dtype=torch.float32, device="cpu",
    )
    tc = SparseAutoencoder(cfg)
    with torch.no_grad():
        for b in (tc.b_enc, tc.b_dec, tc.b_dec_out):
            if b is not None:
                b.normal_(0, 0.2)
    return tc.eval()


# ---- 1. Dunefsky's class in add_sae / run_with_saes ------------------------------------------------
@torch.no_grad()
def test_dunefsky_transcoder_splices_like_his_forward(model):
    tc = dunefsky()
    toks = tokens()
    captured = {}

    def grab(x, hook):
        captured["x"] = x

    def replace(act, hook):
        return tc(captured["x"])[0]  # his forward on the MLP input, in place of the MLP output

    want = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.ln2.hook_normalized", grab),
                                                 ("blocks.0.hook_mlp_out", replace)])
    got = model.run_with_saes(toks, saes=[tc])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # with the error term the model's own output comes back
    torch.testing.assert_close(model.run_with_saes(toks, saes=[tc], use_error_term=True), model(toks),
                               rtol=1e-4, atol=1e-4)

    model.add_sae(tc)
    try:
        assert model.acts_to_saes == {"blocks.0.ln2.hook_normalized": tc}
        twin = sk.hooked_sae_transformer.as_sparsekern_sae(tc)
        assert isinstance(twin, sk.Transcoder)
        assert twin.W_enc is tc.W_enc and twin.W_dec is tc.W_dec and twin.b_dec is tc.b_dec_out  # shared
        _, cache = model.run_with_cache(toks)
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_acts_post"],
                                   tc(captured["x"])[1], rtol=1e-5, atol=1e-6)
    finally:
        model.reset_saes()
    # an in-place edit of a weight the folded b_enc comes from is picked up by the next add_sae
    tc.b_dec.add_(0.5)
    model.run_with_hooks(toks, fwd_hooks=[("blocks.0.ln2.hook_normalized", grab)])
    torch.testing.assert_close(
        model.run_with_saes(toks, saes=[tc]),
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_mlp_out", replace)]), rtol=1e-5, atol=1e-5,
    )


@torch.no_grad()
def test_dunefsky_plain_sae_splices_and_other_modules_are_a_type_error(model):
    sae = dunefsky(transcoder=False, seed=1)
    toks = tokens()
    want = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: sae(a)[0])])
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]), want, rtol=1e-5, atol=1e-5)
    twin = sae.to_sparsekern(share_weights=True)
    assert isinstance(twin, sk.StandardSAE) and all(
        getattr(twin, n) is getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))

    class LooksLikeAnSAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = object()
            self.W_dec = nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(TypeError, match="expected a sparsekern.SAE.*LooksLikeAnSAE"):
        model.add_sae(LooksLikeAnSAE())


# ---- 2 and 9. top_activating_examples: Dunefsky's class, flattened rows, token dtypes ----------------
def brute_force(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature the k largest positive values of a dense [S, P, d_sae] code and their (seq, pos)."""
    S, P, d_sae = dense.shape
    flat = dense.double().reshape(S * P, d_sae).t()
    v, r = torch.where(flat > 0, flat, -math.inf).topk(k, dim=1)
    loc = torch.stack([r // P, r % P], -1)
    loc[v == -math.inf] = -1
    return v, loc


def assert_state(state, v, loc):
    assert torch.equal(state.locations, loc)
    f = v > -math.inf
    assert torch.equal(state.values == -math.inf, ~f)
    torch.testing.assert_close(state.values.double()[f], v[f], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_top_examples_take_dunefsky_class_and_flattened_rows(model):
    tc = dunefsky()
    acts = torch.randn(5, 4, D, generator=torch.Generator().manual_seed(0))
    v, loc = brute_force(tc.encode(acts), 3)
    assert_state(top_activating_examples(tc, acts.split(2), k=3, progress=False), v, loc)
    # seed 001's flattened [rows, d_in] batches: row r is sequence r, position 0
    rows = acts.reshape(-1, D)
    state = top_activating_examples(tc, rows.split(7), k=3, progress=False)
    v, loc = brute_force(tc.encode(rows)[:, None], 3)
    assert_state(state, v, loc)
    assert bool((state.locations[..., 1][state.locations[..., 0] >= 0] == 0).all())
    # with a model: his cfg.hook_point is the default hook
    toks = tokens(batch=4)
    toks[:, 0] = torch.arange(4)  # distinct prefixes: no ties between sequences
    _, cache = model.run_with_cache(toks, names_filter=tc.cfg.hook_point)
    v, loc = brute_force(tc.encode(cache[tc.cfg.hook_point]), 3)
    assert_state(top_activating_examples(tc, toks.split(3), k=3, model=model, progress=False), v, loc)


def test_top_examples_reject_bad_tokens_and_activations_up_front():
    class NoModelCall:
        def run_with_cache(self, *a, **kw):
            raise AssertionError("the model must not run on bad tokens")

    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(TypeError, match=r"integer tokens \[batch, pos\].*float32"):
        top_activating_examples(sae, [tokens().float()], model=NoModelCall(), progress=False)
    with pytest.raises(TypeError, match=r"float tensor \[batch, pos, d_in\].*int64.*model="):
        top_activating_examples(sae, [tokens()], progress=False)
    with pytest.raises(ValueError, match=r"\[batch, pos, d_in\] or \[rows, d_in\]"):
        top_activating_examples(sae, [torch.randn(D)], progress=False)
    with pytest.raises(TypeError, match="encode_sparse"):
        top_activating_examples(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)


# ---- 3. SparseActs indexing ---------------------------------------------------------------------------
def sparse_acts(*lead: int, k: int = 3) -> sk.SparseActs:
    g = torch.Generator().manual_seed(0)
    return sk.SparseActs(torch.rand(*lead, k, generator=g), torch.randint(0, 50, (*lead, k), generator=g))


def same_acts(a: sk.SparseActs, values: torch.Tensor, indices: torch.Tensor) -> None:
    assert isinstance(a, sk.SparseActs)
    assert torch.equal(a.values, values) and torch.equal(a.indices, indices)


def test_sparse_acts_indexing_leading_dims():
    acts = sparse_acts(2, 5)
    v, i = acts.values, acts.indices
    same_acts(acts[0, -1], v[0, -1], i[0, -1])
    same_acts(acts[1], v[1], i[1])
    same_acts(acts[:, 1:4], v[:, 1:4], i[:, 1:4])
    same_acts(acts[..., -1], v[:, -1], i[:, -1])  # '...' spans the leading dims only
    same_acts(acts[..., 0, :], v[0], i[0])
    same_acts(acts[torch.tensor([1, 0, 1])], v[[1, 0, 1]], i[[1, 0, 1]])
    mask = torch.tensor([[True, False, True, False, False]] * 2)
    same_acts(acts[mask], v[mask], i[mask])
    same_acts(acts[np.array([0, 0])], v[[0, 0]], i[[0, 0]])
    same_acts(acts[None, 0], v[None, 0], i[None, 0])
    same_acts(acts[0, 2, :], v[0, 2], i[0, 2])  # an explicit full ':' on k is allowed
    assert acts[0, -1].shape == (3,) and acts[0, -1].l0().shape == ()
    for key in ((0, 1, 0), (0, 1, slice(0, 2)), (0, 0, 0, 0), (Ellipsis, 0, 0, 0)):
        with pytest.raises(IndexError, match="SparseActs"):
            acts[key]
    with pytest.raises(IndexError):
        acts[2]  # out of range, as torch


# ---- 8. SparseActs in TransformerLens's ActivationCache utilities -------------------------------------
@torch.no_grad()
def test_sparse_cache_supports_activation_cache_utilities(model):
    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    key = "blocks.1.hook_resid_pre.hook_sae_acts_post"
    toks = tokens(batch=3)
    _, cache = model.run_with_cache_with_saes(toks, saes=[sae], sparse=True)
    acts = cache[key]
    assert isinstance(acts, sk.SparseActs)
    assert acts.ndim == acts.dim() == 3 and acts.size() == acts.shape and acts.size(0) == 3
    assert acts.size(-2) == T and acts.device == torch.device("cpu")
    for moved in (acts.detach(), acts.cpu(), acts.clone(), acts.to("cpu")):
        same_acts(moved, acts.values, acts.indices)
    assert acts.clone().values.data_ptr() != acts.values.data_ptr()

    one = cache.apply_slice_to_batch_dim(1)
    same_acts(one[key], acts.values[1], acts.indices[1])
    assert not one.has_batch_dim
    two = cache.apply_slice_to_batch_dim((0, 2))
    same_acts(two[key], acts.values[:2], acts.indices[:2])
    picked = cache.apply_slice_to_batch_dim([2, 0])
    same_acts(picked[key], acts.values[[2, 0]], acts.indices[[2, 0]])
    # the position slices TransformerLens's helpers apply with dim=-2
    same_acts(Slice(-1).apply(acts, dim=-2), acts.values[:, -1], acts.indices[:, -1])
    same_acts(Slice((1, 4)).apply(acts, dim=-2), acts.values[:, 1:4], acts.indices[:, 1:4])
    cache.to("cpu")
    assert isinstance(cache[key], sk.SparseActs)

    _, single = model.run_with_cache_with_saes(toks[:1], saes=[sae], sparse=True)
    full = single[key]
    single.remove_batch_dim()
    same_acts(single[key], full.values[0], full.indices[0])
    assert single["hook_embed"].shape == (T, D)


# ---- 4. SAE.load_from_pretrained ---------------------------------------------------------------------
def test_load_from_pretrained_is_sae_lens_deprecated_alias(tmp_path):
    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
    sae.save_model(tmp_path)
    with pytest.warns(DeprecationWarning) as ours:
        loaded = sk.SAE.load_from_pretrained(tmp_path, device="cpu", dtype="float64")
    with pytest.warns(DeprecationWarning) as theirs:
        sae_lens.SAE.load_from_pretrained(tmp_path, device="cpu", dtype="float64")
    messages = [str(w.message) for w in ours]
    assert messages == [str(w.message) for w in theirs] == ["Use load_from_disk instead"]
    assert ours[0].filename == __file__  # blamed on the caller, as SAELens's
    assert isinstance(loaded, sk.StandardSAE) and loaded.W_dec.dtype == torch.float64
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.double())


# ---- 5. use_error_term: sae(x) gives x back as precisely as SAELens -----------------------------------
# Not reproduced: forward already computes SAELens's recon + (x - recon) with the same recon for both
# terms, so the round-off equals SAELens's (~eps * |recon| / |x|). This pins that at a realistic size.
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@torch.no_grad()
def test_error_term_returns_x_like_sae_lens(arch):
    cls, cfg_cls, kw = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 64}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }[arch]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref = cls(cfg_cls(d_in=768, d_sae=4096, **kw))  # SAELens's init: kaiming W_dec, W_enc = W_dec.T
        ours = sk.SAE.from_sae_lens(ref, copy=True)
        ref.use_error_term = ours.use_error_term = True
    x = torch.randn(4, 32, 768, generator=torch.Generator().manual_seed(1)) * 20
    rel = lambda y: float((y - x).norm() / x.norm())  # noqa: E731
    want, got = ref(x), ours(x)
    assert rel(want) < 1e-6 and rel(got) < 1e-6
    assert rel(got) <= 1.05 * rel(want) + 1e-9  # same arithmetic: recon + (x - recon)
    assert float((got - x).abs().max()) <= 1.05 * float((want - x).abs().max()) + 1e-9


# ---- 6 and 7. index_df: out-of-range indices raise IndexError, float columns a TypeError ---------------
@pytest.fixture(scope="module")
def patch_setup():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = HookedTransformer(model_cfg()).eval()
    clean, corr = tokens(seed=4), tokens(seed=5)
    with torch.no_grad():
        _, cache = m.run_with_cache(clean)
    return m, corr, cache


def metric(logits):
    return logits[:, -1, 3].mean()


@pytest.mark.parametrize("setter,act,cols,bad", [
    ("layer_pos_patch_setter", "resid_pre", {"layer": [1, 0], "pos": [2, T]}, "pos"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [0], "pos": [-T - 1]}, "pos"),
    ("layer_pos_head_vector_patch_setter", "z", {"layer": [0], "pos": [T + 3], "head": [1]}, "pos"),
    ("layer_pos_head_vector_patch_setter", "z", {"layer": [0], "pos": [1], "head": [4]}, "head"),
    ("layer_head_vector_patch_setter", "v", {"layer": [1], "head": [-5]}, "head"),
    ("layer_head_pos_pattern_patch_setter", "pattern", {"layer": [0], "head": [1], "dest": [T]}, "dest"),
    ("layer_head_dest_src_pos_pattern_patch_setter", "pattern",
     {"layer": [0], "head": [1], "dest": [2], "src": [T]}, "src"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [2], "pos": [0]}, "layer"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [-1], "pos": [0]}, "layer"),
])
def test_index_df_out_of_range_raises_index_error(patch_setup, setter, act, cols, bad):
    m, corr, cache = patch_setup
    df = pd.DataFrame(cols)
    with pytest.raises(IndexError, match=f"index_df column '{bad}'"):
        skp.generic_activation_patch(m, corr, cache, metric, getattr(skp, setter), act, index_df=df,
                                     progress=False)
    if bad != "layer":  # TransformerLens's setters raise IndexError on the same rows
        with pytest.raises(IndexError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tlp.generic_activation_patch(m, corr, cache, metric, getattr(tlp, setter), act, index_df=df)


def test_index_df_negative_indices_still_match_transformer_lens(patch_setup):
    m, corr, cache = patch_setup
    df = pd.DataFrame({"layer": [0, 1], "pos": [-1, -T], "head": [-1, -4]})
    ours = skp.generic_activation_patch(m, corr, cache, metric, skp.layer_pos_head_vector_patch_setter, "z",
                                        index_df=df, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tlp.generic_activation_patch(m, corr, cache, metric, tlp.layer_pos_head_vector_patch_setter,
                                            "z", index_df=df)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols,bad", [
    ({"layer": [0, 1], "pos": [1.0, 2.0]}, "pos"),
    ({"layer": [0, 1], "pos": [0.5, 2]}, "pos"),
    ({"layer": [0.0, 1.0], "pos": [1, 2]}, "layer"),
    ({"layer": [0, 1], "pos": [True, False]}, "pos"),
    ({"layer": [0, 1], "pos": pd.Series([1, "2"], dtype=object)}, "pos"),
])
def test_index_df_float_columns_are_a_type_error_naming_the_column(patch_setup, cols, bad):
    m, corr, cache = patch_setup
    with pytest.raises(TypeError, match=f"index_df column '{bad}' must hold integer indices"):
        skp.generic_activation_patch(m, corr, cache, metric, skp.layer_pos_patch_setter, "resid_pre",
                                     index_df=pd.DataFrame(cols), progress=False)


# ---- 10. sparsekern bench --out is checked before anything runs --------------------------------------
@pytest.mark.parametrize("patching", [False, True])
def test_bench_out_checked_before_running(tmp_path, monkeypatch, patching):
    import sparsekern.bench.patching as bench_patching
    from sparsekern.bench import suite

    def must_not_run(*a, **kw):
        raise AssertionError("benchmark started")

    monkeypatch.setattr(suite, "run_suite", must_not_run)
    monkeypatch.setattr(bench_patching, "main", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra = ["--patching"] if patching else []
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=f"--out '{out}' must be a folder.*writable.*nothing was run"):
            cli.main(["bench", "--quick", "--no-progress", *extra, "--out", str(out)])
    # a missing folder is created up front (and then the run starts)
    new = tmp_path / "new" / "results"
    with pytest.raises(AssertionError, match="benchmark started"):
        cli.main(["bench", "--quick", "--no-progress", *extra, "--out", str(new)])
    assert new.is_dir() and list(new.iterdir()) == []
