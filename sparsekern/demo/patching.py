"""The demo's patching sections: exact activation patching timed beside TransformerLens, and attribution
patching beside exact patching.

Each ``sparsekern.patching`` function runs on the same model, tokens, cache and metric as its
``transformer_lens.patching`` twin; the report states both times, the speed-up and the max difference.
TransformerLens's own tqdm bars are silenced (the demo shows one bar over the functions).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable

import pandas as pd
import torch

from .ioi import IOIBatch
from .report import Section, table

# (function name, output axes, short title)
FUNCTIONS = (
    ("get_act_patch_resid_pre", ("layer", "pos"), "residual stream (resid_pre) by layer and position"),
    ("get_act_patch_attn_head_out_by_pos", ("layer", "pos", "head"), "attention head outputs by position"),
    ("get_act_patch_block_every", ("component", "layer", "pos"), "resid_pre / attn_out / mlp_out"),
    (
        "get_act_patch_attn_head_all_pos_every",
        ("component", "layer", "head"),
        "head output / q / k / v / pattern, all positions",
    ),
)
BLOCK = ["resid_pre", "attn_out", "mlp_out"]
HEAD_PARTS = ["output", "query", "key", "value", "pattern"]


def _timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """(result, best wall time in seconds of ``repeats`` calls), synchronising the device around each."""
    from ..bench.timing import time_call

    runs = [time_call(fn, device) for _ in range(repeats)]
    return runs[-1][0], min(ms for _, ms in runs) / 1e3


def run_exact(model: Any, batch: IOIBatch, cache: Any, repeats: int, bar: Any) -> dict:
    """Every function in :data:`FUNCTIONS`, sparsekern and TransformerLens: ``{name: {...}}``."""
    import transformer_lens.patching as tlp

    from .. import patching as skp

    # warm both libraries up (lazy imports, first-call allocations) on one patch, outside the timings
    one = pd.DataFrame({"layer": [0], "pos": [0]})
    for lib in (skp, tlp):
        with contextlib.redirect_stderr(io.StringIO()):
            lib.generic_activation_patch(model, batch.corrupted, cache, batch.metric,
                                         lib.layer_pos_patch_setter, "resid_pre", index_df=one)
    dev, args = torch.device(model.cfg.device), (model, batch.corrupted, cache, batch.metric)
    out = {}
    for name, _, _ in FUNCTIONS:
        bar.set_postfix_str(name.replace("get_act_patch_", ""))
        sk, t_sk = _timed(lambda: getattr(skp, name)(*args, progress=False), repeats, dev)
        with contextlib.redirect_stderr(io.StringIO()):  # TL prints a tqdm bar per call
            tl, t_tl = _timed(lambda: getattr(tlp, name)(*args), repeats, dev)
        out[name] = {
            "sparsekern": sk.detach().cpu(),
            "transformer_lens": tl.detach().cpu(),
            "sparsekern_s": t_sk,
            "transformer_lens_s": t_tl,
            "speedup": t_tl / t_sk,
            "max_abs_diff": float((sk.cpu() - tl.cpu()).abs().max()),
            "patches": sk.numel(),
        }
        bar.update(1)
    return out


def run_attribution(model: Any, batch: IOIBatch, cache: Any, exact: dict, bar: Any) -> dict:
    from ..patching import attribution as atp

    out = {}
    for name, _, _ in FUNCTIONS:
        bar.set_postfix_str("attribution " + name.replace("get_act_patch_", ""))
        est, secs = _timed(lambda: getattr(atp, name)(model, batch.corrupted, cache, batch.metric), 1,
                           torch.device(model.cfg.device))
        est = est.detach().cpu()
        ex = exact[name]["sparsekern"]
        corr = float(torch.corrcoef(torch.stack([est.flatten(), ex.flatten()]).double())[0, 1])
        out[name] = {
            "estimate": est,
            "seconds": secs,
            "correlation": corr,
            "max_abs_error": float((est - ex).abs().max()),
        }
        bar.update(1)
    return out


def _heat(px: Any, data: torch.Tensor, title: str, x: list, y: list, **kw: Any) -> Any:
    lim = max(float(data.abs().max()), 1e-6)
    return px.imshow(
        data.numpy(),
        x=x,
        y=y,
        color_continuous_scale="RdBu",
        zmin=-lim,
        zmax=lim,
        aspect="auto",
        title=title,
        **kw,
    )


def exact_section(model: Any, batch: IOIBatch, res: dict, numbers: dict) -> Section:
    import plotly.express as px

    cfg = model.cfg
    pos, layers = batch.labels, [f"L{i}" for i in range(cfg.n_layers)]
    numbers["patching"] = {
        k: {f: v[f] for f in ("sparsekern_s", "transformer_lens_s", "speedup", "max_abs_diff", "patches")}
        for k, v in res.items()
    }
    s = Section(
        "Exact activation patching (sparsekern.patching vs transformer_lens.patching)",
        (
            "<p>Metric: the logit difference normalised to 0 on the corrupted run and 1 on the clean run. "
            "Each heatmap is <code>sparsekern.patching</code>'s output; the same function of "
            "<code>transformer_lens.patching</code> ran on the same inputs in this process.</p>"
        ),
    )
    rows = [
        [
            name,
            v["patches"],
            v["transformer_lens_s"],
            v["sparsekern_s"],
            f"{v['speedup']:.1f}x",
            f"{v['max_abs_diff']:.2e}",
        ]
        for name, v in res.items()
    ]
    s.html(
        table(["function", "patches", "TransformerLens s", "sparsekern s", "speed-up", "max |diff|"], rows)
    )
    r = res["get_act_patch_resid_pre"]["sparsekern"]
    s.figure(
        "patch-resid-pre",
        _heat(
            px,
            r,
            "Patching resid_pre: where the name information sits",
            pos,
            layers,
            labels=dict(x="position", y="layer", color="metric"),
        ),
        width=900,
        height=340,
    )
    h = res["get_act_patch_attn_head_out_by_pos"]["sparsekern"]  # [layer, pos, head]
    heads = [f"L{li}H{hi}" for li in range(cfg.n_layers) for hi in range(cfg.n_heads)]
    s.figure(
        "patch-head-out-by-pos",
        _heat(
            px,
            h.permute(0, 2, 1).reshape(-1, h.shape[1]),
            "Patching each head's output at each position",
            pos,
            heads,
            labels=dict(x="position", y="head", color="metric"),
        ),
        width=900,
        height=420,
    )
    b = res["get_act_patch_block_every"]["sparsekern"]  # [3, layer, pos]
    fig = _heat(
        px,
        b,
        "Patching resid_pre, attn_out and mlp_out (get_act_patch_block_every)",
        pos,
        layers,
        facet_col=0,
        labels=dict(x="position", y="layer", color="metric"),
    )
    for i, a in enumerate(fig.layout.annotations):
        a.text = BLOCK[i]
    s.figure("patch-block-every", fig, width=1050, height=360)
    a = res["get_act_patch_attn_head_all_pos_every"]["sparsekern"]  # [5, layer, head]
    fig = _heat(
        px,
        a,
        "Patching every head's output / q / k / v / pattern at all positions",
        list(range(cfg.n_heads)),
        layers,
        facet_col=0,
        labels=dict(x="head", y="layer", color="metric"),
    )
    for i, ann in enumerate(fig.layout.annotations):
        ann.text = HEAD_PARTS[i]
    s.figure("patch-head-every", fig, width=1050, height=320)
    return s


def attribution_section(res: dict, exact: dict, numbers: dict) -> Section:
    import plotly.graph_objects as go

    numbers["attribution"] = {
        k: {f: v[f] for f in ("seconds", "correlation", "max_abs_error")} for k, v in res.items()
    }
    s = Section(
        "Attribution patching beside exact patching",
        (
            "<p><code>sparsekern.patching.attribution</code> estimates every patch from one corrupted "
            "forward and one backward (a first-order Taylor step). Points on the diagonal are patches it "
            "gets exactly.</p>"
        ),
    )
    s.html(
        table(
            ["function", "attribution s", "correlation with exact", "max |error|"],
            [[k, v["seconds"], f"{v['correlation']:.3f}", v["max_abs_error"]] for k, v in res.items()],
        )
    )
    fig = go.Figure()
    lo = hi = 0.0
    for name, v in res.items():
        ex = exact[name]["sparsekern"].flatten()
        est = v["estimate"].flatten()
        lo, hi = min(lo, float(ex.min()), float(est.min())), max(hi, float(ex.max()), float(est.max()))
        fig.add_trace(
            go.Scatter(
                x=ex.tolist(),
                y=est.tolist(),
                mode="markers",
                marker=dict(size=5, opacity=0.6),
                name=f"{name.replace('get_act_patch_', '')} (r = {v['correlation']:.2f})",
            )
        )
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="black"), name="y = x")
    )
    fig.update_layout(
        title="Attribution estimate vs exact patching result, every patch",
        xaxis_title="exact (normalised metric)",
        yaxis_title="attribution estimate",
        legend=dict(orientation="h", y=-0.25),
    )
    s.figure("attribution-vs-exact", fig, width=850, height=560)
    return s
