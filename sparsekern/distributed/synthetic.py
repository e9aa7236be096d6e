"""Seeded synthetic TopK-SAE weights that any feature range can be drawn from alone.

The weights of a ``d_sae``-feature SAE are cut into blocks of :data:`BLOCK` features, each drawn from its
own seeded generator. A rank can therefore build exactly its shard ``[start, stop)`` without ever
holding (or drawing) the full ``[d_in, d_sae]`` matrix, and every shard, as well as one process holding
the whole range, sees the same numbers. Used by ``python -m sparsekern.distributed.demo`` and by
``sparsekern bench distributed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 1 << 16  # features per seeded block (changing it changes every number drawn)

__all__ = ["BLOCK", "synthetic_block", "synthetic_shard_weights"]


def synthetic_block(j: int, d_in: int, seed: int) -> tuple[Tensor, Tensor]:
    """Block ``j``: features ``[j * BLOCK, (j + 1) * BLOCK)`` as ``(W_enc [d_in, BLOCK], b_enc [BLOCK])``.

    fp32 on the CPU; ``W_enc ~ N(0, 1 / d_in)``, ``b_enc ~ N(0, 0.01)``, from a generator seeded with
    ``seed * 1_000_003 + j``.
    """
    if j < 0:
        raise ValueError(f"synthetic_block: j must be >= 0, got {j}")
    if d_in < 1:
        raise ValueError(f"synthetic_block: d_in must be >= 1, got {d_in}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + j)
    w = torch.randn(d_in, BLOCK, generator=g) / math.sqrt(d_in)
    return w, torch.randn(BLOCK, generator=g) * 0.1


def synthetic_shard_weights(d_in: int, start: int, stop: int, seed: int = 0) -> dict[str, Tensor]:
    """The state dict of features ``[start, stop)`` of the seeded synthetic TopK SAE.

    Returns fp32 CPU tensors ``W_enc [d_in, stop - start]``, ``b_enc [stop - start]``,
    ``W_dec = W_enc.T [stop - start, d_in]`` (contiguous) and the replicated ``b_dec [d_in]``
    (the same on every shard), ready for ``ShardedSAE.from_local_state_dict`` (or, with
    ``start = 0, stop = d_sae``, ``SAE.from_cfg_and_state_dict``). Only the blocks overlapping
    ``[start, stop)`` are drawn.
    """
    if d_in < 1:
        raise ValueError(f"synthetic_shard_weights: d_in must be >= 1, got {d_in}")
    if not 0 <= start < stop:
        raise ValueError(f"synthetic_shard_weights: need 0 <= start < stop, got start={start}, stop={stop}")
    W_enc = torch.empty(d_in, stop - start)
    b_enc = torch.empty(stop - start)
    for j in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        w, b = synthetic_block(j, d_in, seed)
        a, e = max(start, j * BLOCK), min(stop, (j + 1) * BLOCK)  # this block's part of [start, stop)
        W_enc[:, a - start: e - start] = w[:, a - j * BLOCK: e - j * BLOCK]
        b_enc[a - start: e - start] = b[a - j * BLOCK: e - j * BLOCK]
    b_dec = torch.randn(d_in, generator=torch.Generator().manual_seed(seed)) * 0.1
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_enc.T.contiguous(), "b_dec": b_dec}
