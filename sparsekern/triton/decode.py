"""Triton sparse decode and its backward (fp32 accumulation for bf16/fp16, fp64 stays fp64).

forward          one program per (row, d block): gather the row's k rows of W_dec, weight, sum.
backward values  dvalues[n, j] = <grad_out[n], W_dec[idx[n, j]]>: a sparse-output matmul, one
                 program per (row, block of k slots), looping over d.
backward weight  dW_dec[f] = sum over slots with idx == f of values * grad_out[n]. The flattened
                 indices are sorted once (stable, torch.sort); every feature's slots are then a
                 contiguous segment and one program per (feature, d block) reduces its segment in
                 registers and writes its row (zeros for unused features). No atomics (so bf16 is
                 safe and the result is deterministic), no N*k*d buffer: extra memory is O(N*k + d_sae).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CALLS
from ._common import (acc_dtype, cdiv, feature_segments, next_pow2, on_first_tensor_device, store_dtype,
                      tl_dtype)


@triton.jit
def _fwd_kernel(v_ptr, i_ptr, w_ptr, b_ptr, out_ptr, K, D, svn, svk, sin, sik, swf, swd,
                HAS_B: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds < D
    acc = tl.zeros((BD,), ACC)
    for j0 in range(0, K, BK):
        js = j0 + tl.arange(0, BK)
        jmask = js < K
        idx = tl.load(i_ptr + n * sin + js * sik, mask=jmask, other=0)
        v = tl.load(v_ptr + n * svn + js * svk, mask=jmask, other=0.0).to(ACC)
        rows = tl.load(w_ptr + idx[:, None] * swf + ds[None, :] * swd,
                       mask=jmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * rows, axis=0)
    if HAS_B:
        acc += tl.load(b_ptr + ds, mask=dmask, other=0.0).to(ACC)
    tl.store(out_ptr + n * D + ds, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _bwd_values_kernel(g_ptr, i_ptr, w_ptr, out_ptr, K, D, sgn, sgd, sin, sik, swf, swd,
                       BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BK + tl.arange(0, BK)
    jmask = js < K
    idx = tl.load(i_ptr + n * sin + js * sik, mask=jmask, other=0)
    acc = tl.zeros((BK,), ACC)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < D
        g = tl.load(g_ptr + n * sgn + ds * sgd, mask=dmask, other=0.0).to(ACC)
        rows = tl.load(w_ptr + idx[:, None] * swf + ds[None, :] * swd,
                       mask=jmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(out_ptr + n * K + js, acc.to(out_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _bwd_weight_kernel(g_ptr, v_ptr, perm_ptr, bounds_ptr, out_ptr, K, D, sgn, sgd, svn, svk,
                       BE: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    f = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = ds < D
    start = tl.load(bounds_ptr + f)
    count = tl.load(bounds_ptr + f + 1) - start
    acc = tl.zeros((BD,), ACC)
    for e0 in range(0, count, BE):
        es = e0 + tl.arange(0, BE)
        emask = es < count
        p = tl.load(perm_ptr + start + es, mask=emask, other=0)  # flat slot n * K + j
        n = p // K
        v = tl.load(v_ptr + n * svn + (p - n * K) * svk, mask=emask, other=0.0).to(ACC)
        rows = tl.load(g_ptr + n[:, None] * sgn + ds[None, :] * sgd,
                       mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * rows, axis=0)
    tl.store(out_ptr + f * D + ds, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def _blocks(t: torch.Tensor, d: int) -> tuple[int, int, int]:
    """(k block, d block, num_warps). CUDA: not timed (no GPU here); chosen so every variant
    compiles for sm_90 without spills and under ~110 registers (tests/triton_compile.py).
    The interpreter gets small tiles because every program runs in Python."""
    if t.device.type != "cuda":
        return 16, min(64, max(16, next_pow2(d))), 1
    return 16, min(256, max(32, next_pow2(d))), 4


@on_first_tensor_device
def sparse_decode(values, indices, W_dec, b_dec):
    """values/indices [N, k], W_dec [d_sae, d] (any strides) -> [N, d] in W_dec.dtype."""
    CALLS["sparse_decode"] += 1
    n, k = values.shape
    d = W_dec.shape[1]
    out = torch.empty(n, d, dtype=store_dtype(W_dec), device=W_dec.device)
    if n == 0 or d == 0:
        return out.to(W_dec.dtype)
    bk, bd, warps = _blocks(W_dec, d)
    _fwd_kernel[(n, cdiv(d, bd))](
        values, indices, W_dec, b_dec if b_dec is not None else W_dec, out, k, d,
        *values.stride(), *indices.stride(), *W_dec.stride(),
        HAS_B=b_dec is not None, BK=bk, BD=bd, ACC=tl_dtype(acc_dtype(W_dec.dtype)), num_warps=warps,
    )
    return out.to(W_dec.dtype)


@on_first_tensor_device
def sparse_decode_backward_values(grad_out, indices, W_dec):
    """grad_out [N, d], indices [N, k] -> dvalues [N, k] in W_dec.dtype."""
    CALLS["sparse_decode_backward_values"] += 1
    n, k = indices.shape
    d = W_dec.shape[1]
    out = torch.empty(n, k, dtype=store_dtype(W_dec), device=W_dec.device)
    if n == 0 or k == 0:
        return out.to(W_dec.dtype)
    bk, bd, warps = _blocks(W_dec, d)
    _bwd_values_kernel[(n, cdiv(k, bk))](
        grad_out, indices, W_dec, out, k, d, *grad_out.stride(), *indices.stride(), *W_dec.stride(),
        BK=bk, BD=bd, ACC=tl_dtype(acc_dtype(W_dec.dtype)), num_warps=warps,
    )
    return out.to(W_dec.dtype)


@on_first_tensor_device
def sparse_decode_backward_weight(grad_out, values, indices, d_sae: int):
    """grad_out [N, d], values/indices [N, k] -> dW_dec [d_sae, d] in grad_out.dtype."""
    CALLS["sparse_decode_backward_weight"] += 1
    n, k = indices.shape
    d = grad_out.shape[1]
    dev = grad_out.device
    out = torch.empty(d_sae, d, dtype=store_dtype(grad_out), device=dev)
    if d_sae == 0 or d == 0:
        return out.to(grad_out.dtype)
    perm, bounds = feature_segments(indices, d_sae)
    be, bd, warps = _blocks(grad_out, d)
    _bwd_weight_kernel[(d_sae, cdiv(d, bd))](
        grad_out, values, perm, bounds, out, k, d, *grad_out.stride(), *values.stride(),
        BE=be, BD=bd, ACC=tl_dtype(acc_dtype(grad_out.dtype)), num_warps=warps,
    )
    return out.to(grad_out.dtype)
