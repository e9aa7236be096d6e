"""Design check for the GPU encoders (no GPU needed): how many rank keys per row the "blocks" /
"fused" strategies of ``sparsekern/triton/encode.py`` keep, emulated with torch on CPU.

- first block (an eighth of the features): keys >= the K-th largest of 256 strided group maxima;
- fused blocks (doubling widths): keys above the exact K-th key of everything before the block;
- rows whose fused buffer (``C = 2 * max(256, next_pow2(2K))`` keys) would overflow.

``python benchmarks/encoder_candidates.py`` (random SAE-like weights, 64 rows per shape, ~1 min).
"""

from __future__ import annotations

import math

import torch

SHAPES = [(768, 24576, 32), (2304, 65536, 64), (2304, 262144, 64)]  # (d_in, d_sae, k)


def emulate(d_in: int, d_sae: int, k: int, rows: int = 64, lanes: int = 256) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=g)
    pre = x @ (torch.randn(d_in, d_sae, generator=g) / d_in**0.5) + torch.randn(d_sae, generator=g) * 0.1
    cap = 2 * max(lanes, 1 << (2 * k - 1).bit_length())
    first = max(lanes, d_sae // 8 // lanes * lanes)
    block = torch.cat([pre[:, :first], torch.full((rows, (-first) % lanes), -math.inf)], 1)
    tau = block.view(rows, -1, lanes).amax(1).topk(k, dim=1).values[:, -1:]
    first_keys = (pre[:, :first] >= tau).sum(1).float()
    hits, over, j = [], 0, first
    while j < d_sae:
        w = min(d_sae - j, j)
        h = (pre[:, j:j + w] > pre[:, :j].topk(k, dim=1).values[:, -1:]).sum(1)
        hits.append(round(h.float().mean().item(), 1))
        over += int((k + h > cap).sum())
        j += w
    return dict(first_mean=round(first_keys.mean().item(), 1), first_max=int(first_keys.max()),
                fused_block_means=hits, overflow_rows=over, capacity=cap)


if __name__ == "__main__":
    for d_in, d_sae, k in SHAPES:
        print(f"{d_in} x {d_sae}, k {k}: {emulate(d_in, d_sae, k)}")
