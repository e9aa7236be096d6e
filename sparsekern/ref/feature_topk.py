"""Reference per-feature streaming top-k merge ("top activating examples"), vectorised.

Only the features that receive candidates in this batch are touched. Candidates below their row's
smallest value are dropped (in a warm state, most of them); each row that a candidate still
enters has its k state entries and those candidates ordered by (feature, value desc, seq asc,
pos asc) with stable sorts, and the first k of each feature's segment become the new row.
Extra memory O(U*k + M) for U touched features and M candidates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows_sorted(v: Tensor, loc: Tensor) -> Tensor:
    """[U] bool: each row is ordered by (value desc, seq asc, pos asc)."""
    s, p = loc[..., 0], loc[..., 1]
    same_v, same_s = v[:, :-1] == v[:, 1:], s[:, :-1] == s[:, 1:]
    ok = (v[:, :-1] > v[:, 1:]) | (same_v & ((s[:, :-1] < s[:, 1:]) | (same_s & (p[:, :-1] <= p[:, 1:]))))
    return ok.all(1)


def _lex_order(g: Tensor, v: Tensor, loc: Tensor) -> Tensor:
    """Permutation ordering entries by (g asc, v desc, seq asc, pos asc), via stable sorts.

    Sorts by (g, v) first; only the runs of equal (g, v) (rare with real activations) are then
    re-sorted by location, in place within the run's block of positions."""
    order = torch.sort(v, descending=True, stable=True).indices
    order = order[torch.sort(g[order], stable=True).indices]
    gs, vs = g[order], v[order]
    same = (gs[1:] == gs[:-1]) & (vs[1:] == vs[:-1])  # same[i]: position i+1 ties with i
    if not bool(same.any()):
        return order
    in_run = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    in_run[1:] |= same
    in_run[:-1] |= same
    at = in_run.nonzero().squeeze(1)  # ascending: each run is a contiguous block
    run = torch.cumsum(torch.cat([same.new_ones(1), ~same]), 0)[at]
    sub = order[at]
    o = torch.sort(loc[sub, 1], stable=True).indices  # least significant key first
    o = o[torch.sort(loc[sub[o], 0], stable=True).indices]
    o = o[torch.sort(run[o], stable=True).indices]
    order[at] = sub[o]
    return order


def feature_topk_update_(
    state_values: Tensor, state_locations: Tensor, values: Tensor, indices: Tensor, locations: Tensor
) -> None:
    """In place: merge candidates into the state.

    state_values [d_sae, k] (float32/float64), state_locations [d_sae, k, 2] int64,
    values [R, kc] (state dtype), indices [R, kc] int64 in [0, d_sae), locations [R, 2] int64.
    Candidates are the entries with value > 0 (NaN never is one). Every touched row ends sorted
    by (value desc, seq asc, pos asc); untouched rows are left as they are.
    """
    k = state_values.shape[1]
    kc = values.shape[1]
    flat_v = values.reshape(-1)
    nz = (flat_v > 0).nonzero().squeeze(1)
    if nz.numel() == 0 or k == 0:
        return
    cv = flat_v[nz]
    cf = indices.reshape(-1)[nz]
    touched = torch.unique(cf, sorted=True)
    grp = torch.searchsorted(touched, cf)
    row_v, row_l = state_values[touched], state_locations[touched]
    # A candidate below its row's smallest value cannot enter; equal ones may (location order).
    enter = cv >= row_v.min(1).values[grp]
    # Rewrite the rows that a candidate enters, and touched rows not yet in the op's order (a
    # hand-built state), which get sorted like the native backends sort them.
    need = ~_rows_sorted(row_v, row_l)
    need[grp[enter]] = True
    feats = touched[need]
    cv, cf, nz = cv[enter], cf[enter], nz[enter]
    if feats.numel() == 0:
        return
    cl = locations[nz // kc]  # [M, 2]
    inv = torch.searchsorted(feats, cf)
    u = feats.numel()
    dev = state_values.device
    rv, rl = row_v[need], row_l[need]
    # Empty slots (-inf, -1, -1) sort after every real entry, so they are left out of the sort
    # and re-padded at the end; a row holding another -inf entry (hand-built) keeps them all.
    empty = (rv == -math.inf) & (rl[..., 0] == -1) & (rl[..., 1] == -1)
    odd = ((rv == -math.inf) & ~empty).any(1, keepdim=True)
    real = (~empty | odd).reshape(-1)
    grp_state = torch.arange(u, device=dev).repeat_interleave(k)[real]
    all_v = torch.cat([rv.reshape(-1)[real], cv])
    all_l = torch.cat([rl.reshape(-1, 2)[real], cl])
    all_g = torch.cat([grp_state, inv])
    order = _lex_order(all_g, all_v, all_l)
    g = all_g[order]
    counts = torch.bincount(all_g, minlength=u)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(g.numel(), device=dev) - starts[g]
    keep = rank < k
    sel = order[keep]
    g, rank = g[keep], rank[keep]
    new_v = torch.full((u, k), -math.inf, dtype=state_values.dtype, device=dev)
    new_l = torch.full((u, k, 2), -1, dtype=torch.int64, device=dev)
    new_v[g, rank] = all_v[sel]
    new_l[g, rank] = all_l[sel]
    state_values[feats] = new_v
    state_locations[feats] = new_l
