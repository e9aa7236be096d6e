"""Walk-through for seed notebook 001 (palindrome circuit) on the shipped toy model, offline.

The toy model (``sparsekern.toy``) completes digit palindromes ``3 1 4 | 4 1 3``: after ``|`` it must
emit the first half reversed. This script reproduces the notebook's analysis from the public API:

1. accuracy of the reversed half (teacher-forced), per palindrome length;
2. logit lens: how early (which residual stream) the right digit is already the top logit;
3. direct logit attribution (DLA) of every head to "right digit minus the mean digit";
4. attention of each head to the mirrored position (the digit to emit) and to the earlier copy of the
   current digit, plus the previous-token score that such a two-step circuit needs in layer 0;
5. exact activation patching (``sparsekern.patching``) from a clean palindrome into a corrupted one whose
   first half differs in one digit: residual stream by (layer, position), head outputs, and the
   attribution-patching estimate beside it.

Run:  PYTHONPATH=. python python/walkthroughs/01_palindrome_circuit.py [--quick] [--out DIR]
``--quick`` uses small samples (CI); ``--out DIR`` writes plotly HTML figures there when plotly is
installed (optional: without it the script only prints).
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import transformer_lens  # noqa: F401  (imported up front: the timing below excludes it)

import sparsekern.patching as patching
import sparsekern.toy
from sparsekern.patching import attribution
from sparsekern.toy import data

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="small samples (CI)")
ap.add_argument("--out", type=Path, default=None, help="write plotly HTML figures here (needs plotly)")
args = ap.parse_args()
N_SEQ = 32 if args.quick else 256
N = 4  # digits per half in the fixed-length batch: BOS d1..d4 | d4..d1 -> 10 tokens
t0, c0 = time.perf_counter(), time.process_time()
torch.set_grad_enabled(False)
model, _ = sparsekern.toy.load()
rng = random.Random(0)
figs = {}


def table(m, rows, cols, fmt="{:+6.2f}"):
    print(" " * 11 + " ".join(f"{c:>6}" for c in cols))
    for r, row in zip(rows, m.tolist()):
        print(f"{r:>10} " + " ".join(fmt.format(v) for v in row))


# ---- 1. accuracy: position p (the "|" and the reversed digits but the last) predicts token p + 1
print("== 1. accuracy of the reversed half (teacher-forced) ==")
accs = {}
for n in range(3, 9):
    toks = model.to_tokens([data.palindrome(rng, n, n) for _ in range(N_SEQ)])
    pred = model(toks).argmax(-1)[:, n + 1:2 * n + 1]
    accs[n] = float((pred == toks[:, n + 2:]).float().mean())
print("  " + "  ".join(f"len {n}: {a:.3f}" for n, a in accs.items()))
acc = sum(accs.values()) / len(accs)
print(f"palindrome token accuracy: {acc:.4f}")

# a fixed-length batch for the rest; answers at positions P are the first-half digits at 2N+1-p
toks = model.to_tokens([data.palindrome(rng, N, N) for _ in range(N_SEQ)])
P = list(range(N + 1, 2 * N + 1))
answers = toks[:, [p + 1 for p in P]]
logits, cache = model.run_with_cache(toks)
labels = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(toks[0]))]

# ---- 2. logit lens: unembed every intermediate residual stream through the final LayerNorm
print("\n== 2. logit lens: top-1 accuracy of each residual stream at the answer positions ==")
resid, names = cache.accumulated_resid(incl_mid=True, return_labels=True)
lens = (model.ln_final(resid[:, :, P]) @ model.W_U + model.b_U).argmax(-1) == answers  # [stream, batch, |P|]
lens_acc = lens.float().mean(1)
table(lens_acc, names, [f"pos {q}" for q in P], "{:6.2f}")
first = next((n for n, a in zip(names, lens_acc.mean(1)) if a > 0.9), "never")
print(f"logit lens: the right digit is readable (>90%) from {first}")

# ---- 3. DLA per head: right digit minus the mean over the ten digits, through the final LN scale
print("\n== 3. direct logit attribution per head (mean over answer positions) ==")
digits = torch.tensor(model.tokenizer.convert_tokens_to_ids(data.DIGITS))
direction = model.W_U[:, answers] - model.W_U[:, digits].mean(1)[:, None, None]  # [d_model, batch, |P|]
direction = direction * model.ln_final.w[:, None, None]  # LN weights are not folded into W_U in the toy
heads = cache.stack_head_results(layer=-1, apply_ln=True)[:, :, P]  # [L*H, batch, |P|, d_model]
dla = torch.einsum("cbpd,dbp->c", heads, direction) / (N_SEQ * len(P))
dla = dla.reshape(model.cfg.n_layers, model.cfg.n_heads)
table(dla, [f"L{i}" for i in range(model.cfg.n_layers)], [f"H{h}" for h in range(model.cfg.n_heads)])
figs["dla"] = (dla, "DLA per head (right digit - mean digit)", "head", "layer")

# ---- 4. attention: to the mirrored source (2N+1-p), to the earlier copy of the current digit (2N+2-p)
print("\n== 4. attention from the answer positions (mean over the batch) ==")
src_mirror = torch.tensor([2 * N + 1 - q for q in P])
src_copy = src_mirror + 1
print("  head   -> mirrored digit   -> earlier copy of current digit   -> previous token")
scores = []
for layer in range(model.cfg.n_layers):
    pat = cache["pattern", layer][:, :, P]  # [batch, head, |P|, src]
    ar = torch.arange(len(P))
    for h in range(model.cfg.n_heads):
        m, c = pat[:, h, ar, src_mirror].mean(), pat[:, h, ar, src_copy].mean()
        prev = cache["pattern", layer][:, h].diagonal(offset=-1, dim1=-2, dim2=-1)[:, 1:].mean()  # q -> q-1
        scores.append((float(c), layer, h))
        print(f"  L{layer}H{h}   {float(m):5.2f}              {float(c):5.2f}"
              f"                             {float(prev):5.2f}")
_, bl, bh = max(scores)
print(f"head attending most to the earlier copy: L{bl}H{bh}; its pattern on '{' '.join(labels)}':")
table(cache["pattern", bl][0, bh], labels, [str(i) for i in range(len(labels))], "{:6.2f}")
figs["pattern"] = (cache["pattern", bl][0, bh], f"attention pattern L{bl}H{bh}", "source", "destination")

# ---- 5. activation patching: corrupt first-half digit 2; the metric reads the position that emits it
print("\n== 5. activation patching (clean -> corrupted; 1 = clean behaviour restored) ==")
clean = toks.clone()
corrupt = toks.clone()
for b in range(N_SEQ):  # replace d2 by a digit absent from the sequence
    free = [d for d in digits.tolist() if d not in toks[b].tolist()]
    corrupt[b, 2] = rng.choice(free)
pos = 2 * N - 1  # the position whose next token is d2
ar = torch.arange(N_SEQ)
right, wrong = clean[:, 2], corrupt[:, 2]


def logit_diff(lg):
    last = lg[:, pos]
    return (last[ar, right] - last[ar, wrong]).mean()


_, clean_cache = model.run_with_cache(clean)
ld_clean, ld_corr = float(logit_diff(model(clean))), float(logit_diff(model(corrupt)))
print(f"logit diff clean {ld_clean:.3f}, corrupted {ld_corr:.3f}")
if ld_clean - ld_corr < 1.0:
    print("ERROR: corrupting the first half does not change the answer")
    sys.exit(1)


def metric(lg):
    return (logit_diff(lg) - ld_corr) / (ld_clean - ld_corr)


resid = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric, progress=False)
print("resid_pre patching [layer, position]:")
table(resid, [f"L{i}" for i in range(model.cfg.n_layers)], [str(i) for i in range(len(labels))])
for layer in range(model.cfg.n_layers):
    top = int(resid[layer].argmax())
    print(f"  layer {layer}: the information sits at position {top} "
          f"({float(resid[layer, top]):.2f} restored)")
heads_all = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric, progress=False)
print("attn_head_out_all_pos patching [layer, head]:")
table(heads_all, [f"L{i}" for i in range(model.cfg.n_layers)], [f"H{h}" for h in range(model.cfg.n_heads)])
figs["resid_pre"] = (resid, "resid_pre activation patching", "position", "layer")
figs["head_out"] = (heads_all, "head output patching (all positions)", "head", "layer")

with torch.enable_grad():  # attribution patching: one forward + one backward for all patches
    est = attribution.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
corr = float(torch.corrcoef(torch.stack([resid.flatten(), est.flatten()]))[0, 1])
print(f"resid_pre exact vs attribution patching: correlation {corr:.3f}, "
      f"max |diff| {float((resid - est).abs().max()):.3f}")

if args.out:
    try:
        import plotly.express as px
    except ImportError:
        print("plotly is not installed: no figures written")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (m, title, x, y) in figs.items():
            fig = px.imshow(m.numpy(), title=title, labels={"x": x, "y": y}, color_continuous_scale="RdBu",
                            color_continuous_midpoint=0.0)
            fig.write_html(args.out / f"01_{name}.html", include_plotlyjs="directory")  # one plotly.min.js
        print(f"figures written to {args.out}")
print(f"done in {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU (after imports)")
sys.exit(0 if acc >= 0.9 and float(resid.max()) > 0.5 else 1)
