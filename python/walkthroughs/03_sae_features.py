"""Walk-through for seed notebook 003 (SAE features) on the shipped toy model's residual SAE, offline.

The toy model ships a TopK SAE on ``blocks.1.hook_resid_pre`` (d_sae 1024, k 16). This script reproduces
the notebook's feature study from the public API:

1. splice the SAE into a ``sparsekern.HookedSAETransformer`` (with and without its error term) and read
   the code from a sparse cache: IOI logit difference kept by the reconstruction, top features at END;
2. feature statistics over a mixed corpus (IOI, palindromes, induction): firing frequency, the log10
   sparsity histogram, dead features;
3. top activating examples with their token context (``sparsekern.features.top_activating_examples``);
4. decoder neighbours (cosine) and the tokens each feature promotes (``feature_logits``);
5. feature ablation on an IOI prompt (``sparsekern.patching.feature_ablation.ablate_features``): which
   (feature, position) the logit difference depends on.

Run:  PYTHONPATH=. python python/walkthroughs/03_sae_features.py [--quick] [--out DIR]
``--quick`` uses small samples (CI); ``--out DIR`` writes plotly HTML figures there when plotly is
installed (optional: without it the script only prints).
"""

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformer_lens  # noqa: F401  (imported up front: the timing below excludes it)

import sparsekern
import sparsekern.toy
from sparsekern.features import decoder_neighbours, feature_logits, feature_stats, top_activating_examples
from sparsekern.patching.feature_ablation import ablate_features
from sparsekern.toy import data

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="small samples (CI)")
ap.add_argument("--out", type=Path, default=None, help="write plotly HTML figures here (needs plotly)")
args = ap.parse_args()
N_TEXTS = 150 if args.quick else 1500  # per task
t0, c0 = time.perf_counter(), time.process_time()
torch.set_grad_enabled(False)
model, saes = sparsekern.toy.load()
sae = saes["resid_sae"]
hook = sae.cfg.metadata.hook_name
# the same weights in a HookedSAETransformer (SAELens's class, running sparsekern SAEs)
hooked = sparsekern.HookedSAETransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
hooked.load_state_dict(model.state_dict())
hooked.eval()

# ---- 1. splice the SAE; read its code from a sparse cache
print(f"== 1. {hook}: SAE spliced into the model ==")
prompts = data.ioi_prompts("test", n=32, seed=3)


def render(q, template=data.TEMPLATES[0]):  # one template: equal lengths, one batch
    first, second = (q.io, q.s) if q.order == "ABBA" else (q.s, q.io)
    return (template.replace("{A}", first).replace("{B}", second, 1).replace("{B}", q.s)
            .replace("{P}", "park").replace("{O}", "book"))


texts = [render(q) for q in prompts]
ioi = model.to_tokens(texts)
io = torch.tensor(model.tokenizer.convert_tokens_to_ids([q.io for q in prompts]))
s = torch.tensor(model.tokenizer.convert_tokens_to_ids([q.s for q in prompts]))
ar = torch.arange(len(prompts))


def logit_diff(lg):
    last = lg[:, -1]
    return (last[ar, io] - last[ar, s]).mean()


clean = model(ioi)
with_err, cache = hooked.run_with_cache_with_saes(ioi, saes=[sae], use_error_term=True, sparse=True)
spliced = hooked.run_with_saes(ioi, saes=[sae], use_error_term=False)
acc = float((spliced[:, -1].argmax(-1) == io).float().mean())
print(f"max |logit change| with the error term: {float((with_err - clean).abs().max()):.2e}")
print(f"IOI logit diff clean {float(logit_diff(clean)):.3f}, SAE spliced {float(logit_diff(spliced)):.3f}; "
      f"IOI accuracy with SAE spliced: {acc:.4f}")
acts = cache[f"{hook}.hook_sae_acts_post"]  # SparseActs [batch, pos, k]: never a dense [.., 1024]
v, i = acts.values[0, -1], acts.indices[0, -1]
order = v.argsort(descending=True)[:5]
end_feats = [int(i[j]) for j in order]
print(f"'{texts[0]}': top features at END: " + ", ".join(f"{int(i[j])} ({float(v[j]):.2f})" for j in order))

# ---- a corpus of the three tasks, in batches of equal length (no padding to confuse the statistics)
rng = random.Random(0)
corpus = [q.text for q in data.ioi_prompts("train", n=N_TEXTS, seed=4)]
corpus += [data.palindrome(rng) for _ in range(N_TEXTS)] + [data.induction(rng) for _ in range(N_TEXTS)]
by_len = defaultdict(list)
for t in corpus:
    by_len[len(t.split())].append(t)
batches = [model.to_tokens(g[j:j + 64]) for g in by_len.values() for j in range(0, len(g), 64)]
rows = [r for b in batches for r in b]  # sequence number -> tokens (the numbering the helpers use)
n_tok = sum(b.numel() for b in batches)

# ---- 2. feature statistics: how often each feature fires, the log10 sparsity histogram
print(f"\n== 2. feature statistics over {len(rows)} sequences, {n_tok} tokens ==")
stats = feature_stats(sae, batches, model=model, progress=False)
logsp = stats.log_sparsity()
alive = stats.counts > 0
print(f"alive features: {int(alive.sum())} of {sae.cfg.d_sae}; median log10 sparsity of alive "
      f"{float(logsp[alive].median()):.2f}; densest feature fires on {float(stats.frequency().max()):.1%}")
edges = list(range(-5, 1))
hist = torch.histc(logsp[alive].float(), bins=5, min=-5, max=0).int().tolist()
print("log10 sparsity histogram: " + "  ".join(f"[{a},{b}): {h}" for a, b, h in zip(edges, edges[1:], hist)))

# ---- 3. top activating examples, with context
print("\n== 3. top activating examples ==")
top = top_activating_examples(sae, batches, k=5, model=model, progress=False)
words = model.tokenizer.convert_ids_to_tokens
show = end_feats[:3] + [int(stats.counts.argmax())]
for f in show:
    print(f"feature {f} (fires on {float(stats.frequency()[f]):.2%} of tokens):")
    for val, (sq, pos) in zip(top.values[f].tolist()[:3], top.locations[f].tolist()[:3]):
        if sq >= 0:
            start = max(0, pos - 6)  # six tokens before the activating one (bracketed) and one after
            ctx = words(rows[sq][start:pos + 2].tolist())
            mark = pos - start
            print(f"  {val:6.2f}  " + " ".join(f"[{w}]" if j == mark else w for j, w in enumerate(ctx)))

# ---- 4. decoder geometry and promoted tokens
print("\n== 4. decoder neighbours and promoted tokens ==")
nb = decoder_neighbours(sae.W_dec, k=3, progress=False)
fl = feature_logits(sae, model, k=5, progress=False)
for f in show:
    up, down = fl.token_strings(model, f)
    print(f"feature {f}: nearest decoder rows {nb.indices[f].tolist()} (cos "
          f"{', '.join(f'{c:.2f}' for c in nb.values[f].tolist())}); promotes {up}; suppresses {down}")
print(f"decoder cosine to nearest neighbour: median {float(nb.values[:, 0].median()):.3f}, "
      f"max {float(nb.values[:, 0].max()):.3f}")

# ---- 5. feature ablation on one IOI prompt: metric change for each (feature, position)
print("\n== 5. feature ablation on an IOI prompt (logit diff IO - S) ==")
res = ablate_features(model, ioi[:1], sae, lambda lg: lg[0, -1, io[0]] - lg[0, -1, s[0]], per_position=True,
                      progress=False)
labels = model.to_str_tokens(ioi[0])
print(f"baseline logit diff {float(res.baseline):.3f}; {int(res.active.sum())} (feature, position) ablations")
flat = res.values.flatten().topk(5, largest=False)
for val, j in zip(flat.values.tolist(), flat.indices.tolist()):
    row, pos = divmod(j, res.values.shape[1])
    f = int(res.feature_ids[row])
    up = fl.token_strings(model, f)[0][:3]
    print(f"  feature {f:4d} at {pos}:{labels[pos]:<6} {val:+.3f}  (promotes {up})")

if args.out:
    try:
        import plotly.express as px
    except ImportError:
        print("plotly is not installed: no figures written")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        figs = {
            "log_sparsity": px.histogram(x=logsp[alive].numpy(), nbins=50, labels={"x": "log10 frequency"},
                                         title="log10 feature sparsity (alive features)"),
            "feature_ablation": px.imshow(res.values[res.active.any(1)].numpy(), color_continuous_midpoint=0,
                                          labels={"x": "position", "y": "active feature"},
                                          color_continuous_scale="RdBu",
                                          title="feature ablation: Δ logit diff"),
        }
        for name, fig in figs.items():
            fig.write_html(args.out / f"03_{name}.html", include_plotlyjs="directory")  # one plotly.min.js
        print(f"figures written to {args.out}")
print(f"done in {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU (after imports)")
ok = float((with_err - clean).abs().max()) < 1e-3 and acc >= 0.5 and int(alive.sum()) > 0
sys.exit(0 if ok else 1)
