"""Tour 03: splice an SAE into a model, cache its features sparsely, find the top features per
token and ablate one -- the usual SAELens notebook loop, on sparsekern (random weights, no downloads).

Run: python python/tours/03_hooked_sae_transformer.py [--quick]   (--quick: 2 layers, d_sae 16384)
"""

import argparse

import torch
from transformer_lens import HookedTransformerConfig

import sparsekern as sk

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="2 layers, a narrower SAE, fewer tokens (seconds)")
args = ap.parse_args()

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2 if args.quick else 4, d_model=128, n_heads=4, d_head=32, d_mlp=512,
                              d_vocab=1000, n_ctx=64, act_fn="gelu_new", normalization_type="LN")
model = sk.HookedSAETransformer(cfg).eval()

hook = "blocks.1.hook_resid_pre" if args.quick else "blocks.2.hook_resid_pre"
sae_cfg = sk.TopKSAEConfig(d_in=128, d_sae=16384 if args.quick else 65536, k=32)
sae_cfg.metadata.hook_name = hook
sae = sk.TopKSAE(sae_cfg).eval()  # random (tied) init; SAE.load_from_disk / from_pretrained for real ones

tokens = torch.randint(0, cfg.d_vocab, (2, 24) if args.quick else (4, 48))
with torch.no_grad():
    clean_logits = model(tokens)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, sparse=True)
print("max |logit change| with the SAE + error term (should be ~0):",
      (logits - clean_logits).abs().max().item())

acts = cache[f"{hook}.hook_sae_acts_post"]  # SparseActs [batch, pos, k]
dense_mib = tokens.numel() * sae_cfg.d_sae * 4 / 2**20
sparse_mib = (acts.values.nbytes + acts.indices.nbytes) / 2**20
print(f"acts_post: {acts}; {sparse_mib:.2f} MiB instead of {dense_mib:.1f} MiB dense")

# strongest features at the last position of the first prompt
v, i = acts.values[0, -1], acts.indices[0, -1]
order = v.argsort(descending=True)[:5]
print("top features at [0, -1]:", [(int(i[j]), round(float(v[j]), 3)) for j in order])

# ablate the strongest feature everywhere and measure the effect on the loss
target = int(i[order[0]])


def ablate(feature_acts, hook):
    feature_acts[..., target] = 0
    return feature_acts


with torch.no_grad():
    base_loss = model.run_with_saes(tokens, saes=[sae], use_error_term=True, return_type="loss")
    ablated = model.run_with_hooks_with_saes(
        tokens, saes=[sae], return_type="loss",
        fwd_hooks=[(f"{hook}.hook_sae_acts_post", ablate)],
    )
print(f"loss {base_loss.item():.4f} -> {ablated.item():.4f} after ablating feature {target}")
