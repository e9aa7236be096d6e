"""Walk-through for seed notebook 004 ("midcoder") on the shipped MLP-0 transcoder, offline.

The toy model ships a TopK transcoder that reads ``blocks.0.ln2.hook_normalized`` and writes
``blocks.0.hook_mlp_out`` (d_sae 1024, k 16). Seed 004 accumulates per-feature statistics over a dataset
(act_counts, act_sum, act_sq_sum, pair co-activation counts, MLP-neuron gate counts conditioned on each
feature) and plots log sparsity, pair_prob / sing_prob and the cosine similarities of decoder rows.
Here one streaming ``sparsekern.features.feature_stats`` pass keeps all of them (never a dense
``[tokens, d_sae]`` code), and the script prints:

1. per-feature counts, mean and standard deviation of the activation, L0, dead features, the log10
   sparsity histogram;
2. co-occurrence: the pairs that fire together far more often than independence predicts
   (``cooccurrence_ratio`` = pair_prob / sing_prob) and the most frequent pairs;
3. MLP neurons conditioned on features: P(neuron gate open | feature fires) against its base rate, and
   whether the mean MLP output while a feature fires points along that feature's decoder row;
4. decoder geometry: nearest decoder rows by cosine (``decoder_neighbours``), and whether co-firing
   pairs have similar decoder rows.

Run:  PYTHONPATH=. python python/walkthroughs/04_transcoder_feature_stats.py [--quick] [--out DIR]
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

import sparsekern.toy
from sparsekern.features import decoder_neighbours, feature_stats
from sparsekern.toy import data

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="small samples (CI)")
ap.add_argument("--out", type=Path, default=None, help="write plotly HTML figures here (needs plotly)")
args = ap.parse_args()
N_TEXTS = 200 if args.quick else 3000  # per task
MIN_COUNT = 10 if args.quick else 50  # features / pairs rarer than this are too noisy to rank
t0, c0 = time.perf_counter(), time.process_time()
torch.set_grad_enabled(False)
model, saes = sparsekern.toy.load()
tc = saes["mlp0_transcoder"]
neuron_hook = "blocks.0.mlp.hook_post"  # GELU output: > 0 exactly when the neuron's gate is open

# a corpus of the three tasks in batches of equal length (no padding)
rng = random.Random(0)
corpus = [q.text for q in data.ioi_prompts("train", n=N_TEXTS, seed=5)]
corpus += [data.palindrome(rng) for _ in range(N_TEXTS)] + [data.induction(rng) for _ in range(N_TEXTS)]
by_len = defaultdict(list)
for t in corpus:
    by_len[len(t.split())].append(t)
batches = [model.to_tokens(g[j:j + 64]) for g in by_len.values() for j in range(0, len(g), 64)]

# ---- one pass: counts / sums / squares / histograms, the [F, F] pair table, neuron stats given features.
# (feature_stats(tc, batches, model=model, conditioned_hook=neuron_hook, ...) runs the model itself; here
# we feed (transcoder input, MLP neurons) pairs so the same forward also counts each gate's base rate.)
gate_open = torch.zeros(model.cfg.d_mlp, dtype=torch.int64)


def activations():
    for b in batches:
        _, cache = model.run_with_cache(b, names_filter=[tc.cfg.metadata.hook_name, neuron_hook],
                                        stop_at_layer=1)
        gate_open.add_((cache[neuron_hook] > 0).sum((0, 1)))
        yield cache[tc.cfg.metadata.hook_name], cache[neuron_hook]


stats = feature_stats(tc, activations(), conditioned_hook=neuron_hook, cooccurrence=True, y_moments=True,
                      progress=False)
F, n = tc.cfg.d_sae, stats.n_tokens
print(f"== 1. per-feature statistics ({n} tokens, {len(corpus)} sequences) ==")
counts = stats.counts
alive = counts > 0
mean, std = stats.mean_activation(), stats.activation_variance().sqrt()
l0 = float(counts.sum()) / n
print(f"L0 {l0:.2f} (k = {tc.cfg.k}); alive features {int(alive.sum())} of {F}; dead {int((~alive).sum())}")
print(f"act_counts: max {int(counts.max())}, median of alive {int(counts[alive].median())}; "
      f"mean activation (given firing): median {float(mean[alive].median()):.3f}, "
      f"std median {float(std[alive].median()):.3f}")
logsp = stats.log_sparsity()
edges = list(range(-5, 1))
hist = torch.histc(logsp[alive].float(), bins=5, min=-5, max=0).int().tolist()
print("log10 sparsity histogram: " + "  ".join(f"[{a},{b}): {h}" for a, b, h in zip(edges, edges[1:], hist)))
for f in counts.topk(3).indices.tolist():
    q = stats.quantiles([0.5, 0.99])[f].tolist()
    print(f"  feature {f}: fires on {float(stats.frequency()[f]):.1%}, mean {float(mean[f]):.2f}, "
          f"std {float(std[f]):.2f}, median {q[0]:.2f}, p99 {q[1]:.2f}")

# ---- 2. co-occurrence: ratio = P(i, j) / (P(i) P(j)) (seed 004's pair_prob / sing_prob)
print("\n== 2. co-occurrence ==")
C = stats.cooccurrence.to(torch.int64)
ratio = stats.cooccurrence_ratio()
upper = torch.triu(torch.ones(F, F, dtype=torch.bool), diagonal=1)
pairs = upper & (C >= MIN_COUNT)
print(f"pairs co-firing >= {MIN_COUNT} times: {int(pairs.sum())}; of these, ratio > 2: "
      f"{int((ratio[pairs] > 2).sum())}, ratio < 0.5: {int((ratio[pairs] < 0.5).sum())}")
best = torch.where(pairs, ratio, torch.zeros((), dtype=ratio.dtype)).flatten().topk(3)
for r, j in zip(best.values.tolist(), best.indices.tolist()):
    a, b = divmod(j, F)
    print(f"  features {a} & {b}: together {int(C[a, b])}x, ratio {r:.1f}, "
          f"P({b} | {a}) = {float(stats.cooccurrence_prob(rows=[a])[0, b]):.2f}")
most = torch.where(upper, C, 0).flatten().topk(3)
print("most frequent pairs: " + ", ".join(f"({j // F}, {j % F}) {c}x" for c, j in
                                          zip(most.values.tolist(), most.indices.tolist())))

# ---- 3. MLP-0 neurons conditioned on each feature
print(f"\n== 3. {neuron_hook} conditioned on features ==")
gate = stats.conditioned_positive_frac()  # [F, d_mlp] P(gate open | f fires)
base = gate_open.double() / n  # [d_mlp] P(gate open)
print(f"neuron gates open on {float(base.mean()):.1%} of tokens on average")
for f in counts.topk(3).indices.tolist():
    lift = gate[f] - base
    top = lift.topk(3).indices.tolist()
    print(f"  feature {f}: neurons " + ", ".join(f"{j} ({float(gate[f, j]):.2f} vs {float(base[j]):.2f})"
                                                for j in top))
# the mean MLP output while f fires (activation-weighted, minus the overall mean), against W_dec[f]
W_out = model.blocks[0].mlp.W_out
out_dir = (stats.conditioned_mean() - stats.y_mean()).float() @ W_out  # [F, d_model]
frequent = counts >= MIN_COUNT
cos_out = torch.nn.functional.cosine_similarity(out_dir[frequent], tc.W_dec[frequent], dim=-1)
print(f"cos(mean MLP output given f - overall mean, W_dec[f]) over {int(frequent.sum())} features: "
      f"median {float(cos_out.median()):.3f}, 10% quantile {float(cos_out.quantile(0.1)):.3f}")

# ---- 4. decoder geometry
print("\n== 4. decoder cosine similarities ==")
nb = decoder_neighbours(tc.W_dec, k=5, progress=False)
nearest = nb.values[:, 0]
print(f"cosine to the nearest other decoder row: median {float(nearest.median()):.3f} (alive "
      f"{float(nearest[alive].median()):.3f}, dead {float(nearest[~alive].median()):.3f}), max "
      f"{float(nearest.max()):.3f}; rows with a neighbour above 0.9: {int((nearest > 0.9).sum())}")
shown = set()
for f in nearest.argsort(descending=True).tolist():  # the closest pairs of features that fired
    g = int(nb.indices[f, 0])
    if len(shown) == 3 or (g, f) in shown or not (alive[f] and alive[g]):
        continue
    shown.add((f, g))
    print(f"  features {f} & {g}: cos {float(nearest[f]):.3f}, counts {int(counts[f])} / {int(counts[g])}, "
          f"co-fire {int(C[f, g])}x")
Wn = torch.nn.functional.normalize(tc.W_dec, dim=-1)
ia, ib = pairs.nonzero(as_tuple=True)
cos_pairs = (Wn[ia] * Wn[ib]).sum(-1)
rho = float(torch.corrcoef(torch.stack([cos_pairs.double(), ratio[ia, ib].log()]))[0, 1])
print(f"co-firing pairs: correlation of decoder cosine with log(pair_prob / sing_prob): {rho:.3f}")

if args.out:
    try:
        import plotly.express as px
    except ImportError:
        print("plotly is not installed: no figures written")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        figs = {
            "log_sparsity": px.histogram(x=logsp[alive].numpy(), nbins=50, title="log10 feature sparsity",
                                         labels={"x": "log10 frequency"}),
            "pair_ratio": px.histogram(x=ratio[pairs].log10().numpy(), nbins=60, labels={"x": "log10 ratio"},
                                       title="log10 pair_prob / sing_prob"),
            "cos_vs_ratio": px.scatter(x=cos_pairs.numpy(), y=ratio[ia, ib].log10().numpy(), opacity=0.3,
                                       labels={"x": "decoder cosine", "y": "log10 ratio"},
                                       title="co-firing pairs"),
            "decoder_cos": px.histogram(x=nearest.numpy(), nbins=50, labels={"x": "cosine"},
                                        title="cosine to the nearest decoder row"),
        }
        for name, fig in figs.items():
            fig.write_html(args.out / f"04_{name}.html", include_plotlyjs="directory")  # one plotly.min.js
        print(f"figures written to {args.out}")
print(f"done in {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU (after imports)")
ok = 0 < l0 <= tc.cfg.k and int(alive.sum()) > F // 4 and torch.equal(C.diagonal(), counts.cpu())
sys.exit(0 if ok else 1)
