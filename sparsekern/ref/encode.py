"""Reference encoders: pre = (x - b_dec) @ W_enc + b_enc, tiled over d_sae."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import BLOCK_ELEMS, acc_dtype


def _centered(x: Tensor, b_dec: Tensor | None, dt: torch.dtype) -> Tensor:
    x = x.to(dt)
    return x - b_dec.to(dt) if b_dec is not None else x


def _col_step(n_rows: int, d_sae: int) -> int:
    return max(1, min(d_sae, BLOCK_ELEMS // max(1, n_rows)))


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, relu: bool
) -> tuple[Tensor, Tensor]:
    """x [N, d_in] -> (values [N, k], indices [N, k]) sorted by (value desc, index asc).

    Running top-k merged tile by tile; a stable descending sort keeps the lower index first
    among equal values because earlier tiles (lower indices) come first in the merge buffer.
    """
    n, d_sae = x.shape[0], W_enc.shape[1]
    dt = acc_dtype(x.dtype)
    xc = _centered(x, b_dec, dt)
    best_v = torch.empty(n, 0, dtype=dt, device=x.device)
    best_i = torch.empty(n, 0, dtype=torch.int64, device=x.device)
    step = _col_step(n, d_sae)
    for j0 in range(0, d_sae, step):
        j1 = min(d_sae, j0 + step)
        pre = xc @ W_enc[:, j0:j1].to(dt) + b_enc[j0:j1].to(dt)
        idx = torch.arange(j0, j1, device=x.device).expand(n, -1)
        cand_v = torch.cat([best_v, pre], 1)
        cand_i = torch.cat([best_i, idx], 1)
        order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
        best_v = cand_v.gather(1, order)
        best_i = cand_i.gather(1, order)
    if relu:
        best_v = best_v.clamp_min(0)
    return best_v.to(x.dtype), best_i


def threshold_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, b_dec: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep every pre > threshold. Returns (values [N, K], indices [N, K], l0 [N]).

    K = max row L0 (0 if nothing fires). Slots are in ascending feature order; padding slots
    (j >= l0[row]) hold value 0 and index 0.
    """
    n, d_sae = x.shape[0], W_enc.shape[1]
    dt = acc_dtype(x.dtype)
    xc = _centered(x, b_dec, dt)
    thr = threshold.to(dt).expand(d_sae)
    rows, cols, vals = [], [], []
    step = _col_step(n, d_sae)
    for j0 in range(0, d_sae, step):
        j1 = min(d_sae, j0 + step)
        pre = xc @ W_enc[:, j0:j1].to(dt) + b_enc[j0:j1].to(dt)
        r, c = (pre > thr[j0:j1]).nonzero(as_tuple=True)
        rows.append(r)
        cols.append(c + j0)
        vals.append(pre[r, c])
    row = torch.cat(rows) if rows else x.new_zeros(0, dtype=torch.int64)
    col = torch.cat(cols) if cols else x.new_zeros(0, dtype=torch.int64)
    val = torch.cat(vals) if vals else x.new_zeros(0, dtype=dt)
    order = torch.argsort(row * d_sae + col)  # row-major, ascending feature within a row
    row, col, val = row[order], col[order], val[order]
    l0 = torch.bincount(row, minlength=n) if n else row.new_zeros(0)
    kmax = int(l0.max()) if l0.numel() else 0
    starts = torch.cumsum(l0, 0) - l0
    slot = torch.arange(row.numel(), device=x.device) - starts[row]
    values = torch.zeros(n, kmax, dtype=x.dtype, device=x.device)
    indices = torch.zeros(n, kmax, dtype=torch.int64, device=x.device)
    values[row, slot] = val.to(x.dtype)
    indices[row, slot] = col
    return values, indices, l0
