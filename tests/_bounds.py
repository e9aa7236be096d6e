"""Worst-case rounding-error bounds that the kernel tests derive their tolerances from.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-3): every floating-point
operation rounds to nearest, ``fl(a op b) = (a op b)(1 + d)`` with ``|d| <= u``, the unit roundoff of
its dtype (``U``). A sum of ``n`` terms, or a dot product of length ``n``, evaluated in ANY order
(sequential, blocked, pairwise, SIMD lanes of any width, split-K, with or without FMA) satisfies
``|fl(s) - s| <= gamma(n) * sum_i |term_i|`` with ``gamma(n) = n u / (1 - n u)``.

So a bound below depends on the data only, never on which kernel, CPU (AVX2 or AVX-512, whatever GEMM
MKL picks) or GPU did the arithmetic: a test that passes with it passes on every machine. Every bound
is computed in float64 from the test's own inputs (the same low-precision values the kernels see). It
assumes true fp32 arithmetic, i.e. torch's default ``float32_matmul_precision("highest")`` (no TF32 or
bf16x3 GEMMs), which the test suite never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# unit roundoff u = 2^-p of round-to-nearest with p significand bits (implicit bit included)
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every backend (DEVELOPERS.md): float64 stays, the rest use fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error of an n-term sum or dot product."""
    nu = n * U[dtype]
    assert nu < 0.5, (n, dtype)
    return nu / (1 - nu)


def encoder_err(x: Tensor, W: Tensor, b: Tensor, b_dec: Tensor | None) -> Tensor:
    """Per-element bound ``[..., d_sae]`` on |computed pre - exact pre| for pre = (x - b_dec) @ W + b.

    ``gamma(d_in + 2) * ((|x| + |b_dec|) @ |W| + |b|)`` in the accumulation dtype covers both forms the
    backends evaluate: centring first (one rounding of x - b_dec per term, then d_in products and sums
    and the bias add) and folding b_dec into the bias (x @ W + (b - b_dec @ W): two dots and two adds).
    """
    dt = acc(x.dtype)
    a = x.double().abs()
    if b_dec is not None:
        a = a + b_dec.double().abs()
    return gamma(x.shape[-1] + 2, dt) * (a @ W.double().abs() + b.double().abs())


def decoder_err(values: Tensor, indices: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """Per-element bound ``[..., d]`` on |computed - exact| for sum_j values_j * W[indices_j] (+ b).

    k products and k - 1 adds, plus the bias add: gamma(k + 1) times the sum of the absolute terms.
    """
    dt = acc(W.dtype)
    k, d = values.shape[-1], W.shape[-1]
    if values.numel():  # embedding_bag: no [N, k, d] temporary at realistic sizes
        terms = F.embedding_bag(
            indices.reshape(-1, k), W.double().abs(), per_sample_weights=values.double().abs().reshape(-1, k),
            mode="sum").reshape(*values.shape[:-1], d)
    else:
        terms = torch.zeros(*values.shape[:-1], d, dtype=torch.float64, device=W.device)
    if b is not None:
        terms = terms + b.double().abs()
    return gamma(k + 1, dt) * terms


def rel(err: Tensor, exact: Tensor) -> float:
    """A per-element bound in ``conftest.rel_err``'s units (max |error| / max |exact|)."""
    if exact.numel() == 0:
        return 0.0
    return float(err.double().max() / exact.double().abs().max().clamp_min(1e-30))


def rounded(dtype: torch.dtype, floor: float) -> float:
    """rel_err bound of a value accumulated to within ``floor`` (rel_err units) and then stored in
    ``dtype``: |fl(y + d) - y| <= |d| + u |y + d|, so max error / max |y| <= u + (1 + u) floor."""
    u = U[dtype] if dtype != torch.float64 else 0.0
    return u + (1 + u) * floor


def assert_topk_decided(pre: Tensor, err: Tensor, k: int) -> None:
    """Precondition of an exact top-k index comparison: in every row the k+1 largest exact
    pre-activations are further apart than twice the row's largest rounding bound, so every
    backend's (value desc, index asc) top-k set and order equal the exact one on any machine."""
    pre, err = pre.double().reshape(-1, pre.shape[-1]), err.double().reshape(-1, pre.shape[-1])
    if pre.numel() == 0:
        return
    top = pre.sort(-1, descending=True).values[:, : k + 1]
    gaps = top[:, :-1] - top[:, 1:]
    slack = 2 * err.amax(-1, keepdim=True)
    assert bool((gaps > slack).all()), (
        f"test data not decided: a gap of {float(gaps.min()):.3g} among the top {k + 1} is within "
        f"twice the rounding bound {float(slack.max()):.3g}; pick data whose top-k is decided"
    )


def topk_decided(pre: Tensor, err: Tensor, k: int) -> bool:
    """``assert_topk_decided`` as a predicate (for hypothesis's ``assume``)."""
    try:
        assert_topk_decided(pre, err, k)
    except AssertionError:
        return False
    return True


def assert_threshold_decided(pre: Tensor, threshold: Tensor | float, err: Tensor, dtype: torch.dtype) -> None:
    """Precondition of an exact support comparison for ``pre > threshold``: no exact pre-activation
    lies within its rounding bound of the threshold, so every backend fires exactly where the exact
    computation does. The threshold itself is stored in the accumulation dtype of ``dtype`` (a float
    0.6 becomes fp32 0.6000000238): its rounding, u |threshold|, is added to the slack."""
    thr = torch.as_tensor(threshold, dtype=torch.float64)
    gap = (pre.double() - thr).abs()
    slack = err.double() + U[acc(dtype)] * thr.abs()
    assert bool((gap > slack).all()), (
        f"test data not decided: a pre-activation lies {float((slack - gap).max()):.3g} inside its "
        "rounding bound of the threshold; pick data whose support is decided"
    )


def threshold_decided(pre: Tensor, threshold: Tensor | float, err: Tensor, dtype: torch.dtype) -> bool:
    """``assert_threshold_decided`` as a predicate (for hypothesis's ``assume``)."""
    try:
        assert_threshold_decided(pre, threshold, err, dtype)
    except AssertionError:
        return False
    return True
