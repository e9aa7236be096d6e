"""Reference per-feature streaming top-k merge ("top activating examples"), vectorised.

Only the features that receive candidates in this batch are touched: their k state entries and
their new candidates are concatenated and ordered by (feature, value desc, seq asc, pos asc)
with stable sorts, and the first k of each feature's segment become the new state row.
Extra memory O(U*k + M) for U touched features and M candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    cl = locations[nz // kc]  # [M, 2]
    feats, inv = torch.unique(cf, sorted=True, return_inverse=True)
    u = feats.numel()
    dev = state_values.device
    grp_state = torch.arange(u, device=dev).repeat_interleave(k)
    all_v = torch.cat([state_values[feats].reshape(-1), cv])
    all_l = torch.cat([state_locations[feats].reshape(-1, 2), cl])
    all_g = torch.cat([grp_state, inv])
    # lexicographic order via stable sorts, least significant key first
    order = torch.sort(all_l[:, 1], stable=True).indices
    order = order[torch.sort(all_l[order, 0], stable=True).indices]
    order = order[torch.sort(all_v[order], descending=True, stable=True).indices]
    order = order[torch.sort(all_g[order], stable=True).indices]
    g = all_g[order]
    counts = torch.bincount(all_g, minlength=u)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(g.numel(), device=dev) - starts[g]
    keep = rank < k
    sel = order[keep]
    g, rank = g[keep], rank[keep]
    new_v = torch.empty(u, k, dtype=state_values.dtype, device=dev)
    new_l = torch.empty(u, k, 2, dtype=torch.int64, device=dev)
    new_v[g, rank] = all_v[sel]
    new_l[g, rank] = all_l[sel]
    state_values[feats] = new_v
    state_locations[feats] = new_l
