"""sparsekern.patching == transformer_lens.patching (exact activation patching), on tiny random models.

TransformerLens itself is the oracle. It runs one forward per patch, so it is evaluated on a few sampled
index rows per function (through its own ``generic_activation_patch`` with ``index_df``, recording the patched
logits so that every metric is checked from one oracle pass); sparsekern runs the full grid.
"""

from __future__ import annotations

import inspect
import warnings

import pandas as pd
import pytest
import torch

tl = pytest.importorskip("transformer_lens")
import transformer_lens.patching as tlp
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern.patching as skp

B, T, V = 2, 5, 50
ARCHS = ("gpt2", "attn_only", "llama_gqa", "parallel")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls on a loaded 2-core box: one thread is ~10x faster than two contending ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(arch: str) -> HookedTransformer:
    base = dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=V,
        n_ctx=16,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    base.update(
        {
            "gpt2": {},
            "attn_only": dict(attn_only=True, d_mlp=None),
            "llama_gqa": dict(
                positional_embedding_type="rotary",
                rotary_dim=8,
                normalization_type="RMS",
                gated_mlp=True,
                act_fn="silu",
                n_key_value_heads=2,
                final_rms=True,
            ),
            "parallel": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4),
        }[arch]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(**base))
    model.eval()
    return model


class Setup:
    def __init__(self, arch):
        self.arch = arch
        self.model = make_model(arch)
        g = torch.Generator().manual_seed(1)
        self.clean = torch.randint(0, V, (B, T), generator=g)
        self.corr = torch.randint(0, V, (B, T), generator=g)
        self.corr[:, 0] = self.clean[:, 0]  # a shared first token: some patches are exact no-ops
        with torch.no_grad():
            _, self.cache = self.model.run_with_cache(self.clean)


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    return Setup(request.param)


def logit_diff(logits):  # last position, correct minus wrong token
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def mean_logprob(logits):  # mean log-prob over all positions of a fixed token
    return logits.log_softmax(-1)[..., 11].mean()


METRICS = (logit_diff, mean_logprob)

# name -> (TL setter, activation name, axes)
FUNCS = {
    name: (f.keywords["patch_setter"], f.keywords["activation_name"], f.keywords["index_axis_names"])
    for name, f in vars(tlp).items()
    if name.startswith("get_act_patch") and hasattr(f, "keywords")
}
MLP_ACTS = {"resid_mid", "mlp_out"}  # absent in attention-only models (and resid_mid in parallel ones)


def oracle(s: Setup, setter, act, index_df, metrics=METRICS):
    """TransformerLens's own patching on ``index_df`` rows -> [len(metrics), rows] metric values."""
    rec = []

    def record(logits):
        rec.append(logits.detach().clone())
        return logits.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlp.generic_activation_patch(s.model, s.corr, s.cache, record, setter, act, index_df=index_df)
    return torch.tensor([[float(m(lg)) for lg in rec] for m in metrics])


def sample_rows(shape, axes, k, seed=0):
    full = tlp.make_df_from_ranges(shape, axes)
    g = torch.Generator().manual_seed(seed)
    picks = sorted({0, len(full) - 1, *torch.randperm(len(full), generator=g)[:k].tolist()})
    return full.iloc[picks].reset_index(drop=True), picks


def close(ours, ref, tol=1e-5):
    # tol, from fp32's unit roundoff u = 2**-24 = 6e-8: the engine and TransformerLens compute the same
    # formulas but round differently (batched GEMMs with another blocking / summation order, fused
    # F.layer_norm and tanh-gelu for TL's elementwise chains, positions < start from the cached run).
    # Each of the K ~ 20 rounded stages between a patched activation and the metric (2 blocks x [LN, QKV,
    # scores + softmax, pattern @ v, W_O, LN, W_in, act, W_out], ln_final, unembed, log_softmax) moves its
    # output by ~sqrt(n) * u relative, n <= 64 the longest reduction (d_mlp; the statistical bound of
    # Higham & Mary 2019), and these random layers have O(1) gains: K * sqrt(n) * u = 20 * 8 * 6e-8 ~ 1e-5
    # of the scale. The scale is max(1, |ref|): logit differences and mean log-probs cancel O(1) logits,
    # so below 1 the error stays absolute. (Observed on an AVX2 EPYC: <= 6e-7.)
    scale = max(1.0, float(ref.abs().max()))
    err = float((ours.cpu() - ref).abs().max())
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} * scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_prebuilt_matches_transformer_lens(setup, name):
    s = setup
    setter, act, axes = FUNCS[name]
    if act in MLP_ACTS and (s.model.cfg.attn_only or (act == "resid_mid" and s.model.cfg.parallel_attn_mlp)):
        with pytest.raises(ValueError, match="clean_cache"):
            getattr(skp, name)(s.model, s.corr, s.cache, logit_diff, progress=False)
        return
    metric_list = (
        METRICS
        if name
        in (
            "get_act_patch_resid_pre",
            "get_act_patch_attn_head_out_by_pos",
            "get_act_patch_attn_head_pattern_by_pos",
            "get_act_patch_attn_head_k_all_pos",
        )
        else (logit_diff,)
    )
    for metric in metric_list:
        ours = getattr(skp, name)(s.model, s.corr, s.cache, metric, progress=False)
        n_heads = s.model.cfg.n_heads
        if act in ("k", "v") and s.model.cfg.n_key_value_heads:
            n_heads = s.model.cfg.n_key_value_heads
        sizes = {"layer": 2, "pos": T, "dest_pos": T, "src_pos": T, "head": n_heads, "head_index": n_heads}
        shape = [sizes[a] for a in axes]
        assert list(ours.shape) == shape and ours.dtype == torch.float32 and ours.device.type == "cpu"
        if metric is logit_diff:
            df, picks = sample_rows(shape, axes, k=3)
            ref = oracle(s, setter, act, df)
            refs = dict(zip(METRICS, ref))
        close(ours.reshape(-1)[picks], refs[metric])


def test_every_helpers_match_transformer_lens():
    s = Setup("llama_gqa")  # GQA: k/v results are right-padded to n_heads
    small = {
        "get_act_patch_block_every": 3 * 2 * T,
        "get_act_patch_attn_head_all_pos_every": 2 * (4 + 4 + 2 + 2 + 4),
    }
    for name in small:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(tlp, name)(s.model, s.corr, s.cache, logit_diff)
        ours = getattr(skp, name)(s.model, s.corr, s.cache, logit_diff, progress=False)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        close(ours, ref)
    # by_pos_every: check layout against our individually-verified functions (TL's own run is 2*T*16 passes)
    ours = skp.get_act_patch_attn_head_by_pos_every(s.model, s.corr, s.cache, logit_diff, progress=False)
    assert ours.shape == (5, 2, T, 4)
    parts = [
        skp.get_act_patch_attn_head_out_by_pos,
        skp.get_act_patch_attn_head_q_by_pos,
        skp.get_act_patch_attn_head_k_by_pos,
        skp.get_act_patch_attn_head_v_by_pos,
    ]
    # ours against ours: both sides run the engine's kernels on the same rows, only the chunks differ
    # (each *_every chunk holds more patches), so no fused-vs-TL difference enters; 1e-6 ~ 8 ulp at scale 1
    for i, f in enumerate(parts):
        part = f(s.model, s.corr, s.cache, logit_diff, progress=False)
        close(ours[i, ..., : part.shape[-1]], part, 1e-6)
        assert (ours[i, ..., part.shape[-1] :] == 0).all()
    pat = skp.get_act_patch_attn_head_pattern_by_pos(s.model, s.corr, s.cache, logit_diff, progress=False)
    close(ours[4], pat.transpose(1, 2), 1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_chunk_size_does_not_change_results(arch):
    s = Setup(arch)
    for f in (
        skp.get_act_patch_resid_pre,
        skp.get_act_patch_attn_head_v_by_pos,
        skp.get_act_patch_attn_head_pattern_all_pos,
        skp.get_act_patch_attn_head_pattern_dest_src_pos,
    ):
        outs = [
            f(s.model, s.corr, s.cache, mean_logprob, progress=False, max_batch=mb) for mb in (1, 3, 10**6)
        ]
        for o in outs[1:]:  # ours against ours: only the GEMMs' row counts differ (see above the *_every)
            assert (o - outs[0]).abs().max() <= 1e-6
    # a tiny memory budget (one patch per chunk) and the one-forward-per-patch reference agree too
    ref = skp.get_act_patch_resid_pre(
        s.model, s.corr, s.cache, mean_logprob, progress=False, backend="reference"
    )
    tiny = skp.get_act_patch_resid_pre(
        s.model, s.corr, s.cache, mean_logprob, progress=False, memory_budget=1
    )
    close(tiny, ref)


def test_index_df_and_return_index_df():
    s = Setup("gpt2")
    df = pd.DataFrame({"layer": [1, 0, 1, 0], "pos": [4, 2, -1, 0], "head": [3, 0, 1, 2]})
    ours = skp.generic_activation_patch(
        s.model,
        s.corr,
        s.cache,
        logit_diff,
        skp.layer_pos_head_vector_patch_setter,
        "z",
        index_df=df,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tlp.generic_activation_patch(
            s.model, s.corr, s.cache, logit_diff, tlp.layer_pos_head_vector_patch_setter, "z", index_df=df
        )
    assert ours.shape == ref.shape == (4,)
    close(ours, ref)
    # the prebuilt partials take index_df too (TransformerLens needs index_axis_names=None there)
    ours2, df2 = skp.get_act_patch_attn_head_out_by_pos(
        s.model, s.corr, s.cache, logit_diff, index_df=df, return_index_df=True, progress=False
    )
    assert df2 is df
    # the same sweep as `ours` through the partial: bitwise equal to it (the former 1e-6 against
    # TransformerLens was tighter than close()'s derivation supports; against TL, 1e-5 as everywhere)
    assert torch.equal(ours2, ours)
    close(ours2, ref)
    out, idx = skp.get_act_patch_attn_head_pattern_by_pos(
        s.model, s.corr, s.cache, logit_diff, return_index_df=True, progress=False
    )
    pd.testing.assert_frame_equal(
        idx, tlp.make_df_from_ranges([2, 4, T], ["layer", "head_index", "dest_pos"])
    )
    assert out.shape == (2, 4, T)
    empty = skp.generic_activation_patch(
        s.model,
        s.corr,
        s.cache,
        logit_diff,
        skp.layer_pos_patch_setter,
        "resid_pre",
        index_df=df.iloc[:0, :2],
        progress=False,
    )
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="index_axis_names"):
        skp.generic_activation_patch(
            s.model,
            s.corr,
            s.cache,
            logit_diff,
            skp.layer_pos_patch_setter,
            "resid_pre",
            index_axis_names=("layer", "head"),
            index_df=df,
            progress=False,
        )


def test_custom_setter_falls_back_exactly():
    s = Setup("llama_gqa")

    def half_patch(corrupted, index, clean):  # not a known setter: blend instead of copy
        layer, pos = index
        corrupted[:, pos] = 0.5 * (corrupted[:, pos] + clean[:, pos])
        return corrupted

    df, _ = sample_rows([2, T], ["layer", "pos"], k=3)
    with pytest.warns(UserWarning, match="half_patch"):
        skp.generic_activation_patch(
            s.model, s.corr, s.cache, logit_diff, half_patch, "resid_mid", index_df=df, progress=False
        )
    ours = skp.generic_activation_patch(
        s.model, s.corr, s.cache, mean_logprob, half_patch, "resid_mid", index_df=df, progress=False
    )
    close(ours, oracle(s, half_patch, "resid_mid", df, (mean_logprob,))[0])


def test_tl_setters_are_recognised_and_own_setters_match():
    s = Setup("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail here
        a = skp.generic_activation_patch(
            s.model,
            s.corr,
            s.cache,
            logit_diff,
            tlp.layer_head_pattern_patch_setter,
            "pattern",
            ["layer", "head_index"],
            progress=False,
        )
    b = skp.get_act_patch_attn_head_pattern_all_pos(s.model, s.corr, s.cache, logit_diff, progress=False)
    assert torch.equal(a, b)
    for name in (
        "layer_pos_patch_setter",
        "layer_pos_head_vector_patch_setter",
        "layer_head_vector_patch_setter",
        "layer_head_pattern_patch_setter",
        "layer_head_pos_pattern_patch_setter",
        "layer_head_dest_src_pos_pattern_patch_setter",
    ):
        x, c = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
        n = len(inspect.signature(getattr(tlp, name)).parameters)
        idx = [1, 2, 3, 4][
            : {
                "layer_pos_patch_setter": 2,
                "layer_head_vector_patch_setter": 2,
                "layer_head_pattern_patch_setter": 2,
            }.get(name, 3 if "dest_src" not in name else 4)
        ]
        assert n == 3
        assert torch.equal(getattr(skp, name)(x.clone(), idx, c), getattr(tlp, name)(x.clone(), idx, c))


def test_api_surface_matches_transformer_lens():
    public = {
        n
        for n, v in vars(tlp).items()
        if not n.startswith("_")
        and callable(v)
        and getattr(v, "__module__", None) in (tlp.__name__, "functools")
        and (
            getattr(v, "func", None) is tlp.generic_activation_patch
            or getattr(v, "__module__", "") == tlp.__name__
        )
    }
    public -= {"overload"}
    missing = {n for n in public if not hasattr(skp, n)}
    assert not missing, missing
    ours = inspect.signature(skp.generic_activation_patch).parameters
    theirs = inspect.signature(tlp.generic_activation_patch).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs)
    assert all(ours[k].kind == inspect.Parameter.KEYWORD_ONLY for k in list(ours)[len(theirs) :])
    for n in public:
        f, g = getattr(tlp, n), getattr(skp, n)
        if hasattr(f, "keywords"):
            assert g.keywords["activation_name"] == f.keywords["activation_name"]
            assert tuple(g.keywords["index_axis_names"]) == tuple(f.keywords["index_axis_names"])
            assert g.keywords["patch_setter"].__name__ == f.keywords["patch_setter"].__name__
        elif n.endswith("_every"):
            assert list(inspect.signature(g).parameters)[:4] == list(inspect.signature(f).parameters)


def test_bad_inputs_raise_clear_errors():
    s = Setup("gpt2")
    with pytest.raises(ValueError, match="corrupted_tokens"):
        skp.get_act_patch_resid_pre(s.model, s.corr[:, :-1], s.cache, logit_diff, progress=False)
    with pytest.raises(ValueError, match="corrupted_tokens"):
        skp.get_act_patch_resid_pre(s.model, s.corr[:1], s.cache, logit_diff, progress=False)
    with pytest.raises(TypeError, match="corrupted_tokens"):
        skp.get_act_patch_resid_pre(s.model, s.corr.float(), s.cache, logit_diff, progress=False)
    with torch.no_grad():
        _, partial_cache = s.model.run_with_cache(
            s.clean, names_filter=lambda n: n.endswith("hook_resid_pre")
        )
    with pytest.raises(ValueError, match="clean_cache.*blocks.0.attn.hook_z"):
        skp.get_act_patch_attn_head_out_by_pos(s.model, s.corr, partial_cache, logit_diff, progress=False)
    with pytest.raises(TypeError, match="patching_metric"):
        skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, lambda lg: lg[:, -1, 0], progress=False)
    with pytest.raises(TypeError, match="metric"):
        skp.get_act_patch_block_every(s.model, s.corr, s.cache, lambda lg: lg.sum(-1), progress=False)
    with pytest.raises(ValueError, match="max_batch"):
        skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, logit_diff, progress=False, max_batch=0)
    # a plain-float metric is accepted (TransformerLens would fail on .item())
    out = skp.get_act_patch_attn_out(
        s.model, s.corr, s.cache, lambda lg: float(logit_diff(lg)), progress=False
    )
    # the same runs; float(fp32) -> python float -> fp32 round-trips exactly, so 1e-7 (< 1 ulp at 1) is exact
    close(out, skp.get_act_patch_attn_out(s.model, s.corr, s.cache, logit_diff, progress=False), 1e-7)


def test_attribution_submodule_is_lazy():
    import importlib.util

    spec = importlib.util.find_spec("sparsekern.patching.attribution")
    if spec is None:
        with pytest.raises(ModuleNotFoundError):
            skp.attribution  # noqa: B018
    assert "attribution" not in skp.__all__


def test_noop_patches_are_skipped_exactly():
    # corrupted and clean share token 0, so every patch at position 0 is a bitwise no-op (causal model)
    s = Setup("llama_gqa")
    from sparsekern.patching import _engine

    seen = []
    orig = _engine.Engine.run

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        seen.append(self.n_noop)
        return out

    _engine.Engine.run = spy
    try:
        out = skp.get_act_patch_attn_head_v_by_pos(s.model, s.corr, s.cache, logit_diff, progress=False)
    finally:
        _engine.Engine.run = orig
    assert seen == [2 * 2]  # 2 layers x 2 kv heads at position 0
    with torch.no_grad():
        base = logit_diff(s.model(s.corr))
    assert torch.equal(out[:, 0], torch.full((2, 2), float(base)))
    assert not torch.equal(out[:, 1], torch.full((2, 2), float(base)))


@pytest.mark.parametrize(
    "act,setter,axes",
    [
        ("pre", "layer_pos_patch_setter", ["layer", "pos"]),  # mlp.hook_pre: runs through the fused gelu
        ("attn_scores", "layer_head_pos_pattern_patch_setter", ["layer", "head_index", "dest_pos"]),
        (
            "rot_k",
            "layer_pos_head_vector_patch_setter",
            ["layer", "pos", "head"],
        ),  # full-length keys: no prefix reuse
    ],
)
def test_other_hook_points_match_transformer_lens(act, setter, axes):
    s = Setup("gpt2" if act != "rot_k" else "parallel")  # parallel: rotary
    sizes = {"layer": 2, "pos": T, "dest_pos": T, "head": 4, "head_index": 4}
    df, picks = sample_rows([sizes[a] for a in axes], axes, k=4, seed=3)
    ours = skp.generic_activation_patch(
        s.model,
        s.corr,
        s.cache,
        mean_logprob,
        getattr(skp, setter),
        act,
        index_axis_names=axes,
        progress=False,
    )
    close(ours.reshape(-1)[picks], oracle(s, getattr(tlp, setter), act, df, (mean_logprob,))[0])


def test_user_hooks_on_layer_norm_still_fire():
    # the engine swaps in fused LayerNorm/gelu only for modules whose hook points carry no hooks
    s = Setup("gpt2")
    calls = []
    s.model.blocks[1].ln2.hook_normalized.add_hook(
        lambda act, hook: calls.append(act.shape[0]), is_permanent=True
    )
    try:
        skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, logit_diff, progress=False)
    finally:
        s.model.reset_hooks(including_permanent=True)
    assert calls and max(calls) > B  # it ran inside the batched (patches x batch) forward
    assert type(s.model.blocks[0].ln1).forward is s.model.blocks[0].ln1.forward.__func__  # restored


def test_single_position_patches_after_the_keys_join_one_block_later():
    """z / q / mlp_out at one position change only that position of their own block's output, so the
    engine runs that block at one position and joins the batch a block later; k / v / patterns /
    all-position patches cannot (their change reaches other positions of the same block)."""
    from sparsekern.patching._engine import Engine, Patch

    s = Setup("gpt2")
    eng = Engine(s.model, s.corr)
    late = {
        ("blocks.0.attn.hook_z", "pos_head", (2, 1)): 1,
        ("blocks.0.attn.hook_q", "pos_head", (2, 1)): 1,
        ("blocks.1.hook_mlp_out", "pos", (3,)): 2,  # last block: joins at the final norm
        ("blocks.0.attn.hook_k", "pos_head", (2, 1)): 0,
        ("blocks.0.attn.hook_v", "pos_head", (2, 1)): 0,
        ("blocks.0.hook_resid_pre", "pos", (2,)): 0,
        ("blocks.0.attn.hook_pattern", "pattern_dest", (1, 2)): 0,
        ("blocks.0.attn.hook_z", "head", (1,)): 0,  # every position
    }
    for (hook, kind, idx), want in late.items():
        layer = int(hook.split(".")[1])
        p = Patch(0, 0, layer, idx[0] if kind != "pattern_dest" else idx[1], hook, kind, idx)
        assert eng.join_layer(p) == want, (hook, kind)
