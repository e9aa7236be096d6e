"""gram_topk: for every row of ``W [n, d]``, the k largest entries of ``W @ W.T`` off the diagonal.

This is the kernel of ``decoder_neighbours`` (cosines of unit decoder rows). ``W @ W.T`` is symmetric,
so each ``block x block`` tile serves two row blocks at once: half the GEMM work of a row-by-row top-k
(``topk_encode`` with ``W.T`` as the encoder), which is what bounds it on CPU. The ``[n, n]`` matrix
never exists: extra memory is O(n * cap) for the running candidates plus one tile per thread.

Semantics (every backend): row i ranks ``G[i, j] = <W[i], W[j]>`` over ``j != i`` by key ``G`` (or
``|G|`` with ``absolute``) descending, then by ``j`` ascending; the returned values are signed ``G``.
Each unordered pair's value is computed once (so ``G[i, j]`` and ``G[j, i]`` are the same number).

State: ``values [n, cap]`` / ``indices [n, cap]`` (int64, -1 = empty slot) hold each row's candidates;
``sparsekern::gram_topk_update_`` advances them over tournament rounds (each round a set of disjoint
block pairs, so one round's tiles run in parallel without locks); after all ``gram_rounds(n, block)``
rounds every row's slots contain its k best. :func:`gram_topk` runs the rounds and sorts.

Backends: ``cpp`` (CPU) and ``ref`` (any device; the oracle). There is no GPU kernel: on a GPU the
row-by-row ``topk_encode`` path (cuBLAS/Triton) is used by ``sparsekern.features.geometry`` instead.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .. import backends
from ..ref import gram as ref_gram
from . import validate as V

__all__ = ["gram_rounds", "gram_topk", "gram_topk_backend"]

DEFAULT_BLOCK = 512  # fp32 tile 1 MiB (one core's L2); measured fastest of 256/512/1024 at n 16384, d 768
_FINISH_ROWS = 8192
_MIN_SPARE = 64  # cap = k + max(k, 64): pruning (O(cap)) amortises over >= 64 admissions

gram_rounds = ref_gram.gram_rounds

backends.register("gram_topk_update", "ref")(ref_gram.gram_topk_update_)


@backends.register("gram_topk_update", "cpp", ("cpu",))
def _cpp(W, values, indices, k, absolute, block, round_begin, round_end):
    backends.native().gram_topk_update(W, values, indices, k, absolute, block, round_begin, round_end)


@torch.library.custom_op("sparsekern::gram_topk_update_", mutates_args=("values", "indices"))
def _gram_topk_update_(
    W: Tensor, values: Tensor, indices: Tensor, k: int, absolute: bool, block: int, round_begin: int,
    round_end: int,
) -> None:
    _, impl = backends.select("gram_topk_update", W.device)
    impl(W, values, indices, k, absolute, block, round_begin, round_end)


@_gram_topk_update_.register_fake
def _(W, values, indices, k, absolute, block, round_begin, round_end):
    return None


def gram_topk_backend(device: torch.device) -> str:
    """The backend ``gram_topk`` runs on for tensors on ``device`` (``"cpp"`` or ``"ref"``)."""
    return backends.select("gram_topk_update", device)[0]


def gram_topk(
    W: Float[Tensor, "n d"],
    k: int,
    *,
    absolute: bool = False,
    block: int = DEFAULT_BLOCK,
    progress: bool = False,
    desc: str = "gram top-k",
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """Top-k of every row of ``W @ W.T`` with the diagonal excluded (see the module doc).

    Args:
        W: ``[n, d]`` float32 or float64, finite (for cosines: rows of unit norm).
        k: ``1 <= k <= n - 1``.
        absolute: rank by ``|G|``; the values keep their sign.
        block: rows per tile; the result does not depend on it.
        progress: tqdm bar over the tournament rounds.

    Returns ``(values [n, k]`` in W's dtype, ``indices [n, k]`` int64), sorted by key desc, index asc.
    """
    V.tensor("W", W)
    if W.dim() != 2 or W.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"W must be a 2-D float32/float64 tensor [n, d], got {tuple(W.shape)} {W.dtype}")
    n = W.shape[0]
    if n < 2:
        raise ValueError(f"W has n={n} row(s); off-diagonal top-k needs at least 2")
    k = V.int_arg("k", k, 1, n - 1)
    if V.has_data(W) and not bool(torch.isfinite(W).all()):  # NaN would never be admitted: rows short of k
        raise ValueError("W contains NaN or inf; the Gram top-k is undefined")
    block = min(V.int_arg("block", block, 1, 2**62), n)
    W = W.detach().contiguous()
    cap = k + max(k, _MIN_SPARE)
    values = torch.zeros(n, cap, dtype=W.dtype, device=W.device)
    indices = torch.full((n, cap), -1, dtype=torch.int64, device=W.device)
    rounds = gram_rounds(n, block)
    step = max(1, math.ceil(rounds / 100))  # <= 100 calls: progress without per-call overhead
    bar = tqdm(total=rounds, disable=not progress, desc=desc, unit="round")
    for r0 in range(0, rounds, step):
        r1 = min(rounds, r0 + step)
        _gram_topk_update_(W, values, indices, k, bool(absolute), block, r0, r1)
        bar.update(r1 - r0)
    bar.close()
    out_v = torch.empty(n, k, dtype=W.dtype, device=W.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=W.device)
    for r0 in range(0, n, _FINISH_ROWS):  # row chunks: the sorts' temporaries stay small
        rows = slice(r0, min(n, r0 + _FINISH_ROWS))
        out_v[rows], out_i[rows] = ref_gram.best_slots(values[rows], indices[rows], k, bool(absolute))
    return out_v, out_i

