"""Tour 02: exact activation patching with sparsekern.patching (the transformer_lens.patching API).

Run: PYTHONPATH=. python python/tours/02_activation_patching.py [--quick]
     (a small random model; no downloads; ~1 min on 2 cores, --quick: 2 layers, 8 positions, seconds)
Change `import transformer_lens.patching as patching` to `import sparsekern.patching as patching` in a
notebook and the same calls return the same tensors, computed from batched forwards that start at the
patched layer and reuse the corrupted run's keys/values for the positions before the patch.
"""

import argparse
import time
import warnings

import torch
import transformer_lens.patching as tl_patching
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sparsekern import patching

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="2 layers and 8 positions (seconds)")
args = ap.parse_args()
n_pos = 8 if args.quick else 12

warnings.simplefilter("ignore", DeprecationWarning)
torch.manual_seed(0)
cfg = HookedTransformerConfig(
    n_layers=2 if args.quick else 4,
    d_model=128,
    n_heads=4,
    d_head=32,
    d_mlp=512,
    d_vocab=1000,
    n_ctx=32,
    act_fn="gelu_new",
    normalization_type="LN",
    seed=0,
)
model = HookedTransformer(cfg).eval()

# an IOI-style pair: the prompts differ in one token (position 5), so most patches are exact no-ops
clean = torch.randint(0, 1000, (4, n_pos))
corrupted = clean.clone()
corrupted[:, 5] = torch.randint(0, 1000, (4,))
_, clean_cache = model.run_with_cache(clean)
right, wrong = 17, 42


def logit_diff(logits):  # [batch, pos, d_vocab] -> scalar
    return (logits[:, -1, right] - logits[:, -1, wrong]).mean()


t = time.perf_counter()
resid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff, progress=False)
print(f"resid_pre [layer, pos] {tuple(resid.shape)} in {time.perf_counter() - t:.2f} s")
print(resid)
# the same sweep with TransformerLens's own function: one full forward per patch, the same tensor
theirs = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff)
print(f"max |diff| vs transformer_lens.patching: {(resid - theirs).abs().max().item():.2e}")

t = time.perf_counter()
every = patching.get_act_patch_attn_head_by_pos_every(
    model, corrupted, clean_cache, logit_diff, progress=False
)
print(f"heads by position for z, q, k, v, pattern {tuple(every.shape)} in {time.perf_counter() - t:.2f} s")
layer, pos, head = (int(i) for i in torch.unravel_index(every[0].abs().argmax(), every[0].shape))
print(f"strongest head output patch: layer {layer}, position {pos}, head {head}: "
      f"{every[0, layer, pos, head]:.4f}")

# explicit index rows: a flat result in row order (TransformerLens's index_df behaviour)
df = patching.make_df_from_ranges([cfg.n_layers, n_pos], ["layer", "pos"]).query("pos >= 5")
vals, df = patching.generic_activation_patch(
    model,
    corrupted,
    clean_cache,
    logit_diff,
    patching.layer_pos_patch_setter,
    "resid_pre",
    index_df=df,
    return_index_df=True,
    progress=False,
    max_batch=8,
)
print("index_df rows:", len(df), "values:", tuple(vals.shape))
# each row's value is the grid's value at (layer, pos), up to fp32 rounding (other batches: max_batch=8)
grid = resid[torch.tensor(df["layer"].values), torch.tensor(df["pos"].values)]
print(f"index_df values vs the grid's: max |diff| {(vals - grid).abs().max().item():.2e}")
