"""Reference sparse decode and its backward, chunked over rows (no N*k*d buffer overall)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import acc_dtype, row_chunks


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """out[n] = sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec); values/indices [N, k]."""
    n, k = values.shape
    d = W_dec.shape[1]
    dt = acc_dtype(W_dec.dtype)
    out = torch.empty(n, d, dtype=dt, device=W_dec.device)
    for a, b in row_chunks(n, k * d):
        rows = W_dec[indices[a:b]].to(dt)  # [chunk, k, d]
        out[a:b] = torch.einsum("nk,nkd->nd", values[a:b].to(dt), rows)
    if b_dec is not None:
        out += b_dec.to(dt)
    return out.to(W_dec.dtype)


def sparse_decode_backward_values(grad_out: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """grad_values[n, j] = <grad_out[n], W_dec[indices[n, j]]>  -> [N, k]."""
    n, k = indices.shape
    d = W_dec.shape[1]
    dt = acc_dtype(W_dec.dtype)
    out = torch.empty(n, k, dtype=dt, device=W_dec.device)
    for a, b in row_chunks(n, k * d):
        rows = W_dec[indices[a:b]].to(dt)
        out[a:b] = torch.einsum("nkd,nd->nk", rows, grad_out[a:b].to(dt))
    return out.to(W_dec.dtype)


def sparse_decode_backward_weight(
    grad_out: Tensor, values: Tensor, indices: Tensor, d_sae: int
) -> Tensor:
    """grad_W_dec[f] = sum over (n, j) with indices[n, j] == f of values[n, j] * grad_out[n]."""
    n, k = indices.shape
    d = grad_out.shape[1]
    dt = acc_dtype(grad_out.dtype)
    out = torch.zeros(d_sae, d, dtype=dt, device=grad_out.device)
    for a, b in row_chunks(n, k * d):
        contrib = values[a:b].to(dt)[:, :, None] * grad_out[a:b].to(dt)[:, None, :]
        out.index_add_(0, indices[a:b].reshape(-1), contrib.reshape(-1, d))
    return out.to(grad_out.dtype)
