"""Tour 01: encode activations with a TopK and a JumpReLU SAE without building the dense code, then
reconstruct and measure the error -- the first cells of any SAE notebook, on sparsekern.

Run: python python/tours/01_sparse_sae_ops.py [--quick]   (random weights; no downloads)
"""

import argparse

import torch

import sparsekern as sk
from sparsekern.ops import sparse_decode, threshold_encode, topk_encode

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--quick", action="store_true", help="a narrower SAE and fewer tokens (seconds)")
args = ap.parse_args()

torch.manual_seed(0)
d_in, d_sae, n_tokens, k = (256, 4096, 128, 32) if args.quick else (768, 24576, 512, 32)

W_dec = torch.randn(d_sae, d_in)
W_dec /= W_dec.norm(dim=-1, keepdim=True)
W_enc = W_dec.t().contiguous()  # tied init, as SAE training starts
b_enc = torch.zeros(d_sae)
b_dec = torch.zeros(d_in)
acts_in = torch.randn(4, n_tokens // 4, d_in)  # [batch, pos, d_in] residual-stream activations

print("backends:", sk.backends())
code = topk_encode(acts_in, W_enc, b_enc, k, b_dec=b_dec)  # SparseActs [batch, pos, k]
print("top-k code:", code, "mean L0:", code.l0().float().mean().item())
recon = sparse_decode(code.values, code.indices, W_dec, b_dec)
print("relative reconstruction error:", ((recon - acts_in).norm() / acts_in.norm()).item())

# the same numbers the dense way (what SAELens computes): [batch, pos, d_sae] pre-activations
pre = (acts_in - b_dec) @ W_enc + b_enc
dense = code.to_dense(d_sae)
print(f"top-k code vs dense torch.topk: values max |diff| "
      f"{(code.values - pre.topk(k).values.relu()).abs().max().item():.2e}")
dense_recon = dense @ W_dec + b_dec
print(f"sparse_decode vs dense code @ W_dec: max |diff| {(recon - dense_recon).abs().max().item():.2e}")

jump = threshold_encode(acts_in, W_enc, b_enc, threshold=2.5, b_dec=b_dec)
print("JumpReLU code:", jump, "mean L0:", jump.l0().float().mean().item())
kept = jump.values != 0  # padding slots are 0 at an in-range index
at_features = pre.gather(-1, jump.indices)  # the dense pre-activations at the code's features
print(f"JumpReLU values vs dense pre at their features: max |diff| "
      f"{(jump.values - at_features)[kept].abs().max().item():.2e}; "
      f"every kept value > threshold: {bool((jump.values[kept] > 2.5).all())}")
dense_bytes = acts_in.shape[0] * acts_in.shape[1] * d_sae * 4
sparse_bytes = jump.values.numel() * 4 + jump.indices.numel() * 8
print(f"sparse code memory: {sparse_bytes / 2**20:.2f} MiB vs dense {dense_bytes / 2**20:.2f} MiB")

# the five strongest features of the last token
last = code.values[0, -1], code.indices[0, -1]
print("last token top features:", [(int(i), round(float(v), 3)) for v, i in zip(last[0][:5], last[1][:5])])
