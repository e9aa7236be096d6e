"""Tour 05: characterise an SAE's features at scale on sparsekern -- firing statistics,
co-occurrence, MLP neurons conditioned on features, decoder geometry, reconstruction metrics and
feature ablation -- without ever building a dense [tokens, d_sae] code.

A tiny random TransformerLens model and a random TopK SAE (no downloads); with real weights swap in
`HookedTransformer.from_pretrained(...)` and `sparsekern.SAE.from_pretrained(...)`.

Run: python python/tours/05_feature_analysis.py [--quick]
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
from sparsekern.features import (
    FeatureStats,
    decoder_neighbours,
    feature_logits,
    feature_stats,
    reconstruction_metrics,
)
from sparsekern.patching.feature_ablation import ablate_features

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="32 sequences instead of 64 (seconds)")
args = ap.parse_args()
n_seq = 32 if args.quick else 64

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_mlp=256, d_vocab=500,
                              act_fn="gelu")
model = HookedTransformer(cfg)
hook = "blocks.1.hook_resid_pre"
sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=64, d_sae=1024, k=16, metadata={"hook_name": hook}))
tokens = torch.randint(0, 500, (n_seq, 32))

# 1) streaming statistics over a token stream (tqdm bar), conditioned on layer 1's MLP neurons
stats = feature_stats(sae, tokens.split(16), model=model, cooccurrence=True,
                      conditioned_hook="blocks.1.mlp.hook_post")
print(stats)
alive = stats.counts > 0
print(f"{int(alive.sum())} of {sae.cfg.d_sae} features fired; median log10 sparsity "
      f"{float(stats.log_sparsity()[alive].median()):.2f}; median firing value "
      f"{float(stats.quantiles(0.5)[alive].median()):.3f}")
f = int(stats.counts.argmax())
ratio = stats.cooccurrence_ratio(rows=[f])[0].nan_to_num(0.0)  # P(f, j) / (P(f) P(j)); NaN: j never fired
ratio[f] = 0
print(f"feature {f} fires on {float(stats.frequency()[f]):.1%} of tokens; strongest partner "
      f"{int(ratio.argmax())} (x{float(ratio.max()):.1f} over independence)")
neurons = stats.conditioned_mean()[f]  # mean MLP activation weighted by feature f's activation
print(f"MLP neurons most active when feature {f} fires: {neurons.topk(5).indices.tolist()}")

# 2) states from disjoint splits merge exactly (one per process / GPU), and save with safetensors
halves = [feature_stats(sae, part.split(16), model=model, cooccurrence=True, progress=False)
          for part in tokens.chunk(2)]
merged = halves[0].merge(halves[1])
assert torch.equal(merged.cooccurrence, feature_stats(sae, tokens.split(16), model=model, cooccurrence=True,
                                                      progress=False).cooccurrence)
with tempfile.TemporaryDirectory() as folder:
    merged.save(Path(folder) / "stats.safetensors")
    print("merged halves == one pass; saved:", FeatureStats.load(Path(folder) / "stats.safetensors"))

# 3) decoder geometry and promoted tokens, top-k without a d_sae x d_sae matrix
nb = decoder_neighbours(sae.W_dec, k=5, absolute=True, progress=False)
print(f"feature {f}'s nearest decoder directions (|cos|): {nb.indices[f].tolist()} "
      f"{[round(v, 3) for v in nb.values[f].tolist()]}")
logits = feature_logits(sae, model, k=5, progress=False)
print(f"tokens feature {f} promotes: {logits.promoted_tokens[f].tolist()}")

# 4) SAELens's eval metrics in one pass over the data (a random SAE reconstructs badly: negative EV)
m = reconstruction_metrics(model, sae, tokens.split(16), progress=False)
print({k: round(v, 4) for k, v in m.to_dict().items() if k in ("explained_variance", "l0", "ce_loss_score")})


# 5) what removing each active feature does to a logit difference, every (feature, position)
def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


res = ablate_features(model, tokens[:1, :12], sae, metric, per_position=True)
row, pos = divmod(int(res.values.abs().argmax()), res.values.shape[1])
print(f"{int(res.active.sum())} ablations; largest effect: feature {int(res.feature_ids[row])} at "
      f"position {pos}: {float(res.values[row, pos]):+.4f}")
# the same sweep with one hooked forward per ablation (backend="reference"): the same numbers
ref = ablate_features(model, tokens[:1, :12], sae, metric, per_position=True, backend="reference",
                      progress=False)
print(f"fused ablations vs one hooked forward each: max |diff| "
      f"{float((res.values - ref.values).abs().max()):.2e}")
