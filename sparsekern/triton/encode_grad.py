"""Triton kernels for the sparse encoders' backward (fp32 accumulation for bf16/fp16, fp64 stays fp64).

With ``pre[n, f] = xc[n] @ W_enc[:, f] + b_enc[f]`` and ``g [N, K]`` the gradient of the kept slots:

``dx[n] = sum_j g[n, j] * W_enc[:, idx[n, j]]``  (``encode_backward_input``)
    ``W_enc`` is ``[d_in, d_sae]`` row-major, so one feature's column is strided by ``d_sae``. Gathering
    it in place (what the decode kernel did on the view ``W_enc.t()``) reads one element per 32-byte
    sector: ``N*K*d_in*32`` bytes (12.9 GB at N 16384, K 32, d_in 768, whatever the dtype: 8x the
    useful bytes in fp32, 16x in bf16). No tiling fixes that: the columns a row needs are random.
    Here the gather runs on a transposed copy instead, made one ``d_in`` chunk at a time
    (``_transpose_kernel``: ``[BD, BF]`` tiles read along ``d_sae``, written along ``d_in``, both
    coalesced): ``2*d_in*d_sae*e`` bytes for the copies (151 MB fp32 at 768 x 24576) plus
    ``N*K*d_in*e`` for the gather of contiguous rows (1.6 GB fp32, 0.8 GB bf16), with a transient of
    ``chunk*d_sae*e`` (<= ``CHUNK_BYTES``) instead of a second ``W_enc``. The copy pays when
    ``N*K*(32 - e) > 2*d_sae*e`` (N*K >= ~7k at d_sae 24576 in fp32); below that (a few tokens,
    d_sae 2^20 with small batches) the kernel gathers in place: same kernel, the strides of ``W_enc``.
``dW_enc[:, f] = sum over slots with idx == f of g * xc[n]``  (``encode_backward_weight``)
    The decode weight-grad kernel wrote ``[d_sae, d_in]`` and the encoder returned its ``.t()``: a
    non-contiguous gradient that autograd's accumulation copies into ``W_enc``'s layout (one more
    ``2*d_in*d_sae*e`` pass and a second ``[d_in, d_sae]`` buffer). ``_weight_t_kernel`` writes
    ``[d_in, d_sae]`` directly: one program per (block of ``BF`` consecutive features, ``BD`` block of
    ``d_in``) walks its features' segments of the sorted slots together (``BF`` rows of ``xc``, each a
    contiguous ``BD`` read) and stores the ``[BD, BF]`` tile along ``d_sae`` (coalesced). It takes one
    slot per feature per iteration, so a block lasts as long as its longest segment: features with
    more than ``HOT_SLOTS`` slots (a feature firing on a large share of tokens) are left to
    ``_weight_hot_kernel`` (one program per (feature, ``d_in`` block), ``BE`` slots per iteration,
    the column stored with stride ``d_sae``: uncoalesced, but only for those few columns), which runs
    after it on the same stream. Indices are sorted once (``torch.sort``, stable); no atomics,
    deterministic, O(N*K + d_sae) extra memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CALLS
from ._common import (acc_dtype, cdiv, feature_segments, next_pow2, on_first_tensor_device, store_dtype,
                      tl_dtype)

CHUNK_BYTES = 64 << 20  # transient transposed W_enc chunk
HOT_SLOTS = 128  # features with more slots go through _weight_hot_kernel


@triton.jit
def _transpose_kernel(w_ptr, out_ptr, D0, DC, F, sw0, sw1, BD: tl.constexpr, BF: tl.constexpr):
    """out[f, c] = w[D0 + c, f] for c < DC, f < F; out is [F, DC] contiguous."""
    fs = tl.program_id(0).to(tl.int64) * BF + tl.arange(0, BF)
    cs = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)  # int64: (D0 + c) * sw0 passes 2^31
    tile = tl.load(w_ptr + (D0 + cs[:, None]) * sw0 + fs[None, :] * sw1,
                   mask=(cs[:, None] < DC) & (fs[None, :] < F))  # [BD, BF], read along f
    tl.store(out_ptr + fs[:, None] * DC + cs[None, :], tl.trans(tile),
             mask=(fs[:, None] < F) & (cs[None, :] < DC))  # written along c


@triton.jit
def _gather_kernel(g_ptr, i_ptr, w_ptr, out_ptr, K, D, sgn, sgk, sin, sik, swf, swd, son,
                   BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """out[n, ds] = sum_j g[n, j] * w[idx[n, j], ds]: one program per (row, d block)."""
    n = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)  # in place, ds * swd reaches d_in * d_sae
    dmask = ds < D
    acc = tl.zeros((BD,), ACC)
    for j0 in range(0, K, BK):
        js = j0 + tl.arange(0, BK)
        jmask = js < K
        idx = tl.load(i_ptr + n * sin + js * sik, mask=jmask, other=0)
        v = tl.load(g_ptr + n * sgn + js * sgk, mask=jmask, other=0.0).to(ACC)
        rows = tl.load(w_ptr + idx[:, None] * swf + ds[None, :] * swd,
                       mask=jmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * rows, axis=0)
    tl.store(out_ptr + n * son + ds, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _weight_t_kernel(x_ptr, g_ptr, perm_ptr, bounds_ptr, out_ptr, K, D, F, HOT, sxn, sxd, sgn, sgk,
                     BF: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """out[ds, f] = sum over sorted slots p of f: g[p] * x[p // K, ds]; out is [D, F] contiguous.
    Features with more than HOT slots get zeros here (``_weight_hot_kernel`` writes them)."""
    fs = tl.program_id(0).to(tl.int64) * BF + tl.arange(0, BF)
    ds = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)  # ds * F reaches d_in * d_sae
    fmask = fs < F
    dmask = ds < D
    start = tl.load(bounds_ptr + fs, mask=fmask, other=0)
    count = tl.load(bounds_ptr + fs + 1, mask=fmask, other=0) - start
    count = tl.where(count > HOT, 0, count)
    longest = tl.max(count, axis=0)
    acc = tl.zeros((BF, BD), ACC)
    for e in range(0, longest):
        live = e < count
        p = tl.load(perm_ptr + start + e, mask=live, other=0)  # flat slot n * K + j
        n = p // K
        v = tl.load(g_ptr + n * sgn + (p - n * K) * sgk, mask=live, other=0.0).to(ACC)
        rows = tl.load(x_ptr + n[:, None] * sxn + ds[None, :] * sxd,
                       mask=live[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += v[:, None] * rows
    tl.store(out_ptr + ds[None, :] * F + fs[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=fmask[:, None] & dmask[None, :])


@triton.jit
def _weight_hot_kernel(x_ptr, g_ptr, perm_ptr, bounds_ptr, out_ptr, K, D, F, HOT, sxn, sxd, sgn, sgk,
                       BE: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """The columns of features with more than HOT slots: one program per (feature, d block)."""
    f = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    dmask = ds < D
    start = tl.load(bounds_ptr + f)
    count = tl.load(bounds_ptr + f + 1) - start
    todo = tl.where(count > HOT, count, 0)
    acc = tl.zeros((BD,), ACC)
    for e0 in range(0, todo, BE):
        es = e0 + tl.arange(0, BE)
        emask = es < todo
        p = tl.load(perm_ptr + start + es, mask=emask, other=0)
        n = p // K
        v = tl.load(g_ptr + n * sgn + (p - n * K) * sgk, mask=emask, other=0.0).to(ACC)
        rows = tl.load(x_ptr + n[:, None] * sxn + ds[None, :] * sxd,
                       mask=emask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * rows, axis=0)
    keep = dmask & ((ds * 0 + count) > HOT)  # a vector mask (the interpreter rejects scalar & vector)
    tl.store(out_ptr + ds * F + f, acc.to(out_ptr.dtype.element_ty), mask=keep)


def _blocks(t: torch.Tensor, d: int) -> dict[str, int]:
    """Tile sizes. CUDA: not timed (no GPU here); chosen so every variant compiles for sm_90 without
    spills and at ~100 registers or fewer for fp32/bf16 (``python tests/triton_compile.py 90``: the
    weight kernel's [32 features, 64 d] tile spills with 4 warps, not with 8). The interpreter gets
    small tiles (every program runs in Python)."""
    p = next_pow2(d)
    if t.device.type != "cuda":
        return dict(BK=16, BD=min(64, max(16, p)), TD=16, TF=16, WF=16, WD=min(32, max(16, p)), warps=1,
                    wwarps=1)
    return dict(BK=16, BD=min(256, max(32, p)), TD=32, TF=64, WF=32, WD=64, warps=4, wwarps=8)


def use_transposed_copy(n_slots: int, d_sae: int, esize: int) -> bool:
    """Whether copying ``W_enc`` (``2*d_in*d_sae*e`` bytes) beats gathering its columns in place
    (``n_slots*d_in*32`` bytes, one 32-byte sector per element) over reading contiguous rows
    (``n_slots*d_in*e``). ``d_in`` cancels."""
    return n_slots * (32 - esize) > 2 * d_sae * esize


@on_first_tensor_device
def encode_backward_input(g, indices, W_enc, transpose: bool | None = None):
    """g/indices [N, K], W_enc [d_in, d_sae] (any strides) -> dx [N, d_in] in W_enc.dtype.
    ``transpose``: force (True) or forbid (False) the chunked transposed copy (None: by bytes moved)."""
    CALLS["encode_backward_input"] += 1
    n, k = indices.shape
    d_in, d_sae = W_enc.shape
    out = torch.empty(n, d_in, dtype=store_dtype(W_enc), device=W_enc.device)
    if n == 0 or d_in == 0:
        return out.to(W_enc.dtype)
    if k == 0 or d_sae == 0:
        return out.zero_().to(W_enc.dtype)
    b = _blocks(W_enc, d_in)
    acc = tl_dtype(acc_dtype(W_enc.dtype))
    if transpose is None:
        transpose = W_enc.stride(0) != 1 and use_transposed_copy(n * k, d_sae, W_enc.element_size())
    if not transpose:  # gather the columns in place (also the free case of a column-major W_enc)
        _gather_kernel[(n, cdiv(d_in, b["BD"]))](
            g, indices, W_enc, out, k, d_in, *g.stride(), *indices.stride(), W_enc.stride(1),
            W_enc.stride(0), out.stride(0), BK=b["BK"], BD=b["BD"], ACC=acc, num_warps=b["warps"])
        return out.to(W_enc.dtype)
    chunk = max(32, min(next_pow2(d_in), CHUNK_BYTES // max(1, d_sae * W_enc.element_size())))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two <= the budget
    buf = torch.empty(d_sae * min(chunk, d_in), dtype=W_enc.dtype, device=W_enc.device)
    for d0 in range(0, d_in, chunk):
        dc = min(chunk, d_in - d0)
        wt = buf[: d_sae * dc].view(d_sae, dc)
        _transpose_kernel[(cdiv(d_sae, b["TF"]), cdiv(dc, b["TD"]))](
            W_enc, wt, d0, dc, d_sae, W_enc.stride(0), W_enc.stride(1), BD=b["TD"], BF=b["TF"],
            num_warps=b["warps"])
        bd = min(b["BD"], max(16, next_pow2(dc)))
        o = out[:, d0:]
        _gather_kernel[(n, cdiv(dc, bd))](
            g, indices, wt, o, k, dc, *g.stride(), *indices.stride(), dc, 1, out.stride(0),
            BK=b["BK"], BD=bd, ACC=acc, num_warps=b["warps"])
    return out.to(W_enc.dtype)


@on_first_tensor_device
def encode_backward_weight(xc, g, indices, d_sae: int):
    """xc [N, d_in], g/indices [N, K] -> dW_enc [d_in, d_sae] (contiguous) in xc.dtype."""
    CALLS["encode_backward_weight"] += 1
    n, k = indices.shape
    d_in = xc.shape[1]
    dev = xc.device
    out = torch.empty(d_in, d_sae, dtype=store_dtype(xc), device=dev)
    if d_sae == 0 or d_in == 0:
        return out.to(xc.dtype)
    perm, bounds = feature_segments(indices, d_sae)
    b = _blocks(xc, d_in)
    acc = tl_dtype(acc_dtype(xc.dtype))
    _weight_t_kernel[(cdiv(d_sae, b["WF"]), cdiv(d_in, b["WD"]))](
        xc, g, perm, bounds, out, k, d_in, d_sae, HOT_SLOTS, *xc.stride(), *g.stride(),
        BF=b["WF"], BD=b["WD"], ACC=acc, num_warps=b["wwarps"])
    if n * k > HOT_SLOTS:  # else no feature can be hot
        _weight_hot_kernel[(d_sae, cdiv(d_in, b["BD"]))](
            xc, g, perm, bounds, out, k, d_in, d_sae, HOT_SLOTS, *xc.stride(), *g.stride(),
            BE=b["BK"], BD=b["BD"], ACC=acc, num_warps=b["warps"])
    return out.to(xc.dtype)
