"""The demo's SAE-feature section, on the toy model's residual SAE (``blocks.1.hook_resid_pre``).

A corpus of the toy tasks (IOI, palindromes, induction) is grouped by length, so no batch is padded and
every position is a real token. From it: top activating examples (``top_activating_examples``), firing
statistics with co-occurrence (``feature_stats``); from the weights: decoder neighbours and promoted
tokens; on the IOI prompts: the logit-difference change when each active feature is ablated
(``ablate_features``), checked against one hooked forward per ablation for the features shown.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..toy import data as D
from .ioi import IOIBatch
from .report import Section, esc, highlight, table


def corpus(model: Any, n_texts: int, seed: int = 0, max_batch: int = 64) -> tuple[list, list[torch.Tensor]]:
    """``(texts, token batches)``: half IOI, a quarter palindromes, a quarter induction; each batch holds
    texts of one length (BOS + words, no padding). Sequence ``i`` of the stream is ``texts[i]``."""
    rng = random.Random(seed)
    ioi = [p.text + " " + p.io for p in D.ioi_prompts("train", n=n_texts // 2, seed=seed)]
    texts = ioi + [D.palindrome(rng) for _ in range(n_texts // 4)]
    texts += [D.induction(rng) for _ in range(n_texts - len(texts))]
    texts = [" ".join(t.split()[: model.cfg.n_ctx - 1]) for t in texts]
    texts.sort(key=lambda t: len(t.split()))  # stable: equal lengths stay in generation order
    ordered, batches = [], []
    i = 0
    while i < len(texts):
        n = len(texts[i].split())
        j = i
        while j < len(texts) and len(texts[j].split()) == n and j - i < max_batch:
            j += 1
        ordered += texts[i:j]
        batches.append(model.to_tokens(texts[i:j]))
        i = j
    return ordered, batches


@torch.no_grad()
def _feature_acts(model: Any, sae: Any, text: str, feature: int) -> tuple[list[str], list[float]]:
    """(tokens, the feature's activation at every position) for one text."""
    hook = sae.cfg.metadata.hook_name
    toks = model.to_tokens([text])
    _, cache = model.run_with_cache(toks, names_filter=[hook])
    acts = sae.encode(cache[hook][0])[:, feature]
    return model.to_str_tokens(toks[0]), acts.tolist()


def run(model: Any, sae: Any, batch: IOIBatch, n_texts: int, progress: bool, bar: Any) -> dict:
    from ..features import decoder_neighbours, feature_logits, feature_stats, top_activating_examples
    from ..patching.feature_ablation import ablate_features

    texts, batches = corpus(model, n_texts)
    bar.set_postfix_str("top activating examples")
    state = top_activating_examples(sae, batches, k=8, model=model, progress=progress)
    bar.update(1)
    bar.set_postfix_str("feature stats")
    stats = feature_stats(sae, batches, model=model, cooccurrence=True, progress=progress)
    bar.update(1)
    bar.set_postfix_str("neighbours, logits, ablation")
    neigh = decoder_neighbours(sae.W_dec.detach(), k=5, progress=False)
    logits = feature_logits(sae, model, k=5, progress=False)
    abl = ablate_features(model, batch.clean, sae, batch.logit_diff, progress=progress)
    order = abl.values.abs().argsort(descending=True)
    shown = abl.feature_ids[order[:8]]
    ref = ablate_features(
        model, batch.clean, sae, batch.logit_diff, features=shown, backend="reference", progress=False
    )
    check = float((ref.values - abl.values[order[:8]]).abs().max())
    bar.update(1)
    return {
        "texts": texts,
        "state": state,
        "stats": stats,
        "neigh": neigh,
        "logits": logits,
        "abl": abl,
        "order": order,
        "reference_max_diff": check,
        "n_tokens": int(stats.n_tokens),
    }


def section(model: Any, sae: Any, res: dict, numbers: dict, n_show: int = 6) -> Section:
    import plotly.express as px
    import plotly.graph_objects as go

    stats, abl, order = res["stats"], res["abl"], res["order"]
    freq = stats.frequency()
    dead = int((stats.counts == 0).sum())
    numbers["features"] = {
        "n_texts": len(res["texts"]),
        "n_tokens": res["n_tokens"],
        "d_sae": sae.cfg.d_sae,
        "dead": dead,
        "mean_l0": float(stats.counts.sum()) / max(res["n_tokens"], 1),
        "active_on_ioi": int(abl.active.sum()),
        "ablation_reference_max_diff": res["reference_max_diff"],
        "top_ablation": [[int(abl.feature_ids[i]), float(abl.values[i])] for i in order[:n_show]],
    }
    s = Section(
        "SAE features (residual SAE on blocks.1.hook_resid_pre)",
        (
            f"<p>{len(res['texts'])} texts of the toy tasks, {res['n_tokens']} tokens; "
            f"d_sae {sae.cfg.d_sae}, TopK k {sae.cfg.k}. {dead} features never fired. No dense "
            "<code>[tokens, d_sae]</code> tensor is built: codes stay sparse "
            "from the encoder to the statistics.</p>"
        ),
    )
    ls = stats.log_sparsity()[stats.counts > 0]
    fig = px.histogram(
        x=ls.numpy(),
        nbins=40,
        title="Feature density: log10 firing frequency per feature",
        labels=dict(x="log10 frequency"),
    )
    fig.update_layout(yaxis_title="features", bargap=0.05)
    s.figure("features-density", fig, width=800, height=380)
    top = freq.argsort(descending=True)[:30]
    ratio = stats.cooccurrence_prob(top.tolist())[:, top].float()
    s.figure(
        "features-cooccurrence",
        px.imshow(
            ratio.numpy(),
            x=[str(int(f)) for f in top],
            y=[str(int(f)) for f in top],
            zmin=0,
            zmax=1,
            color_continuous_scale="Viridis",
            aspect="auto",
            labels=dict(x="feature j", y="feature i", color="P"),
            title="Co-occurrence of the 30 most frequent features: P(j fires | i fires)",
        ),
        width=760,
        height=640,
    )
    k = min(15, len(order))
    ids, vals = abl.feature_ids[order[:k]], abl.values[order[:k]]
    fig = go.Figure(
        go.Bar(
            x=[f"f{int(f)}" for f in ids],
            y=vals.tolist(),
            marker_color=["#d62728" if v < 0 else "#2ca02c" for v in vals.tolist()],
        )
    )
    fig.update_layout(
        title=f"Feature ablation on the IOI prompts: change of logit(IO) - logit(S) "
        f"(baseline {float(abl.baseline):.2f})",
        yaxis_title="change in logit diff",
        xaxis_title="feature (largest effects of the {} active)".format(int(abl.active.sum())),
    )
    s.figure("features-ablation", fig, width=850, height=400)
    s.html(
        f"<p>The fused ablation equals one hooked forward per ablation for the features below to "
        f"<b>{res['reference_max_diff']:.1e}</b> (max |difference|).</p>"
    )
    s.html(_feature_table(model, sae, res, n_show))
    return s


def _feature_table(model: Any, sae: Any, res: dict, n_show: int) -> str:
    state, stats, neigh, logits, abl, order = (
        res[k] for k in ("state", "stats", "neigh", "logits", "abl", "order")
    )
    rows = []
    for i in order[:n_show].tolist():
        f = int(abl.feature_ids[i])
        promoted, _ = logits.token_strings(model, f)
        nb = ", ".join(f"f{int(j)} ({float(c):.2f})" for j, c in zip(neigh.indices[f], neigh.values[f]))
        examples = []
        for v, (seq, pos) in zip(state.values[f].tolist()[:4], state.locations[f].tolist()[:4]):
            if seq < 0:
                break
            toks, acts = _feature_acts(model, sae, res["texts"][seq], f)
            examples.append(f"{v:.2f}: " + highlight(toks, acts, pos))
        rows.append(
            [
                f"f{f}",
                f"{float(abl.values[i]):+.3f}",
                f"{float(stats.frequency()[f]):.2%}",
                esc(" ".join(promoted)),
                esc(nb),
                "<br>".join(examples) or "(never fired)",
            ]
        )
    return "<h3>The features with the largest effect on IOI</h3>" + table(
        [
            "feature",
            "Δ logit diff",
            "fires on",
            "promoted tokens",
            "decoder neighbours (cos)",
            "top activating examples (max activation; token shaded by activation, red box = the max)",
        ],
        rows,
        raw_cols=(5,),
    )
