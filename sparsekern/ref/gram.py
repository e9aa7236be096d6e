"""Reference symmetric Gram top-k update (the oracle of ``sparsekern.ops.gram_topk``), pure PyTorch.

Same tiles and tournament rounds as the C++ kernel (csrc/cpu/gram_topk.cpp): a tile ``W[I] @ W[J].T``
offers its entries to the rows of I and, transposed, to the rows of J; a diagonal tile offers its
strict upper triangle both ways. Each state row then keeps its best ``cap`` candidates by
(key desc, index asc), empty slots last (index -1, value 0). Extra memory O(block^2 + block * cap).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram_rounds(n: int, block: int) -> int:
    """Rounds of the schedule: round 0 (diagonal tiles) plus m - 1 tournament rounds, m = blocks rounded up
    to even."""
    nb = -(-n // block)
    return nb + (nb & 1)


def round_pairs(nb: int, r: int) -> list[tuple[int, int]]:
    """Disjoint block pairs of round ``r`` (circle method); pairs with the odd dummy block are dropped."""
    if r == 0:
        return [(b, b) for b in range(nb)]
    m, q = nb + (nb & 1), r - 1
    pairs = [(m - 1, q)] + [((q + t) % (m - 1), (q - t) % (m - 1)) for t in range(1, m // 2)]
    return [(a, b) for a, b in pairs if a < nb and b < nb]


def best_slots(values: Tensor, indices: Tensor, n: int, absolute: bool) -> tuple[Tensor, Tensor]:
    """The ``n`` best slots per row of ``values`` / ``indices`` ``[rows, slots]``, ordered by key (value,
    or ``|value|``) desc then index asc; empty slots (index -1) last."""
    indices, order = indices.sort(dim=1, stable=True)  # index asc breaks key ties
    values = values.gather(1, order)
    key = torch.where(indices < 0, float("-inf"), values.abs() if absolute else values)
    order = key.sort(dim=1, descending=True, stable=True).indices[:, :n]
    return values.gather(1, order), indices.gather(1, order)


def _offer(values: Tensor, indices: Tensor, rows: slice, cand_v: Tensor, cand_i: Tensor, ok: Tensor,
           absolute: bool) -> None:
    v = torch.cat((values[rows], torch.where(ok, cand_v, 0)), dim=1)
    i = torch.cat((indices[rows], torch.where(ok, cand_i, -1)), dim=1)
    values[rows], indices[rows] = best_slots(v, i, values.shape[1], absolute)


@torch.no_grad()
def gram_topk_update_(W: Tensor, values: Tensor, indices: Tensor, k: int, absolute: bool, block: int,
                      round_begin: int, round_end: int) -> None:
    n = W.shape[0]
    nb = -(-n // block)
    for r in range(round_begin, round_end):
        for a, b in round_pairs(nb, r):
            ra = slice(a * block, min(n, (a + 1) * block))
            rb = slice(b * block, min(n, (b + 1) * block))
            tile = W[ra] @ W[rb].T
            na, nb_ = tile.shape
            ok = torch.ones(na, nb_, dtype=torch.bool, device=W.device)
            if a == b:
                ok = torch.triu(ok, diagonal=1)
            cols = torch.arange(rb.start, rb.stop, device=W.device).expand(na, nb_)
            rows = torch.arange(ra.start, ra.stop, device=W.device).unsqueeze(1).expand(na, nb_)
            _offer(values, indices, ra, tile, cols, ok, absolute)
            _offer(values, indices, rb, tile.T, rows.T, ok.T, absolute)
