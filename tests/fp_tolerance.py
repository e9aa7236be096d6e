"""How far two correct implementations of the same float sum may differ: the model behind the tolerances of
the SAE tests against sae_lens (each test file cites it beside its constants).

A value compared is a sum of ``n`` products ``t_i`` (an encoder pre-activation: ``n = d_in + 1`` with the
bias; a decoder output: ``n`` = active features + 1), computed by each side in its own order (MKL's blocked
SIMD GEMM in SAELens; the sparse kernels or the reference backend here). Each side's error is
``sum_k delta_k S_k`` with ``|delta_k| <= u`` (``u = eps / 2``) and ``S_k`` the partial sums (plus one
rounding per product). Worst case (Higham, *Accuracy and Stability*, Thm 3.1): ``gamma_n * sum |t_i|``,
reached only when every rounding goes the same way. Modelling the roundings as independent and zero-mean,
each uniform on ``[-u, u]`` (variance ``u^2 / 3``; Higham & Mary, SIAM J. Sci. Comput. 2019), and using that
for ANY summation order ``E[S_k^2] <= ||t||_2^2`` when the terms' signs are independent of the order, each
side's error has standard deviation at most ``u * sqrt(n / 3) * ||t||_2``, and the difference of two sides
``sqrt(2)`` times that: :func:`sum_sigma`. A tolerance of 5 to 6 such sigmas at the worst element holds on any
machine (any kernel order); ``rtol`` only adds room for large values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sum_sigma(a: Tensor, W: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard deviation of the difference of two implementations of ``a @ W (+ bias)`` in ``dtype``,
    elementwise ``[..., W.shape[1]]``: ``sqrt(2) * u * sqrt(n / 3) * ||t||_2`` with ``t = a_i W_ij`` and ``n``
    the nonzero terms of the row plus the bias."""
    u = torch.finfo(dtype).eps / 2
    a64, W64 = a.detach().double(), W.detach().double()
    l2 = ((a64**2) @ (W64**2)).sqrt()
    n = (a64 != 0).sum(-1, keepdim=True) + 1
    return math.sqrt(2) * u * (n / 3).sqrt() * l2
