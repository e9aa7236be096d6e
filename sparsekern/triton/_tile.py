"""Pieces shared by the Triton encoders: the pre-activation tile, b_dec folding, dot precision.

Precision: bf16/fp16 x and W_enc go to ``tl.dot`` as they are (products exact in fp32, fp32
accumulation) and b_dec is folded into the bias as ``b_enc - b_dec @ W_enc`` (fp32), so x need
not be centred in fp32 first. fp32/fp64 centre ``x - b_dec`` in the kernel (the reference's
arithmetic); fp32 uses ``input_precision="ieee"`` (no TF32: the 1e-5 contract).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, cdiv

FP32_DOT_CHOICES = ("ieee", "tf32x3", "tf32")


@triton.jit
def pre_tile(x_ptr, w_ptr, bdec_ptr, bias_ptr, rows, cols, N, D_IN, D_SAE, sxm, sxk, swk, swn,
             CENTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """[BM, BN] pre-activations for rows x cols (ACC dtype); out-of-range entries are garbage."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    rmask = rows < N
    cmask = cols < D_SAE
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, D_IN, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D_IN
        ks64 = ks.to(tl.int64)
        a = tl.load(x_ptr + rows64[:, None] * sxm + ks64[None, :] * sxk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        if CENTER:
            a = a - tl.load(bdec_ptr + ks, mask=kmask, other=0.0)[None, :]
        b = tl.load(w_ptr + ks64[:, None] * swk + cols64[None, :] * swn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns in tl.dot; fp32 is exact
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]


@triton.jit
def fold_bias_kernel(w_ptr, bdec_ptr, benc_ptr, out_ptr, D_IN, D_SAE, swk, swn,
                     BN: tl.constexpr, BK: tl.constexpr):
    """out = b_enc - b_dec @ W_enc in fp32 (the bias once x is no longer centred)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < D_SAE
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BN,), tl.float32)
    for k0 in range(0, D_IN, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D_IN
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * swk + cols64[None, :] * swn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        bd = tl.load(bdec_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        acc += tl.sum(bd[:, None] * w, axis=0)
    b = tl.load(benc_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, b - acc, mask=cmask)


def upcast(x: torch.Tensor) -> bool:
    """Off CUDA (the interpreter) 16-bit dot operands are cast to fp32 first, see pre_tile."""
    return x.device.type != "cuda" and x.dtype in (torch.bfloat16, torch.float16)


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot input precision. fp32: ``SPARSEKERN_TRITON_FP32_DOT`` (default "ieee": FMA, exact fp32
    products; "tf32x3": 3 TF32 tensor-core passes, ~fp32 accuracy; "tf32": fast but ~1e-3, outside
    the 1e-5 contract). Other dtypes: Triton's default (ignored for 16-bit)."""
    if x.dtype != torch.float32:
        return "tf32"
    prec = os.environ.get("SPARSEKERN_TRITON_FP32_DOT", "ieee").strip().lower() or "ieee"
    if prec not in FP32_DOT_CHOICES:
        raise ValueError(f"SPARSEKERN_TRITON_FP32_DOT={prec!r}; expected one of {FP32_DOT_CHOICES}")
    return prec


def fold_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``b_enc - b_dec @ W_enc`` as fp32 [d_sae], without an fp32 copy of W_enc."""
    d_in, d_sae = W_enc.shape
    bias = torch.empty(d_sae, dtype=torch.float32, device=W_enc.device)
    fold_bias_kernel[(cdiv(d_sae, 128),)](
        W_enc, b_dec.contiguous(), b_enc.contiguous(), bias, d_in, d_sae, *W_enc.stride(), BN=128, BK=32
    )
    return bias


def prepare(x, W_enc, b_enc, b_dec):
    """(acc dtype, centre in kernel?, b_dec in acc dtype or None, bias [d_sae] in acc dtype).

    16-bit inputs with a b_dec fold it into the bias (fp32) instead of centring x."""
    acc = acc_dtype(x.dtype)
    low = x.dtype in (torch.bfloat16, torch.float16)
    if b_dec is None or not low:
        bdec = b_dec.to(acc).contiguous() if b_dec is not None else None
        return acc, b_dec is not None, bdec, b_enc.to(acc).contiguous()
    return acc, False, None, fold_bias(W_enc, b_enc, b_dec)
