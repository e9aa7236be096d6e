"""CUDA encoder plan (issue 10): shapes, limits, per-feature JumpReLU thresholds, one case per strategy.

On cuda (not ``--quick``) ``topk_encode`` and ``threshold_encode`` run at the four :data:`ENCODER_SHAPES`
against the bare ``x @ W_enc`` at the same dtype and against ``sae_lens``'s ``encode``. Every encoder
strategy in :data:`ENCODE_STRATEGIES` is timed as its own variant (``[blocks]``, ...) in the same run, by
setting ``SPARSEKERN_ENCODE_STRATEGY`` around each call. The other ops keep the CPU plan's shapes.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..sparse_acts import SparseActs
from . import workload as wl

ENCODER_OPS = ("topk_encode", "threshold_encode")
STRATEGY_ENV = "SPARSEKERN_ENCODE_STRATEGY"  # read on every call by the Triton encoders
ENCODE_STRATEGIES = ("auto", "blocks", "fused", "tiles")  # one timed variant each on cuda

GPT2_N16K = wl.Shape("gpt2-small-n16384", d_in=768, d_sae=24576, n=16384, k=32)
GEMMA_N4K = wl.Shape("gemma-2-2b-n4096", d_in=2304, d_sae=65536, n=4096, k=64)
WIDE_1M = wl.Shape("2304x1m-n4096", d_in=2304, d_sae=2**20, n=4096, k=64)
ENCODER_SHAPES = (wl.GPT2, GPT2_N16K, GEMMA_N4K, WIDE_1M)  # wl.GPT2 is 768 x 24576, N 2048, k 32

PEAK_MIB = 512.0  # sparsekern's peak extra memory at every encoder shape ...
PEAK_MIB_WIDE = 1024.0  # ... except N >= 4096 rows into 2^20 features
SAE_LENS_MIN_RATIO = {(GEMMA_N4K.name, torch.bfloat16): 2.5}  # sae_lens >= 2.5x slower; elsewhere reported
SAE_LENS_DENSE_COPIES = 6  # dense [N, d_sae] tensors sae_lens's encode (+ check) holds at once, + margin
MATMUL_TARGET = "time <= {:.2f}x matmul"  # sparsekern/bench/targets.py parses this

CALIBRATION_ROWS = 16384  # rows the JumpReLU thresholds see: the whole batch at every cuda shape
CALIBRATION_ELEMS = 2**24  # [rows, features] block per step: 64 MiB in fp32, never [N, d_sae]


# ---- plan and targets ---------------------------------------------------------------------
def peak_target_mib(shape: wl.Shape) -> float:
    return PEAK_MIB_WIDE if shape.n >= 4096 and shape.d_sae >= 2**20 else PEAK_MIB


def gpu_encoder_plan() -> list[tuple[wl.Shape, float]]:
    """(shape, sparsekern peak target MiB) for the encoders on cuda."""
    return [(s, peak_target_mib(s)) for s in ENCODER_SHAPES]


def gpu_plan() -> list[tuple[wl.Shape, tuple[str, ...], Optional[float]]]:
    """The cuda suite: the encoder shapes, plus the CPU plan's other ops where they ran before."""
    rest = tuple(op for op in wl.OPS if op not in ENCODER_OPS)
    enc = gpu_encoder_plan()
    assert enc[0][0] == wl.GPT2  # its shape hosts every other op too, as in the CPU plan
    return [
        (wl.GPT2, ENCODER_OPS + rest, enc[0][1]),
        (wl.GEMMA, ("sparse_decode",), None),
        *[(s, ENCODER_OPS, peak) for s, peak in enc[1:]],
    ]


def matmul_limit(n: int, dtype: torch.dtype) -> float:
    """Largest allowed encoder time as a multiple of the bare matmul's at the same dtype."""
    if n < 4096:
        return 2.0
    return 1.15 if dtype == torch.float32 else 1.3


def sae_lens_min_ratio(shape: wl.Shape, dtype: torch.dtype) -> Optional[float]:
    return SAE_LENS_MIN_RATIO.get((shape.name, dtype))


def free_cuda_bytes(device: torch.device) -> int:
    """Bytes a new allocation can get: free on the device plus what torch's cache holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def dense_peer_skip(shape: wl.Shape, dtype: torch.dtype, free_bytes: float) -> Optional[str]:
    """Why sae_lens (dense ``[N, d_sae]`` pre-activations) cannot run in ``free_bytes``, or None."""
    dense = shape.n * shape.d_sae * torch.empty((), dtype=dtype).element_size()
    need = SAE_LENS_DENSE_COPIES * dense
    if free_bytes >= need:
        return None
    gib = 2.0**30
    return (f"sae_lens skipped: it builds dense [{shape.n}, {shape.d_sae}] tensors "
            f"({dense / gib:.1f} GiB each in {wl.dtype_name(dtype)}, ~{need / gib:.0f} GiB at peak) "
            f"and only {free_bytes / gib:.1f} GiB of GPU memory is free")


# ---- per-feature JumpReLU thresholds ------------------------------------------------------
def feature_chunk(rows: int, d_sae: int, max_elems: int = CALIBRATION_ELEMS) -> int:
    """Features per calibration step so that one ``[rows, chunk]`` block stays within ``max_elems``."""
    return max(1, min(d_sae, max_elems // max(rows, 1)))


def per_feature_thresholds(w: wl.Weights, l0: float, rows: int = CALIBRATION_ROWS,
                           max_elems: int = CALIBRATION_ELEMS) -> Tensor:
    """fp32 ``[d_sae]`` thresholds with which a row fires ``l0`` features on average (SAELens ``pre > t``).

    Feature f fires with probability ``l0 / d_sae``: ``t_f = mean_f + std_f * z``, with mean/std of f's
    pre-activations over the first ``rows`` rows and ``z`` the standardized pre-activations' pooled
    ``1 - l0 / d_sae`` quantile. Pooling is what makes tails as thin as 64 / 2^20 estimable: there a
    feature fires ~0.25 times in 4096 rows, so its own empirical quantile would just be its maximum.
    On the calibration rows the mean L0 is ``l0`` (up to ties); on unseen rows the error of each std
    biases it up (+14% at 2^18 features from 1024 rows), hence the whole batch by default. Runs over
    feature chunks of :func:`feature_chunk`, so it never builds ``[N, d_sae]``.
    """
    r = min(rows, w.shape.n)
    if r < 2:
        raise ValueError(f"per_feature_thresholds needs >= 2 rows, got {r}")
    d_sae = w.shape.d_sae
    m = max(1, min(round(l0 * r), r * d_sae - 1))  # exceedances wanted over the whole [r, d_sae] sample
    step = feature_chunk(r, d_sae, max_elems)
    mean = torch.empty(d_sae, device=w.device)
    std = torch.empty(d_sae, device=w.device)
    top = torch.empty(0, device=w.device)  # the m + 1 largest standardized values so far
    with torch.no_grad():
        xs = (w.x[:r] - w.b_dec).float()
        for f0 in range(0, d_sae, step):
            f1 = min(f0 + step, d_sae)
            pre = xs @ w.W_enc[:, f0:f1].float() + w.b_enc[f0:f1].float()  # [r, chunk]
            mu, sd = pre.mean(0), pre.std(0).clamp_min(1e-12)
            mean[f0:f1], std[f0:f1] = mu, sd
            z = ((pre - mu) / sd).flatten()
            del pre
            cand = torch.cat([top, z.topk(min(m + 1, z.numel())).values])
            top = cand.topk(min(m + 1, cand.numel())).values
            del z, cand
        z_q = (top[m - 1] + top[m]) / 2  # exactly m standardized sample values lie above it
    return mean + std * z_q


# ---- cases --------------------------------------------------------------------------------
def with_strategy(fn: Callable[[], Any], strategy: str) -> Callable[[], Any]:
    """``fn`` with ``SPARSEKERN_ENCODE_STRATEGY=strategy`` for the duration of each call (then restored)."""

    @functools.wraps(fn)
    def run() -> Any:
        old = os.environ.get(STRATEGY_ENV)
        os.environ[STRATEGY_ENV] = strategy
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(STRATEGY_ENV, None)
            else:
                os.environ[STRATEGY_ENV] = old

    return run


def _matmul_peer(w: wl.Weights) -> wl.Peer:
    limit = matmul_limit(w.shape.n, w.dtype)
    return wl.Peer("matmul", "x @ W_enc (bare matmul)", wl.nograd(lambda: w.x @ w.W_enc),
                  min_ratio=1 / limit, target=MATMUL_TARGET.format(limit))


def _sae_lens_peer(w: wl.Weights, name: str, make: Callable[[], Any], free_bytes: Optional[float]) -> wl.Peer:
    """sae_lens's encode, skipped when sae_lens is missing or its dense tensors would not fit."""
    if free_bytes is None:
        free_bytes = free_cuda_bytes(w.device) if w.device.type == "cuda" else float("inf")
    skip = wl.sae_lens_missing() or dense_peer_skip(w.shape, w.dtype, free_bytes)
    if skip:
        return wl.Peer("sae_lens", name, None, skip=skip)
    model = make()
    ratio = sae_lens_min_ratio(w.shape, w.dtype)
    return wl.Peer("sae_lens", name, wl.nograd(lambda: model.encode(w.x)), min_ratio=ratio,
                  target=None if ratio is None else f">= {ratio:g}x faster", check=wl.dense_diff)


def _per_strategy(op: str, w: wl.Weights, ours: Callable[[], Any], peers: list[wl.Peer], peak: float,
                  strategies: tuple[str, ...], info: dict[str, Any],
                  info_fn: Optional[Callable[[Any], dict[str, Any]]] = None) -> list[wl.Case]:
    return [wl.Case(op, w.shape, wl.nograd(with_strategy(ours, s)), (op,), peers, variant=f"[{s}]",
                   peak_target_mib=peak, info={**info, "strategy": s}, info_fn=info_fn)
            for s in strategies]


def topk_encode_cases(w: wl.Weights, peak: Optional[float] = None,
                      strategies: tuple[str, ...] = ENCODE_STRATEGIES,
                      free_bytes: Optional[float] = None) -> list[wl.Case]:
    """topk_encode vs bare matmul and ``sae_lens.TopKSAE.encode``, one case per encoder strategy."""
    s = w.shape
    peers = [_matmul_peer(w), _sae_lens_peer(w, "sae_lens.TopKSAE.encode", lambda: wl.topk_sae(w), free_bytes)]

    def ours() -> SparseActs:
        return ops.topk_encode(w.x, w.W_enc, w.b_enc, s.k, b_dec=w.b_dec)

    return _per_strategy("topk_encode", w, ours, peers, peak or peak_target_mib(s), strategies, {})


def threshold_encode_cases(w: wl.Weights, l0: float = wl.THRESHOLD_L0, peak: Optional[float] = None,
                           strategies: tuple[str, ...] = ENCODE_STRATEGIES,
                           free_bytes: Optional[float] = None) -> list[wl.Case]:
    """threshold_encode with per-feature thresholds (L0 ≈ l0) vs bare matmul and ``JumpReLUSAE.encode``."""
    thr = per_feature_thresholds(w, l0).to(w.dtype)
    ours_thr = thr.clamp_min(0)  # SAELens: relu(pre) * (pre > thr) == ours with max(thr, 0)
    peers = [_matmul_peer(w),
             _sae_lens_peer(w, "sae_lens.JumpReLUSAE.encode", lambda: wl.jumprelu_sae(w, thr), free_bytes)]

    def ours() -> SparseActs:
        return ops.threshold_encode(w.x, w.W_enc, w.b_enc, ours_thr, b_dec=w.b_dec)

    def info(acts: SparseActs) -> dict[str, Any]:
        return {"mean_l0": round(float(acts.l0().float().mean()), 2), "k_max": acts.k}

    facts = {"target_l0": l0, "thresholds": "per-feature",
             "calibration_rows": min(CALIBRATION_ROWS, w.shape.n)}
    return _per_strategy("threshold_encode", w, ours, peers, peak or peak_target_mib(w.shape), strategies,
                         facts, info)
