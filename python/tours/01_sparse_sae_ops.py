"""Walk-through: encode activations with a TopK and a JumpReLU SAE without building the dense code,
then reconstruct and measure the error -- the first cells of any SAE notebook, on sparsekern.

Run: python python/01_sparse_sae_ops.py   (random weights; no downloads)
"""

import torch

import sparsekern as sk
from sparsekern.ops import sparse_decode, threshold_encode, topk_encode

torch.manual_seed(0)
d_in, d_sae, n_tokens, k = 768, 24576, 512, 32

W_dec = torch.randn(d_sae, d_in)
W_dec /= W_dec.norm(dim=-1, keepdim=True)
W_enc = W_dec.t().contiguous()  # tied init, as SAE training starts
b_enc = torch.zeros(d_sae)
b_dec = torch.zeros(d_in)
acts_in = torch.randn(4, n_tokens // 4, d_in)  # [batch, pos, d_in] residual-stream activations

print("backends:", sk.backends())
code = topk_encode(acts_in, W_enc, b_enc, k, b_dec=b_dec)
print("top-k code:", code, "mean L0:", code.l0().float().mean().item())
recon = sparse_decode(code.values, code.indices, W_dec, b_dec)
print("relative reconstruction error:", ((recon - acts_in).norm() / acts_in.norm()).item())

jump = threshold_encode(acts_in, W_enc, b_enc, threshold=2.5, b_dec=b_dec)
print("JumpReLU code:", jump, "mean L0:", jump.l0().float().mean().item())
dense_bytes = acts_in.shape[0] * acts_in.shape[1] * d_sae * 4
sparse_bytes = jump.values.numel() * 4 + jump.indices.numel() * 8
print(f"sparse code memory: {sparse_bytes / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.1f} MiB")

# the five strongest features of the last token and their decoder directions' norms
last = code.values[0, -1], code.indices[0, -1]
print("last token top features:", list(zip(last[1][:5].tolist(), [round(v, 3) for v in last[0][:5].tolist()])))
