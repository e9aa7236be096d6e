"""Compile every Triton kernel for a CUDA arch without a GPU (Triton ships ptxas), as the host
wrappers would launch them. Used by tests/test_triton.py; by hand:
``python tests/triton_compile.py 90`` prints registers/spills per kernel variant."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsekern.triton import _fused, _select, _tile, decode, encode, encode_grad, encode_tiles
from sparsekern.triton._common import acc_dtype, tl_dtype

PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def variants():
    """(name, jit fn, {arg: type}, constexprs, num_warps) for the configs the wrappers use on CUDA."""
    out = []
    for dt in DTYPES:
        cuda_like = type("T", (), {"device": torch.device("cuda"), "dtype": dt})()
        acc = acc_dtype(dt)
        low = dt in (torch.bfloat16, torch.float16)
        P, A = PTR[dt], PTR[acc]
        enc_ints = {n: "i32" for n in ("N", "D_IN", "D_SAE", "COLS_PER_SPLIT", "sxm", "sxk", "swk", "swn")}
        for k in (32, 64, 128, 256):
            bm, bn, bk, w = encode_tiles._tiles(cuda_like, k)
            sig = {"x_ptr": P, "w_ptr": P, "bdec_ptr": A, "bias_ptr": A, "pv_ptr": A, "pi_ptr": "*i32",
                   **enc_ints}
            ce = dict(K=k, KP=k, CENTER=not low, BM=bm, BN=bn, BK=bk, ACC=tl_dtype(acc), UPCAST=False,
                      PREC=_tile.dot_precision(cuda_like))
            out.append((f"topk {dt} k={k}", encode_tiles._topk_kernel, sig, ce, w))
            if dt == torch.float32 and k == 64:  # the opt-in SPARSEKERN_TRITON_FP32_DOT=tf32x3
                tf32x3 = {**ce, "PREC": "tf32x3"}
                out.append(("topk fp32 tf32x3 k=64", encode_tiles._topk_kernel, sig, tf32x3, w))
        bm, bn, bk, w = encode_tiles._tiles(cuda_like)
        for fill in (False, True):
            sig = {"x_ptr": P, "w_ptr": P, "bdec_ptr": A, "bias_ptr": A, "thr_ptr": A, "cnt_ptr": "*i64",
                   "start_ptr": "*i64", "ov_ptr": P, "oi_ptr": "*i64",
                   **{n: "i32" for n in ("N", "D_IN", "D_SAE", "COLS_PER_SPLIT", "KMAX")},
                   **{n: "i32" for n in ("sxm", "sxk", "swk", "swn")}}
            ce = dict(FILL=fill, CENTER=not low, BM=bm, BN=bn, BK=bk, ACC=tl_dtype(acc), UPCAST=False,
                      PREC=_tile.dot_precision(cuda_like))
            out.append((f"threshold {dt} fill={fill}", encode_tiles._threshold_kernel, sig, ce, w))
        if low:
            sig = {"w_ptr": P, "bdec_ptr": P, "benc_ptr": P, "out_ptr": "*fp32",
                   **{n: "i32" for n in ("D_IN", "D_SAE", "swk", "swn")}}
            out.append((f"fold_bias {dt}", _tile.fold_bias_kernel, sig, dict(BN=128, BK=32), 4))
        if dt != torch.float64:
            out += _fused_variants(cuda_like, P)
        bk, bd, w = decode._blocks(cuda_like, 2304)
        ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
        sig = {"v_ptr": P, "i_ptr": "*i64", "w_ptr": P, "b_ptr": P, "out_ptr": P,
               **ints("K", "D", "svn", "svk", "sin", "sik", "swf", "swd")}
        out.append((f"decode_fwd {dt}", decode._fwd_kernel, sig,
                    dict(HAS_B=True, BK=bk, BD=bd, ACC=tl_dtype(acc)), w))
        sig = {"g_ptr": P, "i_ptr": "*i64", "w_ptr": P, "out_ptr": P,
               **ints("K", "D", "sgn", "sgd", "sin", "sik", "swf", "swd")}
        out.append((f"decode_bwd_values {dt}", decode._bwd_values_kernel, sig,
                    dict(BK=bk, BD=bd, ACC=tl_dtype(acc)), w))
        sig = {"g_ptr": P, "v_ptr": P, "perm_ptr": "*i64", "bounds_ptr": "*i64", "out_ptr": P,
               **ints("K", "D", "sgn", "sgd", "svn", "svk")}
        out.append((f"decode_bwd_weight {dt}", decode._bwd_weight_kernel, sig,
                    dict(BE=bk, BD=bd, ACC=tl_dtype(acc)), w))
        out += _encode_grad_variants(cuda_like, P, acc)
    return out + _select_variants()


def _fused_variants(cuda_like, P: str) -> list:
    """The fused GEMM + selection kernels with the tiles ``encode._gemm_config`` picks."""
    cfg = encode._gemm_config(cuda_like)
    w = cfg.pop("num_warps")
    cfg.pop("num_stages", None)
    ce = dict(CENTER=cuda_like.dtype == torch.float32, UPCAST=False, PREC=_tile.dot_precision(cuda_like),
              **cfg)
    ints = {n: "i32" for n in ("N", "D_IN", "sxm", "sxk", "swk", "swn")}
    common = {"x_ptr": P, "w_ptr": P, "bdec_ptr": "*fp32", "bias_ptr": "*fp32"}
    topk = {**common, "cand_ptr": "*i64", "cnt_ptr": "*i32", "kth_ptr": "*i64", "col_lo": "i32",
            "col_hi": "i32"}
    thr = {**common, "thr_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "cnt_ptr": "*i32",
           "D_SAE": "i32", "C": "i32"}
    dt = cuda_like.dtype
    return [(f"topk_gemm {dt}", _fused.topk_gemm_kernel, {**topk, **ints}, {**ce, "C": 512}, w),
            (f"threshold_gemm {dt}", _fused.threshold_gemm_kernel, {**thr, **ints}, ce, w)]


def _encode_grad_variants(cuda_like, P: str, acc) -> list:
    """The encoder-backward kernels with ``encode_grad._blocks``'s tiles at d_in 768."""
    b = encode_grad._blocks(cuda_like, 768)
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    dt, w = cuda_like.dtype, b["warps"]
    return [
        (f"encode_grad_transpose {dt}", encode_grad._transpose_kernel,
         {"w_ptr": P, "out_ptr": P, **ints("D0", "DC", "F", "sw0", "sw1")}, dict(BD=b["TD"], BF=b["TF"]), w),
        (f"encode_grad_gather {dt}", encode_grad._gather_kernel,
         {"g_ptr": P, "i_ptr": "*i64", "w_ptr": P, "out_ptr": P,
          **ints("K", "D", "sgn", "sgk", "sin", "sik", "swf", "swd", "son")},
         dict(BK=b["BK"], BD=b["BD"], ACC=tl_dtype(acc)), w),
        (f"encode_grad_weight {dt}", encode_grad._weight_t_kernel,
         {"x_ptr": P, "g_ptr": P, "perm_ptr": "*i64", "bounds_ptr": "*i64", "out_ptr": P,
          **ints("K", "D", "F", "HOT", "sxn", "sxd", "sgn", "sgk")},
         dict(BF=b["WF"], BD=b["WD"], ACC=tl_dtype(acc)), b["wwarps"]),
        (f"encode_grad_weight_hot {dt}", encode_grad._weight_hot_kernel,
         {"x_ptr": P, "g_ptr": P, "perm_ptr": "*i64", "bounds_ptr": "*i64", "out_ptr": P,
          **ints("K", "D", "F", "HOT", "sxn", "sxd", "sgn", "sgk")},
         dict(BE=b["BK"], BD=b["BD"], ACC=tl_dtype(acc)), w),
    ]


def _select_variants() -> list:
    """The select kernels (fp32 blocks whatever the input dtype) with ``encode._plan``'s shapes."""
    cuda_like = type("T", (), {"device": torch.device("cuda"), "dtype": torch.float32, "shape": (1, 1)})()
    out = []
    sel = {"pre_ptr": "*fp32", "bias_ptr": "*fp32", "cand_ptr": "*i64", "cnt_ptr": "*i32", "kth_ptr": "*i64",
           "R": "i32", "NC": "i32", "col0": "i32"}
    for k in (32, 64, 256, 512):
        bc = max(256, encode.next_pow2(2 * k))
        plan = encode._plan(cuda_like, 1 << 20, bc, 16 * bc, None)
        for first in (True, False):
            out.append((f"topk_select k={k} first={first}", _select.topk_select_kernel, sel,
                        dict(FIRST=first, K=k, C=2 * bc, BR=plan.br, BC=bc), plan.warps))
        out.append((f"tighten k={k}", _select.tighten_kernel,
                    {"cand_ptr": "*i64", "cnt_ptr": "*i32", "kth_ptr": "*i64", "R": "i32"},
                    dict(K=k, C=2 * bc, BR=plan.br), plan.warps))
    plan = encode._plan(cuda_like, 1 << 20, 256, 8 * 256, None)
    out.append(("threshold_select", _select.threshold_select_kernel,
                {"pre_ptr": "*fp32", "bias_ptr": "*fp32", "thr_ptr": "*fp32", "val_ptr": "*fp32",
                 "idx_ptr": "*i32", "cnt_ptr": "*i32", "R": "i32", "NC": "i32", "col0": "i32", "C": "i32"},
                dict(BR=plan.br, BC=256), plan.warps))
    return out


REPRESENTATIVE = (
    "topk_gemm torch.bfloat16", "threshold_gemm torch.bfloat16", "topk_select k=64 first=True",
    "tighten k=64", "threshold_select",
    "topk torch.bfloat16 k=64", "topk torch.float32 k=64", "threshold torch.bfloat16 fill=True",
    "threshold torch.float32 fill=False", "fold_bias torch.bfloat16", "decode_fwd torch.bfloat16",
    "decode_bwd_values torch.float32", "decode_bwd_weight torch.bfloat16",
    "encode_grad_transpose torch.bfloat16", "encode_grad_gather torch.float32",
    "encode_grad_weight torch.bfloat16", "encode_grad_weight_hot torch.float32",
)


# x and W_enc rows are contiguous in real launches (Triton makes 1 a constant)
UNIT_STRIDES = ("sxk", "swn", "sw1", "sxd")
ALIGNED_INTS = ("sxm", "swk", "D_IN", "D_SAE", "NC", "R", "N")  # multiples of 16 at the benchmark shapes


def compile_one(fn, sig, constexprs, num_warps, arch: int, realistic: bool = True):
    """Compile as a launch would. ``realistic``: pointers 16-byte aligned, unit strides constant and
    the usual sizes divisible by 16 (Triton specialises these at launch; without them loads are not
    vectorised and the GEMM loop is not pipelined, so registers and code would not be the real ones)."""
    sig, constexprs, attrs = dict(sig), dict(constexprs), {}
    if realistic:
        for name in UNIT_STRIDES:
            if name in sig:
                del sig[name]
                constexprs[name] = 1
        for name, ty in sig.items():
            if ty.startswith("*") or name in ALIGNED_INTS:
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def usage(kernel) -> str:
    """Registers / stack bytes per thread of a compiled kernel (cuobjdump shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        r = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", r.stdout)
    return f"{m.group(1)} regs, {m.group(2)} B stack" if m else "usage unknown"


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for name, fn, sig, ce, w in variants():
        k = compile_one(fn, sig, ce, w, arch)
        print(f"sm_{arch} {name:36s} warps={w} shared={k.metadata.shared} {usage(k)}", flush=True)
