"""Strategy "tiles": the first Triton encoders, kept for float64 and as a measured alternative.

topk_encode -- grid (row blocks, column splits). Each program walks the d_sae tiles of its split
and keeps a running top-k per row in registers (replace-the-worst merge, see ``_merge_tile``). It
writes its k candidates per row, so the only intermediate is ``[N, splits, k]`` (``splits`` is
small: just enough programs to fill the GPU; 1 when the row blocks already do). A stable sort of
those ``N * splits * k`` candidates gives the final (value desc, index asc) order.

threshold_encode -- the same tiles twice. Count pass: per (row, split) the number of
``pre > threshold``. An exclusive scan of the ``[N, splits]`` counts gives each (row, split) its
first output slot; the fill pass recomputes the identical tiles and scatters values/indices.
Exact L0 per row, no cap, ascending feature order within a row.

On an H200 the running merge made topk_encode 2-7x slower than the bare matmul; the default
strategies are in ``encode.py``. Precision notes: ``_tile.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, num_sms, store_dtype, tl_dtype
from ._tile import dot_precision, pre_tile, prepare, upcast

_SENT = tl.constexpr(0x7F000000)  # indices of still-empty running slots (unique: _SENT + slot)
_BIGC = tl.constexpr(0x7FFFFFFF)  # index of taken / out-of-range tile columns
MAX_K = 512  # the running top-k lives in registers: [16, 512] per program is the largest we compile


@triton.jit
def _worst(run_v, run_i):
    """Per row, the running entry that ranks last: lowest value, then highest index."""
    wv = tl.min(run_v, axis=1)
    wi = tl.max(tl.where(run_v == wv[:, None], run_i, -1), axis=1)
    return wv, wi


@triton.jit
def _merge_tile(run_v, run_i, tv, cols, K: tl.constexpr):
    """Merge a tile into the running top-k. tv [BM, BN]: pre-activations; cols [BN]: feature ids,
    _BIGC for columns outside this program's split. Round r takes the tile's next entry in
    (value desc, index asc) order -- the first one ranking below (lm, lc), the entry taken last, so
    the tile is never rewritten -- and moves it into the worst running slot if it ranks higher.
    The trip count is the most entries any row can gain, so late tiles (whose values rarely beat
    the k-th best) cost one count."""
    wv, wi = _worst(run_v, run_i)
    ok = (cols < _BIGC)[None, :]
    col = cols[None, :]
    beats = ok & ((tv > wv[:, None]) | ((tv == wv[:, None]) & (col < wi[:, None])))
    n_rounds = tl.minimum(tl.max(tl.sum(beats.to(tl.int32), axis=1), axis=0), K)
    lm = tl.full(wv.shape, float("inf"), wv.dtype)
    lc = tl.full(wi.shape, -1, tl.int32)
    for _ in range(n_rounds):
        elig = ok & ((tv < lm[:, None]) | ((tv == lm[:, None]) & (col > lc[:, None])))
        m = tl.max(tl.where(elig, tv, float("-inf")), axis=1)
        c = tl.min(tl.where(elig & (tv == m[:, None]), col, _BIGC), axis=1)
        win = (c < _BIGC) & ((m > wv) | ((m == wv) & (c < wi)))
        slot = (run_i == wi[:, None]) & win[:, None]
        run_v = tl.where(slot, m[:, None], run_v)
        run_i = tl.where(slot, c[:, None], run_i)
        lm, lc = m, c
        wv, wi = _worst(run_v, run_i)
    return run_v, run_i


@triton.jit
def _topk_kernel(x_ptr, w_ptr, bdec_ptr, bias_ptr, pv_ptr, pi_ptr,
                 N, D_IN, D_SAE, COLS_PER_SPLIT, sxm, sxk, swk, swn,
                 K: tl.constexpr, KP: tl.constexpr, CENTER: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    slots = tl.arange(0, KP)
    real = slots < K
    # real slots start empty (-inf, unique sentinel index); padding slots (>= K) hold +inf with
    # index -1 so they never rank last and are never replaced
    run_v = tl.where(real[None, :], tl.full((BM, KP), float("-inf"), ACC), float("inf"))
    run_i = tl.zeros((BM, KP), tl.int32) + tl.where(real, _SENT + slots, -1)[None, :]
    c_begin = pid_s * COLS_PER_SPLIT
    c_end = tl.minimum(c_begin + COLS_PER_SPLIT, D_SAE)
    for c0 in range(c_begin, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        pre = pre_tile(x_ptr, w_ptr, bdec_ptr, bias_ptr, rows, cols, N, D_IN, D_SAE,
                        sxm, sxk, swk, swn, CENTER, BM, BN, BK, ACC, UPCAST, PREC)
        run_v, run_i = _merge_tile(run_v, run_i, pre, tl.where(cols < c_end, cols, _BIGC), K)
    off = (rows.to(tl.int64)[:, None] * n_splits + pid_s) * K + slots[None, :]
    mask = (rows < N)[:, None] & real[None, :]
    tl.store(pv_ptr + off, run_v, mask=mask)
    tl.store(pi_ptr + off, run_i, mask=mask)


@triton.jit
def _threshold_kernel(x_ptr, w_ptr, bdec_ptr, bias_ptr, thr_ptr, cnt_ptr, start_ptr, ov_ptr, oi_ptr,
                      N, D_IN, D_SAE, COLS_PER_SPLIT, KMAX, sxm, sxk, swk, swn,
                      FILL: tl.constexpr, CENTER: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    c_begin = pid_s * COLS_PER_SPLIT
    c_end = tl.minimum(c_begin + COLS_PER_SPLIT, D_SAE)
    cnt_off = rows64 * n_splits + pid_s
    if FILL:
        pos = tl.load(start_ptr + cnt_off, mask=rmask, other=0)
    else:
        pos = tl.zeros((BM,), tl.int64)
    for c0 in range(c_begin, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < c_end
        pre = pre_tile(x_ptr, w_ptr, bdec_ptr, bias_ptr, rows, cols, N, D_IN, D_SAE,
                        sxm, sxk, swk, swn, CENTER, BM, BN, BK, ACC, UPCAST, PREC)
        thr = tl.load(thr_ptr + cols, mask=cmask, other=0.0)
        hit = (pre > thr[None, :]) & cmask[None, :] & rmask[:, None]
        h = hit.to(tl.int32)
        if FILL:
            slot = pos[:, None] + (tl.cumsum(h, axis=1) - h)
            ok = hit & (slot < KMAX)  # never write out of bounds, even if the passes disagreed
            off = rows64[:, None] * KMAX + slot
            tl.store(ov_ptr + off, pre.to(ov_ptr.dtype.element_ty), mask=ok)
            tl.store(oi_ptr + off, cols.to(tl.int64)[None, :] + tl.zeros((BM, BN), tl.int64), mask=ok)
        pos += tl.sum(h, axis=1)
    # both passes write their counts; the wrapper checks they agree
    if FILL:
        tl.store(cnt_ptr + cnt_off, pos - tl.load(start_ptr + cnt_off, mask=rmask, other=0), mask=rmask)
    else:
        tl.store(cnt_ptr + cnt_off, pos, mask=rmask)


# ---- host side -----------------------------------------------------------------------------
def _tiles(x: torch.Tensor, kp: int = 0) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps); ``kp`` = padded k for topk_encode, 0 for threshold_encode.
    CUDA topk sizes come from the H100 sweep of benchmarks/tune_triton.py
    (benchmarks/results/tune-triton-*-h100.json): 16-bit 64x64x32/4 warps was 1.3x faster than
    64x128x64/8, fp32 32x128x32/4 up to 1.2x faster than 64x128x16/8. threshold_encode measured
    1.2-1.3x slower with those tiles on the same machine, so it keeps the wider 8-warp ones.
    The interpreter gets small tiles because every program runs in Python."""
    if x.device.type != "cuda":
        return 16, 32, 16, 1
    if x.dtype == torch.float64:
        return 32, 64, 16, 4
    low = x.dtype in (torch.bfloat16, torch.float16)
    if kp == 0:
        # fp32 BK=16: the FMA (ieee) dot at BK=32 spilled 176-304 B/thread on sm_90 at 64x128
        return 64, 128, (64 if low else 16), 8
    if low:  # the running top-k [BM, KP] lives in registers
        return (64 if kp <= 64 else 32 if kp <= 256 else 16), 64, 32, 4
    return (32 if kp <= 256 else 16), 128, 32, 4


def _splits(x: torch.Tensor, n_rows: int, d_sae: int, bm: int, bn: int, splits: int | None):
    """(splits, columns per split): enough programs to fill the device, whole tiles per split."""
    n_tiles = cdiv(d_sae, bn)
    if splits is None:
        target = 4 * num_sms(x.device) if x.device.type == "cuda" else 2
        splits = cdiv(target, cdiv(n_rows, bm))
    splits = max(1, min(int(splits), n_tiles))
    per = cdiv(n_tiles, splits) * bn
    return cdiv(d_sae, per), per


def topk_encode(x, W_enc, b_enc, b_dec, k: int, relu: bool, *, splits: int | None = None):
    """x [N, d_in], W_enc [d_in, d_sae] -> (values [N, k] in x.dtype, indices [N, k] int64),
    sorted by value desc, ties to the lower index; ReLU after selection. ``splits`` overrides the
    number of d_sae splits (tests use it to exercise the cross-split merge). k <= MAX_K (the
    caller, ``encode.py``, routes larger k elsewhere)."""
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    if d_sae >= _SENT.value:
        raise ValueError(f"the triton topk_encode supports d_sae < {_SENT.value}, got {d_sae}")
    if n == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
    kp = max(2, next_pow2(k))
    bm, bn, bk, warps = _tiles(x, kp)
    n_split, per = _splits(x, n, d_sae, bm, bn, splits)
    acc, center, bdec, bias = prepare(x, W_enc, b_enc, b_dec)
    pv = torch.empty(n, n_split, k, dtype=acc, device=x.device)
    pi = torch.empty(n, n_split, k, dtype=torch.int32, device=x.device)
    _topk_kernel[(cdiv(n, bm), n_split)](
        x, W_enc, bdec if center else bias, bias, pv, pi, n, d_in, d_sae, per,
        *x.stride(), *W_enc.stride(),
        K=k, KP=kp, CENTER=center, BM=bm, BN=bn, BK=bk, ACC=tl_dtype(acc), UPCAST=upcast(x),
        PREC=dot_precision(x), num_warps=warps,
    )
    # merge the splits: order candidates by index, then a stable sort by value keeps ties ascending
    pv, pi = pv.reshape(n, -1), pi.reshape(n, -1)
    by_index = torch.argsort(pi, dim=1)
    pv, pi = pv.gather(1, by_index), pi.gather(1, by_index)
    best = torch.sort(pv, dim=1, descending=True, stable=True).indices[:, :k]
    values, indices = pv.gather(1, best), pi.gather(1, best).long()
    if relu:
        values = values.clamp_min(0)
    return values.to(x.dtype), indices


def threshold_encode(x, W_enc, b_enc, threshold, b_dec, *, splits: int | None = None):
    """x [N, d_in] -> (values [N, K], indices [N, K], l0 [N]); K = max row L0, rows in ascending
    feature order with 0/0 padding (the reference's contract). ``threshold``: [d_sae]."""
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    dev = x.device
    if n == 0:  # three distinct tensors: custom-op outputs must not alias
        z = torch.zeros(0, 0, dtype=torch.int64, device=dev)
        return x.new_zeros(0, 0), z, torch.zeros(0, dtype=torch.int64, device=dev)
    bm, bn, bk, warps = _tiles(x)
    n_split, per = _splits(x, n, d_sae, bm, bn, splits)
    acc, center, bdec, bias = prepare(x, W_enc, b_enc, b_dec)
    thr = threshold.to(acc).expand(d_sae).contiguous()
    counts = torch.empty(n, n_split, dtype=torch.int64, device=dev)
    grid = (cdiv(n, bm), n_split)
    common = dict(CENTER=center, BM=bm, BN=bn, BK=bk, ACC=tl_dtype(acc), UPCAST=upcast(x),
                  PREC=dot_precision(x),
                  num_warps=warps)
    args = (n, d_in, d_sae, per)
    strides = (*x.stride(), *W_enc.stride())
    bdec_arg = bdec if center else bias
    _threshold_kernel[grid](x, W_enc, bdec_arg, bias, thr, counts, counts, x, counts,
                            *args, 0, *strides, FILL=False, **common)
    l0 = counts.sum(1)
    starts = torch.cumsum(counts, 1) - counts  # exclusive scan within each row
    kmax = int(l0.max())
    values = torch.zeros(n, kmax, dtype=store_dtype(x), device=dev)
    indices = torch.zeros(n, kmax, dtype=torch.int64, device=dev)
    if kmax:
        refill = torch.empty_like(counts)
        _threshold_kernel[grid](x, W_enc, bdec_arg, bias, thr, refill, starts, values, indices,
                                *args, kmax, *strides, FILL=True, **common)
        if not torch.equal(refill, counts):
            raise RuntimeError("sparsekern triton threshold_encode: count and fill passes disagree")
    return values.to(x.dtype), indices, l0
