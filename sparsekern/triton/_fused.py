"""GEMM kernels with a selection epilogue (the "fused" encoder strategy; host side: ``encode.py``).

One program per ``[BM, BN]`` output tile (grouped order so that W_enc tiles are reused from L2),
the K loop of ``_tile.pre_tile`` (``tl.dot``: wgmma on Hopper for 16-bit inputs), then, instead
of storing the tile, the entries that can still matter are appended to per-row buffers: top-k
keeps keys that beat the row's ``kth`` (fixed during a launch; ``_select.tighten_kernel`` raises
it between column blocks), JumpReLU keeps ``pre > threshold``. A row's slots are reserved with one
atomic add per (row, tile), so buffer order depends on scheduling; the final ordering is a sort
on unique keys / feature ids, so results do not. ``cnt`` counts every hit, also past capacity C:
the host recomputes such rows exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._select import _NONE, beats, make_key, ordered
from ._tile import pre_tile


@triton.jit
def _tile_coords(N, NCOLS, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program: GROUP_M row tiles sweep each column tile in turn."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BM)
    n_n = tl.cdiv(NCOLS, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _append(cnt_ptr, rows, rmask, hit, C):
    """Reserve buffer slots for this tile's hits: (int32 offset row * C + slot, slot < C), garbage
    where not hit. int32 offsets (the host keeps rows * C < 2^31) spare the epilogue registers."""
    h = hit.to(tl.int32)
    n_hit = tl.sum(h, axis=1)
    base = tl.atomic_add(cnt_ptr + rows, n_hit, mask=rmask & (n_hit > 0))
    pos = base[:, None] + tl.cumsum(h, axis=1) - h
    return rows[:, None] * C + pos, hit & (pos < C)


@triton.jit
def topk_gemm_kernel(x_ptr, w_ptr, bdec_ptr, bias_ptr, cand_ptr, cnt_ptr, kth_ptr,
                     N, D_IN, col_lo, col_hi, sxm, sxk, swk, swn,
                     C: tl.constexpr, CENTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Columns [col_lo, col_hi) of ``pre``: append the keys that beat each row's kth."""
    pid_m, pid_n = _tile_coords(N, col_hi - col_lo, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = col_lo + pid_n * BN + tl.arange(0, BN)
    v = pre_tile(x_ptr, w_ptr, bdec_ptr, bias_ptr, rows, cols, N, D_IN, col_hi, sxm, sxk, swk, swn,
                 CENTER, BM, BN, BK, tl.float32, UPCAST, PREC)
    rmask = rows < N
    kth = tl.load(kth_ptr + rows, mask=rmask, other=_NONE)
    o = ordered(v)
    hit = beats(o, cols, kth) & rmask[:, None] & (cols < col_hi)[None, :]
    if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
        off, ok = _append(cnt_ptr, rows, rmask, hit, C)
        tl.store(cand_ptr + off, make_key(o, cols[None, :]), mask=ok)


@triton.jit
def threshold_gemm_kernel(x_ptr, w_ptr, bdec_ptr, bias_ptr, thr_ptr, val_ptr, idx_ptr, cnt_ptr,
                          N, D_IN, D_SAE, C, sxm, sxk, swk, swn,
                          CENTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """All of ``pre``: append (value, feature) of every ``pre > threshold`` (unordered)."""
    pid_m, pid_n = _tile_coords(N, D_SAE, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    v = pre_tile(x_ptr, w_ptr, bdec_ptr, bias_ptr, rows, cols, N, D_IN, D_SAE, sxm, sxk, swk, swn,
                 CENTER, BM, BN, BK, tl.float32, UPCAST, PREC)
    rmask = rows < N
    cmask = cols < D_SAE
    t = tl.load(thr_ptr + cols, mask=cmask, other=0.0)
    hit = (v > t[None, :]) & rmask[:, None] & cmask[None, :]
    if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
        off, ok = _append(cnt_ptr, rows, rmask, hit, C)
        tl.store(val_ptr + off, v, mask=ok)
        tl.store(idx_ptr + off, cols[None, :] + tl.zeros((BM, BN), tl.int32), mask=ok)
