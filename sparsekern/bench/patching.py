"""``sparsekern bench patching``: sparsekern.patching vs transformer_lens.patching in one process.

Model: a GPT-2-small-shaped random ``HookedTransformer`` (12 layers, d_model 768, 12 heads, d_mlp 3072,
d_vocab 50257, gelu_new, LayerNorm), batch 8 x 15 tokens; ``--quick``: a 2-layer toy model.

TransformerLens runs one full forward per patch whatever the patch is, so its cost per patch is measured
on a sub-sweep (``index_df`` rows: one per layer, positions/heads spread out) timed before *and* after the
sparsekern run (load drift on a shared machine shows up as a spread), and scaled to the full grid:
``TL_full = mean(time per patch) x n_patches``. sparsekern runs the full grid. Its output at the sampled
rows is compared with TransformerLens's. ``flop_ratio`` is the deterministic part of the speed-up: matmul
FLOPs of TransformerLens's passes over those of sparsekern's plan (layer restart + position prefix reuse);
the measured ratio adds batching efficiency and load noise.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, NamedTuple, Optional

import torch

from . import runner
from . import table as tb
from . import timing as T

FIELDS = (
    "case",
    "model",
    "patches",
    "tl_patches_timed",
    "tl_s_per_patch",
    "tl_s_per_patch_spread",
    "tl_full_s_est",
    "sk_s",
    "ratio",
    "target",
    "target_met",
    "flop_ratio",
    "sk_peak_mib",
    "tl_peak_mib",
    "max_abs_diff",
    "metric_scale",
    "status",
    "note",
)


class Spec(NamedTuple):
    """One case: its row's ``case`` label, the sparsekern / TransformerLens function, the target speed-up
    (None: informational) and the metric (``last``: logit difference at the last position; ``all``: reads
    every position's logits)."""

    label: str
    fn_name: str
    target: Optional[float]
    metric: str


SPECS = {
    "resid_pre": Spec("resid_pre", "get_act_patch_resid_pre", 6.0, "last"),
    "attn_head_out_by_pos": Spec("attn_head_out_by_pos", "get_act_patch_attn_head_out_by_pos", 8.0, "last"),
    # a metric that reads every position's logits: no lazy-unembedding saving (informational)
    "resid_pre_all": Spec("resid_pre, all-position metric", "get_act_patch_resid_pre", None, "all"),
}
NAME = "patching"
CASES = tuple(SPECS)  # the ids --cases selects from
COLUMNS = FIELDS


def build(quick: bool, device: torch.device, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if quick:
        dims = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=101, n_ctx=16)
        B, Tn = 2, 6
    else:
        dims = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=32)
        B, Tn = 8, 15
    cfg = HookedTransformerConfig(
        **dims, act_fn="gelu_new", normalization_type="LN", seed=seed, device=str(device)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    clean = torch.randint(0, cfg.d_vocab, (B, Tn), generator=g).to(device)
    corr = torch.randint(0, cfg.d_vocab, (B, Tn), generator=g).to(device)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    right, wrong = 3, 7

    def metric(logits):  # logit difference at the last position
        return (logits[:, -1, right] - logits[:, -1, wrong]).mean()

    def metric_all(logits):  # mean log-prob of a token over every position (reads all logits)
        return logits.log_softmax(-1)[..., right].mean()

    name = "gpt2-small-shaped" if not quick else "toy-2L"
    return (
        model,
        clean,
        corr,
        cache,
        {"last": metric, "all": metric_all},
        f"{name} {dims['n_layers']}L d{dims['d_model']} V{dims['d_vocab']} {B}x{Tn}",
    )


def _flops(cfg, B: int, Tn: int, rows: list[list[int]], last_only: bool, act: str) -> tuple[float, float]:
    """Matmul MACs: (TransformerLens, sparsekern) for the patches ``rows`` ([layer, pos, ...]);
    ``last_only``: the metric reads the last position's logits, the only one sparsekern unembeds. A
    single-position patch after the keys/values (``z``) runs its own block at that position only."""
    block = 4 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_mlp
    unembed = cfg.d_model * cfg.d_vocab
    tl = len(rows) * B * Tn * (cfg.n_layers * block + unembed)
    if act == "z":
        sk = sum(B * (1 + (Tn - r[1]) * (cfg.n_layers - r[0] - 1)) * block for r in rows)
    else:
        sk = sum(B * (Tn - r[1]) * (cfg.n_layers - r[0]) * block for r in rows)
    sk += sum(B * (1 if last_only else Tn - r[1]) * unembed for r in rows)
    return float(tl), float(sk)


def case_job(case: str, quick: bool, device: torch.device, progress: bool, built) -> runner.Job:
    """The job of case ``case`` (a key of :data:`SPECS`) on the model ``built`` by :func:`build`: its row
    names the model and the grid; running it times both libraries and compares their outputs."""
    import transformer_lens.patching as tlp

    import sparsekern.patching as skp

    spec = SPECS[case]
    model, clean, corr, cache, metrics, model_desc = built
    metric = metrics[spec.metric]
    cfg = model.cfg
    B, Tn = corr.shape
    f_tl = getattr(tlp, spec.fn_name)
    setter, act, axes = (f_tl.keywords[k] for k in ("patch_setter", "activation_name", "index_axis_names"))
    sizes = {"layer": cfg.n_layers, "pos": Tn, "head": cfg.n_heads}
    shape = [sizes[a] for a in axes]
    grid = skp.make_df_from_ranges(shape, list(axes))
    # TransformerLens sub-sweep: one row per layer, positions (and heads) spread out
    per_layer = len(grid) // cfg.n_layers
    g = torch.Generator().manual_seed(1234)
    picks = [l * per_layer + int(torch.randint(per_layer, (1,), generator=g)) for l in range(cfg.n_layers)]
    sub = grid.iloc[picks].reset_index(drop=True)

    def tl_call():
        return tlp.generic_activation_patch(model, corr, cache, metric, setter, act, index_df=sub)

    def sk_call():
        return getattr(skp, spec.fn_name)(model, corr, cache, metric, progress=progress)

    row: dict[str, Any] = {
        "case": spec.label,
        "model": model_desc,
        "patches": len(grid),
        "tl_patches_timed": len(sub),
        "target": f">= {spec.target:g}x" if spec.target else "-",
    }

    def measure() -> list[dict[str, Any]]:
        target = spec.target
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tlp.generic_activation_patch(
                model, corr, cache, metric, setter, act, index_df=sub.iloc[:1]
            )  # warm-up
            # sparsekern's warm-up: one patch (CUDA loads kernels lazily on first use; CPU: allocator)
            skp.generic_activation_patch(
                model, corr, cache, metric, setter, act, index_df=sub.iloc[:1], progress=False
            )
            if quick:
                sk_call()
            (tl_out1, tl_ms1), tl_peak = T.measure_peak(lambda: T.time_call(tl_call, device), device)
            (sk_out, sk_ms), sk_peak = T.measure_peak(lambda: T.time_call(sk_call, device), device)
            tl_out2, tl_ms2 = T.time_call(tl_call, device)
        per = [tl_ms1 / 1e3 / len(sub), tl_ms2 / 1e3 / len(sub)]
        tl_full = sum(per) / 2 * len(grid)
        ref = tl_out1.cpu()
        diff = float((sk_out.reshape(-1)[picks].cpu() - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        late = act if device.type == "cpu" else ""  # the engine's one-position block runs are CPU-only
        tl_fl, sk_fl = _flops(cfg, B, Tn, grid.values.tolist(), spec.metric == "last", late)
        ratio = tl_full / (sk_ms / 1e3)
        ok = diff <= 1e-4 * scale
        out = {
            **row,
            "tl_s_per_patch": sum(per) / 2,
            "tl_s_per_patch_spread": abs(per[0] - per[1]) / 2,
            "tl_full_s_est": tl_full,
            "sk_s": sk_ms / 1e3,
            "ratio": ratio,
            "target_met": (ratio >= target) if target and not quick else None,
            "flop_ratio": tl_fl / sk_fl,
            "sk_peak_mib": sk_peak,
            "tl_peak_mib": tl_peak,
            "max_abs_diff": diff,
            "metric_scale": scale,
            "status": "ok" if ok else "mismatch",
            "note": f"TL timed on {len(sub)} of {len(grid)} patches (before and after sparsekern), "
                    "scaled linearly",
        }
        if not ok and target:
            out["target_met"] = False
        return [out]

    return runner.Job(spec.label, measure, row)


# ---- the suite, as the runner sees it -------------------------------------------------------
def jobs(opts: runner.Options) -> Iterator[runner.Job]:
    """The model (built once, before the first case), then one job per selected case."""
    built = build(opts.quick, opts.device, opts.seed)
    for case in SUITE.selected(opts):
        yield case_job(case, opts.quick, opts.device, opts.progress, built)


TABLE = (
    tb.text("case", "case"), tb.num("patches", "patches", "d"), tb.num("TL s/patch", "tl_s_per_patch", ".3f"),
    tb.num("TL full s (est)", "tl_full_s_est", ".1f"), tb.num("sk s", "sk_s", ".2f"),
    tb.ratio("TL/sk", "ratio"),
    tb.text("target", "target"), tb.MET, tb.num("flop ratio", "flop_ratio", ".2f"),
    tb.num("sk peak MiB", "sk_peak_mib", ".0f"), tb.num("TL peak MiB", "tl_peak_mib", ".0f"),
    tb.num("max|diff|", "max_abs_diff", ".2e"),
)

SUITE = runner.Suite(
    name=NAME, cases=CASES, columns=COLUMNS, table=TABLE, jobs=jobs,
    settings=lambda opts: {"seed": opts.seed},
    description="sparsekern.patching against transformer_lens.patching (exact activation patching)",
    footer=lambda opts, meta: [
        "TL full = TransformerLens time per patch (sub-sweep, timed before and after sparsekern) x patches; "
        "flop ratio = matmul FLOPs TL / sparsekern (deterministic part of the speed-up)"],
    quick_note="quick model: targets are informational (they are set for the GPT-2-small shape)",
)
