"""sparsekern.patching.attribution: attribution patching vs transformer_lens.patching (exact).

Tiny random HookedTransformers; TL's exact per-patch loop is the oracle. Checks: exactness where the
metric is linear in the patched activation, first-order correctness in a nonlinear model (small
patches), TL output shapes/dtypes for every function (GPT-2 style and GQA), rank correlation with
exact patching (numbers printed), the AtP* QK fix on saturated attention, and bad input.
"""

import contextlib
import io
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    import transformer_lens.patching as tlp

import sparsekern.patching.attribution as ap

HEAD_FNS = [f"attn_head_{a}_{b}" for b in ("by_pos", "all_pos") for a in ("out", "q", "k", "v")]
PATTERN_FNS = ["attn_head_pattern_all_pos", "attn_head_pattern_by_pos", "attn_head_pattern_dest_src_pos"]
LAYER_FNS = ["resid_pre", "resid_mid", "attn_out", "mlp_out"]
EVERY_FNS = ["block_every", "attn_head_all_pos_every", "attn_head_by_pos_every"]
ALL_FNS = LAYER_FNS + HEAD_FNS + PATTERN_FNS + EVERY_FNS


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: a second OpenMP thread only spins on a shared, loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0, qk_scale=1.0, **kw):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16,
               act_fn="gelu_new", normalization_type="LN", seed=seed)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg))
    model.eval()
    if qk_scale != 1.0:  # large attention scores -> saturated softmax
        with torch.no_grad():
            for block in model.blocks:
                block.attn.W_Q.mul_(qk_scale)
                block.attn.W_K.mul_(qk_scale)
    return model


def llama_gqa(**kw):
    return make_model(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                      act_fn="silu", gated_mlp=True, n_key_value_heads=2, **kw)


def tokens(batch, pos, seed, d_vocab=50):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, torch.randint(0, d_vocab, (batch, pos), generator=g)


def exact(name, model, corrupted, cache, metric):
    """TL's exact patching (quiet tqdm, no autograd graph)."""
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        return getattr(tlp, "get_act_patch_" + name)(model, corrupted, cache, metric)


def attrib(name, *args, **kw):
    return getattr(ap, "get_act_patch_" + name)(*args, **kw)


def linear_metric(lg):
    return (lg[:, -1, 3] - lg[:, -1, 7]).mean() + 0.1 * lg[:, 2, 5].sum()


def spearman(a, b):
    """Spearman rank correlation with average ranks for ties (no scipy)."""
    def rank(x):
        _, inv, counts = torch.unique(x.flatten().double(), return_inverse=True, return_counts=True)
        cum = counts.cumsum(0).double()
        return (cum - (counts.double() - 1) / 2)[inv]
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def assert_close(actual, expected, tol=1e-5):
    # tol, where attribution is exact in real arithmetic (linear cases): TL's patched forward minus the
    # corrupted one against sum((clean - corr) * grad). fp32 u = 6e-8; ~K = 10 rounded stages (one or two
    # blocks without normalisation, the backward's matching GEMMs) of reductions up to n = batch * pos *
    # d_model ~ 400 (the attribution sum), sqrt(n) * u each: K * sqrt(n) * u = 10 * 20 * 6e-8 ~ 1e-5 of
    # max(1, |expected|) (the metric differences cancel O(1) logits). (Observed on an AVX2 EPYC: <= 2e-7.)
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# (1) exact where the metric is linear in the patched activation ------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "rotary_gqa", "saturated", "alibi_softcap_qknorm"])
def test_linear_case_is_exact(arch):
    # One attention-only layer, no normalisation, linear metric on logits: logits are linear in
    # attn_out, z, v and the pattern, so attribution patching must equal exact patching; q/k enter
    # through the softmax, so plain attribution is not exact but AtP* (exact softmax, linear from the
    # pattern on) is.
    kw = dict(n_layers=1, attn_only=True, normalization_type=None)
    if arch == "rotary_gqa":
        kw.update(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)
    if arch == "alibi_softcap_qknorm":  # every score transform the QK fix must reproduce
        kw.update(positional_embedding_type="alibi", attn_scores_soft_cap=3.0, use_qk_norm=True)
    model = make_model(seed=3, qk_scale=6.0 if arch == "saturated" else 1.0, **kw)
    clean, corrupted = tokens(2, 6, seed=1)
    _, cache = model.run_with_cache(clean)
    for name in ["attn_out", "attn_head_out_by_pos", "attn_head_out_all_pos", "attn_head_v_by_pos",
                 "attn_head_v_all_pos"] + PATTERN_FNS:
        assert_close(attrib(name, model, corrupted, cache, linear_metric),
                     exact(name, model, corrupted, cache, linear_metric))
    worst_plain = 0.0
    for name in ["attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_q_all_pos", "attn_head_k_all_pos"]:
        ex = exact(name, model, corrupted, cache, linear_metric)
        assert_close(attrib(name, model, corrupted, cache, linear_metric, qk_fix=True), ex)
        plain = attrib(name, model, corrupted, cache, linear_metric)
        worst_plain = max(worst_plain, float((plain - ex).abs().max()))
    if arch == "saturated":  # the test could fail: without the fix the estimate is visibly off
        assert worst_plain > 1e-3


def test_linear_case_broadcast_1d_and_left_padding():
    # TL also accepts a clean cache of batch 1 (broadcast by its setters) and 1-D tokens; with a
    # left-padding tokenizer the forward masks pads and shifts rotary positions, which the QK fix
    # must reproduce (fully masked pad rows included).
    import types

    model = make_model(seed=6, qk_scale=5.0, n_layers=1, attn_only=True, normalization_type=None,
                       positional_embedding_type="rotary", rotary_dim=8)
    clean, corrupted = tokens(3, 6, seed=5)
    _, cache1 = model.run_with_cache(clean[:1])
    for name in ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_all_pos"]:
        assert_close(attrib(name, model, corrupted, cache1, linear_metric, qk_fix=True),
                     exact(name, model, corrupted, cache1, linear_metric))
    _, cache_1d = model.run_with_cache(clean[0])
    assert_close(attrib("attn_out", model, corrupted[0], cache_1d, linear_metric),
                 exact("attn_out", model, corrupted[0], cache_1d, linear_metric))
    model.tokenizer = types.SimpleNamespace(padding_side="left", pad_token_id=0, bos_token_id=1)
    clean, corrupted = clean.clamp_min(2), corrupted.clamp_min(2)
    clean[0, :2] = corrupted[0, :2] = 0
    _, cache = model.run_with_cache(clean)
    for name in ["attn_head_q_by_pos", "attn_head_k_by_pos", "attn_head_k_all_pos"]:
        assert_close(attrib(name, model, corrupted, cache, linear_metric, qk_fix=True),
                     exact(name, model, corrupted, cache, linear_metric))


def test_linear_case_last_mlp_and_frozen_params():
    # 2 layers, no normalisation: logits are linear in the last layer's mlp_out.
    model = make_model(seed=4, normalization_type=None)
    clean, corrupted = tokens(3, 5, seed=2)
    _, cache = model.run_with_cache(clean)
    ex = exact("mlp_out", model, corrupted, cache, linear_metric)
    with torch.no_grad():
        base = float(linear_metric(model(corrupted)))
    at = attrib("mlp_out", model, corrupted, cache, linear_metric)
    assert_close(at[-1], ex[-1])
    delta = attrib("mlp_out", model, corrupted, cache, linear_metric, return_delta=True)
    assert_close(delta[-1], ex[-1] - base)
    torch.testing.assert_close(at, delta + base, rtol=0, atol=1e-5)
    model.requires_grad_(False)  # frozen weights: the hooks start the graph themselves
    frozen = attrib("mlp_out", model, corrupted, cache, linear_metric)
    torch.testing.assert_close(frozen, at, rtol=0, atol=1e-6)


def test_first_order_exact_for_small_patches():
    # Nonlinear model and metric: patching act + eps * (clean - act) changes the metric by
    # eps * attribution + O(eps^2). Checks every gradient path in float64.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = llama_gqa(seed=5, dtype=torch.float64)
        clean, corrupted = tokens(2, 5, seed=3)
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupted)
        eps = 1e-5
        mixed = {k: kc[k] + eps * (cc[k] - kc[k]) for k in cc.keys()}

        def metric(lg):
            return lg[:, -1].log_softmax(-1)[:, 3].mean()

        with torch.no_grad():
            base = float(metric(model(corrupted)))
        for name in LAYER_FNS + ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                                 "attn_head_v_all_pos", "attn_head_pattern_by_pos"]:
            ex = exact(name, model, corrupted, mixed, metric) - base
            for qk_fix in (False, True):
                at = attrib(name, model, corrupted, mixed, metric, return_delta=True, qk_fix=qk_fix)
                assert at.dtype == torch.float64
                rel = float((at - ex).abs().max() / ex.abs().max())
                # not rounding (float64: u = 1e-16 on a difference of O(1) metrics, ~1e-11 relative
                # to |ex| ~ eps) but the Taylor remainder: (eps^2 / 2) d'H d over eps * g.d, so
                # rel = eps * kappa, kappa = |d'H d| / (2 |g.d|) the metric's curvature ratio along the
                # patch d; 100 bounds kappa for O(1) random weights
                assert rel < 100 * eps, (name, qk_fix, rel)
    finally:
        torch.set_default_dtype(old)


# (2) output shapes, dtype, device: every function, GPT-2 style and GQA --------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_shapes_match_transformer_lens(arch):
    model = make_model(seed=0) if arch == "gpt2" else llama_gqa(seed=0)
    clean, corrupted = tokens(2, 3, seed=0)
    _, cache = model.run_with_cache(clean)

    def metric(lg):
        return lg[:, -1].log_softmax(-1)[:, 0].mean()

    shapes = {}
    for name in ALL_FNS:
        if name in EVERY_FNS:  # TL stacks its parts (k/v padded to n_heads, pattern [L, T, H])
            parts = {"block_every": ("resid_pre", 3), "attn_head_all_pos_every": ("attn_head_out_all_pos", 5),
                     "attn_head_by_pos_every": ("attn_head_out_by_pos", 5)}[name]
            ex = torch.zeros((parts[1], *shapes[parts[0]]))
        else:
            ex = exact(name, model, corrupted, cache, metric)
            shapes[name] = ex.shape
        for qk_fix in (False, True):
            at = attrib(name, model, corrupted, cache, metric, qk_fix=qk_fix)
            assert (at.shape, at.dtype, at.device) == (ex.shape, ex.dtype, ex.device), name
            assert torch.isfinite(at).all(), name
    if arch == "llama_gqa":
        assert attrib("attn_head_k_by_pos", model, corrupted, cache, metric).shape == (2, 3, 2)


def test_vectorised_paths_match_per_row_paths():
    # TL setters use vectorised reductions / closed-form QK fix; a wrapped (unknown) setter goes
    # through the per-row path (setter(act) - act, or an exact pattern recomputation per patch).
    model = llama_gqa(seed=1, qk_scale=4.0)
    clean, corrupted = tokens(2, 5, seed=4)
    _, cache = model.run_with_cache(clean)

    def metric(lg):
        return lg[:, -1].log_softmax(-1)[:, 2].mean()

    for name in HEAD_FNS + PATTERN_FNS + ["resid_pre", "mlp_out"]:
        fn = getattr(ap, "get_act_patch_" + name)
        setter = fn.keywords["patch_setter"]
        for qk_fix in (False, True):
            fast = fn(model, corrupted, cache, metric, qk_fix=qk_fix)
            slow = ap.generic_attribution_patch(
                model, corrupted, cache, metric, lambda a, i, c, s=setter: s(a, i, c),
                fn.keywords["activation_name"], fn.keywords["index_axis_names"], qk_fix=qk_fix)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5, msg=f"{name} qk_fix={qk_fix}")
    # *_every share one run and equal their parts; index_df gives TL's flat layout
    every = ap.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, metric, qk_fix=True)
    k = attrib("attn_head_k_by_pos", model, corrupted, cache, metric, qk_fix=True)
    torch.testing.assert_close(every[2, ..., :2], k)
    assert (every[2, ..., 2:] == 0).all()
    pattern = attrib("attn_head_pattern_by_pos", model, corrupted, cache, metric)
    torch.testing.assert_close(every[4], pattern.transpose(1, 2))
    # sparsekern.patching's own setters are recognised as the TL ones (vectorised path)
    import sparsekern.patching as skp

    assert ap._setter_dims(skp.layer_pos_head_vector_patch_setter) == (1, 2)
    grid, df = ap.get_act_patch_attn_head_q_by_pos(model, corrupted, cache, metric, return_index_df=True)
    flat = ap.generic_attribution_patch(model, corrupted, cache, metric,
                                        tlp.layer_pos_head_vector_patch_setter,
                                        "q", index_df=df.iloc[::7])
    torch.testing.assert_close(flat, grid.flatten()[::7])


# (3) rank correlation with exact patching --------------------------------------------------------

def test_rank_correlation_with_exact_patching(capsys):
    # Observed on seeds 0-9 (GPT-2 style, 2 layers, batch 4 x 8, log-prob metric): resid_pre
    # 0.36-0.85 (mean 0.63), attn_head_out_by_pos 0.54-0.92 (mean 0.76); seeds 0-2 run here are on
    # the low side for heads (0.68, 0.64, 0.53). Bounds sit below the lowest value seen.
    # Attribution is first-order: whole-residual patches are large changes through LayerNorm, hence
    # the weaker resid_pre numbers.
    rows, stats = [], {"resid_pre": [], "attn_head_out_by_pos": []}
    for seed in range(3):
        model = make_model(seed=seed)
        clean, corrupted = tokens(4, 8, seed=100 + seed)
        logits, cache = model.run_with_cache(clean)
        answer = logits[:, -1].argmax(-1, keepdim=True)

        def metric(lg):
            return lg[:, -1].log_softmax(-1).gather(-1, answer).mean()

        for name in stats:
            rho = spearman(attrib(name, model, corrupted, cache, metric),
                           exact(name, model, corrupted, cache, metric))
            stats[name].append(rho)
        rows.append(f"seed {seed}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in stats.items()))
    with capsys.disabled():
        print("\n[attribution vs exact patching, Spearman] " + " | ".join(rows))
    assert min(stats["resid_pre"]) > 0.3 and sum(stats["resid_pre"]) / 3 > 0.5
    assert min(stats["attn_head_out_by_pos"]) > 0.45 and sum(stats["attn_head_out_by_pos"]) / 3 > 0.55


# (4) AtP* QK fix on saturated attention ----------------------------------------------------------

def test_qk_fix_on_saturated_attention(capsys):
    # W_Q, W_K x20: softmax saturated, so plain attribution through q/k is near-useless. Observed on
    # seeds 0-7: k_by_pos Spearman improves on every seed (mean 0.03 -> 0.52); q_by_pos improves on
    # average (0.05 -> 0.39) but not on every seed (seed 5: 0.30 -> 0.25), so q is asserted on the mean.
    # Pattern patches are already linear from the pattern on: qk_fix must not change them.
    rows, gain_q = [], []
    for seed in range(3):
        model = make_model(seed=seed, qk_scale=20.0)
        clean, corrupted = tokens(4, 8, seed=100 + seed)
        logits, cache = model.run_with_cache(clean)
        answer = logits[:, -1].argmax(-1, keepdim=True)

        def metric(lg):
            return lg[:, -1].log_softmax(-1).gather(-1, answer).mean()

        rho = {}
        for name in ("attn_head_q_by_pos", "attn_head_k_by_pos"):
            ex = exact(name, model, corrupted, cache, metric)
            rho[name] = (spearman(attrib(name, model, corrupted, cache, metric), ex),
                         spearman(attrib(name, model, corrupted, cache, metric, qk_fix=True), ex))
        assert rho["attn_head_k_by_pos"][1] >= rho["attn_head_k_by_pos"][0], rho
        gain_q.append(rho["attn_head_q_by_pos"][1] - rho["attn_head_q_by_pos"][0])
        rows.append(f"seed {seed}: " + ", ".join(f"{n[10:]} {a:.3f}->{b:.3f}" for n, (a, b) in rho.items()))
        for name in PATTERN_FNS:
            assert torch.equal(attrib(name, model, corrupted, cache, metric),
                               attrib(name, model, corrupted, cache, metric, qk_fix=True))
    with capsys.disabled():
        print("\n[QK fix, Spearman plain->AtP*] " + " | ".join(rows))
    assert sum(gain_q) / len(gain_q) > 0.15


# (5) bad input -------------------------------------------------------------------------------------

def test_bad_input():
    model = make_model(seed=0, n_layers=1)
    clean, corrupted = tokens(2, 5, seed=0)
    _, cache = model.run_with_cache(clean)

    def metric(lg):
        return lg[:, -1, 0].mean()

    with pytest.raises(ValueError, match=r"corrupted_tokens has shape \[2, 4\].*clean_cache"):
        ap.get_act_patch_resid_pre(model, corrupted[:, :4], cache, metric)
    with pytest.raises(ValueError, match=r"corrupted_tokens has shape \[3, 5\]"):
        bigger = torch.cat([corrupted, corrupted[:1]])
        ap.get_act_patch_attn_head_pattern_all_pos(model, bigger, cache, metric)
    partial_cache = {k: v for k, v in cache.items() if "hook_z" not in k}
    with pytest.raises(KeyError, match=r"clean_cache is missing.*blocks.0.attn.hook_z"):
        ap.get_act_patch_attn_head_out_by_pos(model, corrupted, partial_cache, metric)
    attn_only = make_model(seed=0, n_layers=1, attn_only=True)
    _, ao_cache = attn_only.run_with_cache(clean)
    with pytest.raises(KeyError, match="hook_mlp_out"):
        ap.get_act_patch_block_every(attn_only, corrupted, ao_cache, metric)
    with pytest.raises(ValueError, match="scalar"):
        ap.get_act_patch_resid_pre(model, corrupted, cache, lambda lg: lg[:, -1, 0])
    with pytest.raises(ValueError, match="differentiabl"):
        ap.get_act_patch_resid_pre(model, corrupted, cache,
                                   lambda lg: torch.tensor(lg[:, -1, 0].mean().item()))
    with pytest.raises(TypeError, match="corrupted_tokens"):
        ap.get_act_patch_resid_pre(model, corrupted.float(), cache, metric)
