"""Selection kernels of the "blocks" and "fused" encoders (host side: ``encode.py``).

Top-k works on unique int64 *rank keys*: ``key = ordered(pre) << 32 | (2^31 - 1 - feature)``, where
``ordered`` maps fp32 to int32 in torch.sort's order (-0.0 == +0.0, every NaN above +inf). A larger
key ranks first, and equal values rank the lower feature first, so "the k largest keys" is exactly
the op's contract (value desc, ties -> lower index), ties and NaN included, with no float compares.

Per row the state is a candidate buffer ``cand [R, C]`` of keys, its fill ``cnt [R]`` and ``kth
[R]``: a key that every key still to come must beat to matter (the K-th best key seen so far, or
a lower bound on it; keys are unique, so "beat" is a strict compare and needs no tie rule).
``tighten`` keeps a row's K best keys in slots ``0..K-1`` and raises ``kth`` to the K-th of them
(the host sorts the final K). Threshold (JumpReLU) selection needs no state but the buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

NONE_KEY = -(2**63)  # below every real key (real keys have ordered(value) > INT32_MIN)
_NONE = tl.constexpr(NONE_KEY)


@triton.jit
def ordered(v):
    """fp32 -> int32 with torch.sort's order: -0.0 == +0.0 and every NaN above +inf."""
    b = v.to(tl.int32, bitcast=True)
    mag = b & 0x7FFFFFFF
    b = tl.where(mag == 0, 0, b)
    b = tl.where(mag > 0x7F800000, 0x7FC00000, b)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def make_key(o, cols):
    """Rank key of ordered value ``o`` at feature ``cols`` (int32, < 2^31)."""
    return (o.to(tl.int64) << 32) + (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def beats(o, cols, kth):
    """``make_key(o, cols) > kth`` in 32-bit arithmetic. o [R, B] int32, cols [B], kth [R] int64."""
    hi = (kth >> 32).to(tl.int32)
    idx = (0x7FFFFFFF - (kth - ((kth >> 32) << 32))).to(tl.int32)  # feature id of kth
    return (o > hi[:, None]) | ((o == hi[:, None]) & (cols[None, :] < idx[:, None]))


@triton.jit
def kth_largest(keys, K: tl.constexpr):
    """Per row, the K-th largest of ``keys [R, B]`` (int64), built bit by bit from the top: the
    largest t with at least K keys >= t. 64 compare-and-count rounds: cheaper than a sort network
    on the GPU and fast in the interpreter. Rows with fewer than K real keys get NONE_KEY."""
    ans = tl.where(tl.sum((keys >= 0).to(tl.int32), axis=1) >= K, 0, _NONE)
    for i in range(63):
        cand = ans | (tl.full((1,), 1, tl.int64) << (62 - i))
        ans = tl.where(tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1) >= K, cand, ans)
    return ans


@triton.jit
def tighten(cand_ptr, rows64, rmask, cnt, kth, K: tl.constexpr, C: tl.constexpr):
    """Keep each row's K best keys (in slots 0..K-1, unordered); raise kth to the K-th of them.

    Rows with fewer than K candidates keep them all (and their kth). Returns (cnt, kth)."""
    slots = tl.arange(0, C)
    ptrs = cand_ptr + rows64[:, None] * C + slots[None, :]
    live = rmask[:, None] & (slots[None, :] < cnt[:, None])
    keys = tl.load(ptrs, mask=live, other=_NONE)
    full = cnt >= K
    kth = tl.where(full, tl.maximum(kth, kth_largest(keys, K)), kth)
    keep = live & ((keys >= kth[:, None]) | ~full[:, None])  # exactly K keys (they are unique)
    k = keep.to(tl.int32)
    pos = tl.cumsum(k, axis=1) - k
    tl.debug_barrier()  # every thread has read the buffer before any slot is rewritten
    tl.store(cand_ptr + rows64[:, None] * C + pos, keys, mask=keep)
    return tl.minimum(cnt, K), kth


@triton.jit
def _chunk(pre_ptr, bias_ptr, rows64, rmask, NC, c0, lanes):
    """pre + bias for columns c0 + lanes of a row block (unspecified outside it: callers mask)."""
    cols = c0 + lanes
    m = rmask[:, None] & (cols < NC)[None, :]
    v = tl.load(pre_ptr + rows64[:, None] * NC + cols[None, :], mask=m, other=0.0)
    return v + tl.load(bias_ptr + cols, mask=cols < NC, other=0.0)[None, :]


@triton.jit
def topk_select_kernel(pre_ptr, bias_ptr, cand_ptr, cnt_ptr, kth_ptr, R, NC, col0,
                       FIRST: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr):
    """Stream one column block ``pre [R, NC]`` (fp32, contiguous; + ``bias [NC]``, features
    ``col0 + j``) into the candidate buffers. Needs K <= BC // 2 and C >= 2 * BC: a row holds at
    most C - BC keys before a chunk, so a chunk always fits (no overflow, no fallback)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BC)
    cnt = tl.load(cnt_ptr + rows, mask=rmask, other=0)
    kth = tl.load(kth_ptr + rows, mask=rmask, other=_NONE)
    if FIRST:
        # Nothing seen yet. Group the block's columns by lane (BC strided groups); the K-th largest
        # group maximum is reached by K distinct entries, so it bounds the K-th key from below and
        # the pass below keeps about K keys per row instead of the whole block.
        gmax = tl.full((BR, BC), _NONE, tl.int64)
        for c0 in range(0, NC, BC):
            cols = c0 + lanes
            m = rmask[:, None] & (cols < NC)[None, :]
            o = ordered(_chunk(pre_ptr, bias_ptr, rows64, rmask, NC, c0, lanes))
            key = make_key(o, (col0 + cols)[None, :])
            gmax = tl.maximum(gmax, tl.where(m, key, _NONE))
        tau = kth_largest(gmax, K)
        kth = tl.maximum(kth, tl.where(tau == _NONE, _NONE, tau - 1))  # keep key >= tau
    v_next = _chunk(pre_ptr, bias_ptr, rows64, rmask, NC, 0, lanes)
    for c0 in range(0, NC, BC):
        v = v_next
        # prefetch: the next chunk's loads are in flight while this one is selected
        v_next = _chunk(pre_ptr, bias_ptr, rows64, rmask, NC, c0 + BC, lanes)
        cols = c0 + lanes
        m = rmask[:, None] & (cols < NC)[None, :]
        o = ordered(v)
        gcols = col0 + cols
        hit = beats(o, gcols, kth) & m
        h = hit.to(tl.int32)
        n_hit = tl.sum(h, axis=1)
        if tl.max(n_hit, axis=0) > 0:
            pos = cnt[:, None] + tl.cumsum(h, axis=1) - h
            tl.store(cand_ptr + rows64[:, None] * C + pos, make_key(o, gcols[None, :]), mask=hit & (pos < C))
            cnt += n_hit
            if tl.max(cnt, axis=0) > C - BC:  # keep room for a whole chunk
                tl.debug_barrier()
                cnt, kth = tighten(cand_ptr, rows64, rmask, cnt, kth, K, C)
    if tl.max(cnt, axis=0) > K:
        tl.debug_barrier()
        cnt, kth = tighten(cand_ptr, rows64, rmask, cnt, kth, K, C)
    tl.store(cnt_ptr + rows, cnt, mask=rmask)
    tl.store(kth_ptr + rows, kth, mask=rmask)


@triton.jit
def tighten_kernel(cand_ptr, cnt_ptr, kth_ptr, R, K: tl.constexpr, C: tl.constexpr, BR: tl.constexpr):
    """``tighten`` every row after a fused GEMM block; rows that overflowed (cnt > C: the GEMM
    dropped keys) are left as they are for the host to recompute."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cnt = tl.load(cnt_ptr + rows, mask=rows < R, other=0)
    ok = (rows < R) & (cnt <= C)
    kth = tl.load(kth_ptr + rows, mask=ok, other=_NONE)
    cnt, kth = tighten(cand_ptr, rows.to(tl.int64), ok, cnt, kth, K, C)
    tl.store(cnt_ptr + rows, cnt, mask=ok)
    tl.store(kth_ptr + rows, kth, mask=ok)


@triton.jit
def threshold_select_kernel(pre_ptr, bias_ptr, thr_ptr, val_ptr, idx_ptr, cnt_ptr, R, NC, col0, C,
                            BR: tl.constexpr, BC: tl.constexpr):
    """Append every ``pre + bias > thr`` of a column block to the row's buffer, in feature order.
    ``cnt`` counts every hit, also past the capacity C (the host then reruns those rows)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BC)
    cnt = tl.load(cnt_ptr + rows, mask=rmask, other=0)
    for c0 in range(0, NC, BC):
        cols = c0 + lanes
        cm = cols < NC
        m = rmask[:, None] & cm[None, :]
        v = tl.load(pre_ptr + rows64[:, None] * NC + cols[None, :], mask=m, other=0.0)
        v += tl.load(bias_ptr + cols, mask=cm, other=0.0)[None, :]
        hit = (v > tl.load(thr_ptr + cols, mask=cm, other=0.0)[None, :]) & m
        h = hit.to(tl.int32)
        n_hit = tl.sum(h, axis=1)
        if tl.max(n_hit, axis=0) > 0:
            pos = cnt[:, None] + tl.cumsum(h, axis=1) - h
            ok = hit & (pos < C)
            off = rows64[:, None] * C + pos
            tl.store(val_ptr + off, v, mask=ok)
            tl.store(idx_ptr + off, (col0 + cols)[None, :] + tl.zeros((BR, BC), tl.int32), mask=ok)
            cnt += n_hit
    tl.store(cnt_ptr + rows, cnt, mask=rmask)
