"""Tour 04: the top activating examples of every SAE feature over a token stream, in
O(d_sae * k) memory -- the dashboard step of a feature study, on sparsekern.

A tiny random TransformerLens model and a random TopK SAE (no downloads); with real weights swap in
`HookedTransformer.from_pretrained(...)` and `sparsekern.TopKSAE.from_pretrained(...)`.

Run: python python/tours/04_top_activating_examples.py [--quick]
"""

import argparse

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
from sparsekern.features import top_activating_examples
from sparsekern.ops import FeatureTopKState, feature_topk_update

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="32 sequences instead of 64 (seconds)")
args = ap.parse_args()
n_seq = 32 if args.quick else 64

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=500,
                              act_fn="gelu")
model = HookedTransformer(cfg)
hook = "blocks.1.hook_resid_post"
sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=64, d_sae=1024, k=16, metadata={"hook_name": hook}))

# 1) the one-liner: token batches in, FeatureTopKState out (a tqdm bar shows progress)
tokens = torch.randint(0, 500, (n_seq, 32))
state = top_activating_examples(sae, tokens.split(16), k=10, model=model)
feature = int(state.values[:, 0].argmax())
print(f"{state}; {int((state.count() > 0).sum())} of {sae.cfg.d_sae} features fired")
print(f"feature {feature}: its strongest examples (value, sequence, position):")
for v, (s, p) in zip(state.values[feature].tolist(), state.locations[feature].tolist()):
    if s >= 0:
        context = tokens[s, max(0, p - 4): p + 1].tolist()
        print(f"  {v:7.3f}  seq {s:3d} pos {p:2d}  tokens ...{context}")

# 2) the op underneath, for your own loop: merge any SparseActs batch with explicit locations
state2 = FeatureTopKState.empty(sae.cfg.d_sae, 10)
for b, batch in enumerate(tokens.split(16)):
    _, cache = model.run_with_cache(batch, names_filter=hook)
    acts = sae.encode_sparse(cache[hook])  # SparseActs [batch, pos, 16]
    state2 = feature_topk_update(state2, acts, seq_offset=16 * b, inplace=True)
assert torch.equal(state.locations, state2.locations)
print("same state from the explicit loop: ok")
