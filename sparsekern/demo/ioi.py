"""The demo's IOI section: prompts, logit difference, direct logit attribution per head, logit lens.

Clean prompts share one template ("When IO and S went to the P , S gave a O to"), so every prompt has
the same length and positions line up for patching. The corrupted prompt replaces the second subject S2
with IO, which flips the answer to S (the corruption of TransformerLens's exploratory demo). Name orders
alternate ABBA / BABA; all name pairs come from the toy model's held-out test pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..toy import data as D
from .report import Section, table

TEMPLATE = D.TEMPLATES[0]  # "When {A} and {B} went to the {P} , {B} gave a {O} to"


@dataclass
class IOIBatch:
    clean: Tensor  # [batch, pos] tokens
    corrupted: Tensor  # [batch, pos]: S2 replaced by IO (the answer flips to S)
    answers: Tensor  # [batch, 2]: (IO, S) token ids
    texts: list[str]
    labels: list[str]  # one per position: "i word", names as IO/S1/S2 (prompt 0's roles)
    clean_diff: float  # mean logit(IO) - logit(S) at the last position, clean run
    corrupted_diff: float  # the same on the corrupted run (negative when the model is right)

    def logit_diff(self, logits: Tensor) -> Tensor:
        """Mean IO - S logit difference at the last position; ``logits [batch, pos, d_vocab]``."""
        last = logits[:, -1]
        return (last.gather(-1, self.answers[:, :1]) - last.gather(-1, self.answers[:, 1:])).mean()

    def metric(self, logits: Tensor) -> Tensor:
        """Patching metric: 0 at the corrupted run, 1 at the clean run (normalised logit diff)."""
        return (self.logit_diff(logits) - self.corrupted_diff) / (self.clean_diff - self.corrupted_diff)


def build_batch(model: Any, n: int, seed: int = 0) -> IOIBatch:
    """``n`` clean / corrupted IOI prompts on :data:`TEMPLATE` (held-out name pairs)."""
    prompts = D.ioi_prompts("test", n=n, seed=seed)
    clean, corrupted, answers = [], [], []
    for i, p in enumerate(prompts):
        first, second = (p.io, p.s) if p.order == "ABBA" else (p.s, p.io)
        place, obj = D.PLACES[i % len(D.PLACES)], D.OBJECTS[i % len(D.OBJECTS)]
        base = TEMPLATE.replace("{A}", first).replace("{B}", second, 1).replace("{P}", place)
        base = base.replace("{O}", obj)
        clean.append(base.replace("{B}", p.s))
        corrupted.append(base.replace("{B}", p.io))
        answers.append((model.to_single_token(p.io), model.to_single_token(p.s)))
    clean_t, corr_t = model.to_tokens(clean), model.to_tokens(corrupted)
    p0 = prompts[0]
    roles = {p0.io: "IO", p0.s: "S"}
    labels, seen_s = [], 0
    for w in model.to_str_tokens(clean_t[0]):
        if w in roles and roles[w] == "S":
            seen_s += 1
            w = f"S{seen_s}"
        elif w in roles:
            w = "IO"
        labels.append(f"{len(labels)} {w}")  # unique: plotly merges repeated category labels
    batch = IOIBatch(clean_t, corr_t, torch.tensor(answers), clean, labels, 0.0, 0.0)
    with torch.no_grad():
        batch.clean_diff = float(batch.logit_diff(model(clean_t)))
        batch.corrupted_diff = float(batch.logit_diff(model(corr_t)))
    return batch


def _direction(model: Any, batch: IOIBatch) -> tuple[Tensor, Tensor]:
    """``(direction [batch, d_model], bias [batch])``: the logit difference of a centred, scaled final
    residual ``x`` is ``x @ direction + bias``. The toy model's LayerNorm weights are not folded into
    ``W_U``, so ``direction = ln_final.w * (W_U[:, IO] - W_U[:, S])`` and ``bias`` holds ``ln_final.b``'s
    and ``b_U``'s share."""
    diff = (model.W_U[:, batch.answers[:, 0]] - model.W_U[:, batch.answers[:, 1]]).T
    bias = model.b_U[batch.answers[:, 0]] - model.b_U[batch.answers[:, 1]]
    w, b = getattr(model.ln_final, "w", None), getattr(model.ln_final, "b", None)
    if b is not None:
        bias = bias + diff @ b
    return (diff * w if w is not None else diff), bias


@torch.no_grad()
def section(model: Any, batch: IOIBatch, clean_cache: Any, numbers: dict) -> Section:
    import plotly.express as px
    import plotly.graph_objects as go

    cfg = model.cfg
    logits = model(batch.clean)
    io_top = (logits[:, -1].argmax(-1) == batch.answers[:, 0]).float().mean().item()
    direction, bias = _direction(model, batch)
    heads, _ = clean_cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
    dla = (heads * direction).sum(-1).mean(-1).reshape(cfg.n_layers, cfg.n_heads)  # [layer, head]
    comps, comp_labels = clean_cache.decompose_resid(
        layer=None, pos_slice=-1, apply_ln=True, return_labels=True
    )
    comp_dla = (comps * direction).sum(-1).mean(-1)
    lens, lens_labels = clean_cache.accumulated_resid(
        layer=None, incl_mid=True, pos_slice=-1, apply_ln=True, return_labels=True
    )
    # accumulated_resid applies model.ln_final itself (statistics recomputed per layer: a true logit lens)
    lens_logits = lens @ model.W_U + model.b_U  # [layers, batch, d_vocab]
    ans = batch.answers.expand(lens_logits.shape[0], -1, -1)
    lens_diff = (lens_logits.gather(-1, ans[..., :1]) - lens_logits.gather(-1, ans[..., 1:]))[..., 0].mean(-1)
    lens_acc = (lens_logits.argmax(-1) == batch.answers[:, 0]).float().mean(-1)
    bias_mean = float(bias.mean())
    dla_sum = float(comp_dla.sum()) + bias_mean  # DLA is exact: it adds up to the logit difference
    numbers["ioi"] = {
        "dla_sum": dla_sum,
        "lens_final": float(lens_diff[-1]),
        "n_prompts": len(batch.texts),
        "accuracy": io_top,
        "logit_diff": batch.clean_diff,
        "corrupted_logit_diff": batch.corrupted_diff,
        "top_head": _top_head(dla),
        "dla": dla.tolist(),
    }

    s = Section(
        "IOI: logit difference, direct logit attribution, logit lens",
        (
            f"<p>{len(batch.texts)} prompts on the template <code>{TEMPLATE}</code> (name pairs never "
            f"seen in training). The model puts the indirect object on top in <b>{io_top:.0%}</b> of them, "
            f"with a mean logit difference logit(IO) &minus; logit(S) of <b>{batch.clean_diff:.2f}</b> "
            f"({batch.corrupted_diff:.2f} on the corrupted prompts, where S2 is replaced by IO).</p>"
            f"<p>Example: <code>{batch.texts[0]}</code></p>"
            f"<p>Direct logit attribution uses the final LayerNorm's cached scale and its weight (not folded "
            f"into W_U in this model); the components plus the bias terms ({bias_mean:.3f}) add up to "
            f"{dla_sum:.3f}, the logit difference.</p>"
        ),
    )
    s.figure(
        "ioi-dla-heads",
        px.imshow(
            dla.numpy(),
            x=[f"H{h}" for h in range(cfg.n_heads)],
            y=[f"L{layer}" for layer in range(cfg.n_layers)],
            color_continuous_scale="RdBu",
            color_continuous_midpoint=0.0,
            aspect="auto",
            labels=dict(x="head", y="layer", color="logit diff"),
            text_auto=".2f",
            title="Direct logit attribution per head: logit(IO) - logit(S), final position",
        ),
        width=760,
        height=380,
    )
    bars = go.Bar(x=[*comp_labels, "biases"], y=[*comp_dla.tolist(), bias_mean], marker_color="#4c78a8")
    fig = go.Figure(bars)
    fig.update_layout(
        title="Direct logit attribution per component (embeddings, attention and MLP layers)",
        yaxis_title="logit diff",
    )
    s.figure("ioi-dla-components", fig, width=800, height=380)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lens_labels, y=lens_diff.tolist(), mode="lines+markers", name="logit diff"))
    fig.add_trace(
        go.Scatter(
            x=lens_labels, y=lens_acc.tolist(), mode="lines+markers", name="IO top-1 accuracy", yaxis="y2"
        )
    )
    fig.update_layout(
        title="Logit lens: the answer read from the residual stream after each layer",
        yaxis=dict(title="logit(IO) - logit(S)"),
        yaxis2=dict(
            title="accuracy",
            overlaying="y",
            side="right",
            range=[0, 1.05],
            tickformat=".0%",
            tick0=0,
            dtick=0.25,
            showgrid=False,
        ),
        legend=dict(orientation="h", y=-0.2),
    )
    s.figure("ioi-logit-lens", fig, width=800, height=420)
    s.html(
        table(
            ["layer / component", "logit diff (logit lens)", "IO top-1"],
            [[lab, float(d), float(a)] for lab, d, a in zip(lens_labels, lens_diff, lens_acc)],
        )
    )
    return s


def _top_head(dla: Tensor) -> str:
    i = int(dla.abs().argmax())
    return f"L{i // dla.shape[1]}H{i % dla.shape[1]}"
