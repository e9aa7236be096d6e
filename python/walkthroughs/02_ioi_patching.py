"""Walk-through for seed notebook 002 (IOI activation patching) on the shipped toy model, offline.

Indirect object identification: "When Mary and John went to the store , John gave a drink to" -> Mary.
This script reproduces the notebook's analysis from the public API:

1. accuracy and logit difference (IO - S) on held-out name pairs (and held-out templates);
2. direct logit attribution (DLA) of every head and of each layer's attention / MLP;
3. attention of each head from the last position to IO, S1 and S2 (who moves the name);
4. exact activation patching heatmaps with ``sparsekern.patching`` (resid_pre, attn_head_out_by_pos,
   block_every, attn_head_all_pos_every) from clean prompts into corrupted ones whose S2 is the IO name
   (the answer flips; only one token differs);
5. attribution patching (``sparsekern.patching.attribution``) of the same four sweeps beside the exact
   ones, with their correlation.

Run:  PYTHONPATH=. python python/walkthroughs/02_ioi_patching.py [--quick] [--out DIR]
``--quick`` uses small samples (CI); ``--out DIR`` writes plotly HTML figures there when plotly is
installed (optional: without it the script only prints).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import transformer_lens  # noqa: F401  (imported up front: the timing below excludes it)

import sparsekern.patching as patching
import sparsekern.toy
from sparsekern.patching import attribution
from sparsekern.toy import data, evaluate

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="small samples (CI)")
ap.add_argument("--out", type=Path, default=None, help="write plotly HTML figures here (needs plotly)")
args = ap.parse_args()
N = 16 if args.quick else 64
t0, c0 = time.perf_counter(), time.process_time()
torch.set_grad_enabled(False)
model, _ = sparsekern.toy.load()
tok = model.tokenizer
L, H = model.cfg.n_layers, model.cfg.n_heads
figs = {}


def table(m, rows, cols, fmt="{:+6.2f}"):
    print(" " * 11 + " ".join(f"{c:>6}" for c in cols))
    for r, row in zip(rows, m.tolist()):
        print(f"{r:>10} " + " ".join(fmt.format(v) for v in row))


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ---- 1. behaviour on the held-out name pairs (the model never saw these pairs in training)
print("== 1. IOI behaviour ==")
m = evaluate.ioi_metrics(model, tok, data.ioi_prompts("test", seed=1))
m2 = evaluate.ioi_metrics(model, tok, data.ioi_prompts("test", seed=1, held_out_template=True))
print(f"IOI accuracy: {m['accuracy']:.4f}  logit diff: {m['logit_diff']:.3f}  (n={m['n']}, test pairs)")
print(f"IOI held-out templates: accuracy {m2['accuracy']:.4f}  logit diff {m2['logit_diff']:.3f}")

# one template so that positions line up across the batch; ABBA and BABA orders alternate
template = data.TEMPLATES[0]
prompts = data.ioi_prompts("test", n=N, seed=2)


def render(first, second, s2):
    return (template.replace("{A}", first).replace("{B}", second, 1).replace("{B}", s2)
            .replace("{P}", "store").replace("{O}", "drink"))


ab = [(q.io, q.s) if q.order == "ABBA" else (q.s, q.io) for q in prompts]
clean = model.to_tokens([render(a, b, q.s) for (a, b), q in zip(ab, prompts)])
corrupt = model.to_tokens([render(a, b, q.io) for (a, b), q in zip(ab, prompts)])  # S2 := IO
io = torch.tensor(tok.convert_tokens_to_ids([q.io for q in prompts]))
s = torch.tensor(tok.convert_tokens_to_ids([q.s for q in prompts]))
labels = [f"{i}:{w}" for i, w in enumerate(model.to_str_tokens(clean[0]))]
ar = torch.arange(N)


def logit_diff(lg):
    last = lg[:, -1]
    return (last[ar, io] - last[ar, s]).mean()


logits, clean_cache = model.run_with_cache(clean)
ld_clean, ld_corr = float(logit_diff(logits)), float(logit_diff(model(corrupt)))
print(f"patching batch ({N} prompts, '{template}'): logit diff clean {ld_clean:.3f}, corrupted {ld_corr:.3f}")

# ---- 2. DLA: each component's output, through the final LayerNorm scale, on the IO - S unembedding
print("\n== 2. direct logit attribution (IO - S) at the last position ==")
unembed = model.W_U[:, io] - model.W_U[:, s]  # [d_model, batch]
# the toy model's LayerNorm weights are not folded into W_U: apply_ln centres and scales, w is ours
direction = (model.ln_final.w[:, None] * unembed).T  # [batch, d_model]
heads = clean_cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L*H, batch, d_model]
dla = (heads * direction).sum(-1).mean(-1).reshape(L, H)
table(dla, [f"L{i}" for i in range(L)], [f"H{h}" for h in range(H)])
parts, names = clean_cache.decompose_resid(pos_slice=-1, apply_ln=True, return_labels=True)
by_part = (parts * direction).sum(-1).mean(-1)
print("  by component: " + ", ".join(f"{n} {float(v):+.2f}" for n, v in zip(names, by_part)))
bias = float((model.ln_final.b @ unembed + model.b_U[io] - model.b_U[s]).mean())
print(f"  sum of components {float(by_part.sum()):.3f} + biases {bias:+.3f} = logit diff {ld_clean:.3f}")
figs["dla"] = (dla, "DLA per head (IO - S)", "head", "layer")

# ---- 3. attention from END to the names: a name mover attends to IO
print("\n== 3. attention from the last position to IO / S1 / S2 ==")
pos_io = torch.tensor([2 if q.order == "ABBA" else 4 for q in prompts])
pos_s1 = 6 - pos_io
pos_s2 = template.split().index("{B}", 4) + 1
for layer in range(L):
    pat = clean_cache["pattern", layer][:, :, -1]  # [batch, head, src]
    print("  " + "   ".join(f"L{layer}H{h} {float(pat[ar, h, pos_io].mean()):.2f}/"
                            f"{float(pat[ar, h, pos_s1].mean()):.2f}/{float(pat[:, h, pos_s2].mean()):.2f}"
                            for h in range(H)))

# ---- 4. exact activation patching: 1 = the clean logit diff restored, 0 = the corrupted one
print("\n== 4. exact activation patching (sparsekern.patching) ==")


def metric(lg):
    return (logit_diff(lg) - ld_corr) / (ld_clean - ld_corr)


exact, t = {}, time.perf_counter()
exact["resid_pre"] = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric, progress=False)
exact["attn_head_out_by_pos"] = patching.get_act_patch_attn_head_out_by_pos(
    model, corrupt, clean_cache, metric, progress=False)
exact["block_every"] = patching.get_act_patch_block_every(model, corrupt, clean_cache, metric, progress=False)
exact["attn_head_all_pos_every"] = patching.get_act_patch_attn_head_all_pos_every(
    model, corrupt, clean_cache, metric, progress=False)
print(f"four sweeps, {sum(v.numel() for v in exact.values())} patches, in {time.perf_counter() - t:.2f} s")
print("resid_pre [layer, position]:")
table(exact["resid_pre"], [f"L{i}" for i in range(L)], [str(i) for i in range(len(labels))])
print("  positions: " + " ".join(labels))
by_pos = exact["attn_head_out_by_pos"]
top = by_pos.flatten().abs().topk(5).indices
print("attn_head_out_by_pos, strongest (layer, position, head): " + ", ".join(
    f"L{i}H{h}@{labels[q]} {float(by_pos[i, q, h]):+.2f}" for i, q, h in
    (torch.unravel_index(j, by_pos.shape) for j in top)))
print("block_every, max over positions [resid_pre, attn_out, mlp_out] x layer:")
table(exact["block_every"].amax(-1), ["resid_pre", "attn_out", "mlp_out"], [f"L{i}" for i in range(L)])
print("attn_head_all_pos_every [output, q, k, v, pattern] x (layer, head):")
table(exact["attn_head_all_pos_every"].flatten(1), ["z", "q", "k", "v", "pattern"],
      [f"L{i}H{h}" for i in range(L) for h in range(H)])
figs["resid_pre"] = (exact["resid_pre"], "resid_pre patching", "position", "layer")
figs["head_every"] = (exact["attn_head_all_pos_every"].flatten(1), "head patching: z q k v pattern",
                      "layer*H + head", "activation")

# ---- 5. attribution patching: one forward + one backward per call, compared with the exact sweeps
print("\n== 5. attribution patching vs exact ==")
t = time.perf_counter()
with torch.enable_grad():
    est = {name: getattr(attribution, f"get_act_patch_{name}")(model, corrupt, clean_cache, metric)
           for name in exact}
print(f"four attribution sweeps in {time.perf_counter() - t:.2f} s")
cors = {}
for name in exact:
    cors[name] = corr(exact[name], est[name])
    print(f"  {name:<24} correlation exact vs attribution: {cors[name]:.3f}  "
          f"max |diff| {float((exact[name] - est[name]).abs().max()):.3f}")
print(f"patching correlation (resid_pre): {cors['resid_pre']:.3f}")

if args.out:
    try:
        import plotly.express as px
    except ImportError:
        print("plotly is not installed: no figures written")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        figs["atp_vs_exact"] = None
        for name, f in figs.items():
            if f is None:  # the scatter of attribution against exact for the by-position head sweep
                fig = px.scatter(x=exact["attn_head_out_by_pos"].flatten().numpy(),
                                 y=est["attn_head_out_by_pos"].flatten().numpy(),
                                 labels={"x": "exact", "y": "attribution"}, title="head out by position")
            else:
                fig = px.imshow(f[0].numpy(), title=f[1], labels={"x": f[2], "y": f[3]},
                                color_continuous_scale="RdBu", color_continuous_midpoint=0.0)
            fig.write_html(args.out / f"02_{name}.html", include_plotlyjs="directory")
        print(f"figures written to {args.out}")
print(f"done in {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU (after imports)")
ok = m["accuracy"] >= 0.9 and ld_clean > 1.0 and float(exact["resid_pre"][0, pos_s2]) > 0.9
sys.exit(0 if ok else 1)
