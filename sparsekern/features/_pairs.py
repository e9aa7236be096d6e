"""Co-occurrence machinery of :class:`sparsekern.features.FeatureStats`: pair ids of the features firing
on the same token, the mirrored triangle of the pair table, and the mergeable partner sketch."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor

PAIR_CHUNK = 1 << 20  # pair ids per index_add_ call: a few MiB of temporaries per update
MIRROR_BLOCK = 256  # square tiles when mirroring the pair table (cache-friendly transposes)


# ---- pair counting -------------------------------------------------------------------------------
def sorted_live(pos: Tensor, ok: Tensor, sentinel: int) -> Tensor:
    """``[N, L]``: each row's live positions ascending, dead slots = ``sentinel`` at the end, trimmed to
    the longest live row (L = 0 when nothing fires)."""
    key = torch.where(ok, pos, sentinel).sort(dim=1).values
    width = int(ok.sum(1).max()) if ok.numel() else 0
    return key[:, :width]


def pair_ids(key: Tensor, side: int, dtype: torch.dtype) -> Iterable[Tensor]:
    """Flat ids ``a * side + b`` of the live pairs a < b of each row of ``key`` (from :func:`sorted_live`),
    in chunks of at most ``PAIR_CHUNK`` ids."""
    n, width = key.shape
    if width < 2 or n == 0:
        return
    iu = torch.triu_indices(width, width, 1, device=key.device)
    key = key.to(dtype)
    for chunk in key.split(max(1, PAIR_CHUNK // iu.shape[1])):
        b = chunk[:, iu[1]]
        ids = (chunk[:, iu[0]] * side).add_(b).reshape(-1)
        if bool((chunk[:, -1] == side).any()):  # some dead slot: keep pairs with both ends live
            ids = ids[(b < side).reshape(-1)]
        yield ids


def mirror_upper(table: Tensor, diag: Tensor) -> None:
    """In place: lower triangle := upper triangle transposed, diagonal := ``diag``; tile by tile so no
    temporary of the table's size exists."""
    side, bs = table.shape[0], MIRROR_BLOCK
    for i0 in range(0, side, bs):
        i1 = min(side, i0 + bs)
        for j0 in range(0, i0, bs):
            table[i0:i1, j0:j0 + bs].copy_(table[j0:j0 + bs, i0:i1].t())
        blk = table[i0:i1, i0:i1]
        up = blk.triu(1)
        blk.copy_(up + up.t())
    table.diagonal().copy_(diag.to(table.dtype))


# ---- partner sketch (batched, weighted Space-Saving / mergeable Misra-Gries) -------------------------
class Sketch(NamedTuple):
    """Per row i up to m partners sorted by (hi desc, partner asc): ``part`` [F, m] (-1 empty),
    ``lo``/``hi`` [F, m] bounds on C[i, part]; ``u`` [F] bounds C[i, j] of every partner not kept."""

    part: Tensor
    lo: Tensor
    hi: Tensor
    u: Tensor


def sketch_empty(d_sae: int, m: int, device: torch.device) -> Sketch:
    z = torch.zeros(d_sae, m, dtype=torch.int64, device=device)
    return Sketch(torch.full_like(z, -1), z, z.clone(), torch.zeros(d_sae, dtype=torch.int64, device=device))


def sketch_entries(s: Sketch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row, slot = (s.part >= 0).nonzero(as_tuple=True)
    return row, s.part[row, slot], s.lo[row, slot], s.hi[row, slot]


def sketch_combine(
    d_sae: int, m: int, a: tuple[Tensor, Tensor, Tensor, Tensor], u_a: Tensor,
    b: tuple[Tensor, Tensor, Tensor, Tensor], u_b: Tensor,
) -> Sketch:
    """Merge two summaries given as entries (row, partner, lo, hi) with their unkept bounds u.

    A partner missing from one side co-fired at most ``u`` times there, so its upper bound gains that
    side's u. Each row keeps its m largest upper bounds; u' = max(u_a + u_b, largest dropped upper).
    This is Misra-Gries with counters ``hi - u`` (Agarwal et al., "Mergeable summaries"), so
    u <= (pair events of the row) / (m + 1) however batches and merges are nested; ``lo`` counts exactly
    the co-firings seen while the partner was kept.
    """
    device = u_a.device
    na = a[0].numel()
    keys = torch.cat((a[0] * d_sae + a[1], b[0] * d_sae + b[1]))
    uk, inv = torch.unique(keys, return_inverse=True)
    lo = torch.zeros(uk.numel(), dtype=torch.int64, device=device).index_add_(0, inv, torch.cat((a[2], b[2])))
    hi = torch.zeros_like(lo).index_add_(0, inv, torch.cat((a[3], b[3])))
    in_a = torch.zeros(uk.numel(), dtype=torch.bool, device=device)
    in_b = torch.zeros_like(in_a)
    in_a[inv[:na]] = True
    in_b[inv[na:]] = True
    row, col = uk // d_sae, uk % d_sae
    hi += torch.where(in_a, 0, u_a[row]) + torch.where(in_b, 0, u_b[row])
    # order by (row asc, hi desc, col asc): uk is sorted by (row, col), so two stable sorts do it
    o1 = torch.sort(-hi, stable=True).indices
    order = o1[torch.sort(row[o1], stable=True).indices]
    row, col, lo, hi = row[order], col[order], lo[order], hi[order]
    start = torch.searchsorted(row, row)
    rank = torch.arange(row.numel(), device=device) - start
    keep = rank < m
    u = (u_a + u_b).scatter_reduce(0, row[~keep], hi[~keep], "amax")
    out = sketch_empty(d_sae, m, device)
    r, k = row[keep], rank[keep]
    out.part[r, k], out.lo[r, k], out.hi[r, k] = col[keep], lo[keep], hi[keep]
    return out._replace(u=u)
