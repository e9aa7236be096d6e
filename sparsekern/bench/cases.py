"""The ops suite's cases: sparsekern against its peers, one builder per op, and the plan of shapes.

Every builder returns :class:`Case` objects whose callables close over ready tensors, so the CLI
suite and the pytest-benchmark files time exactly the same work. Peers that need SAELens get the
*very same* weight tensors (installed as the SAE's parameters) and are marked skipped, not
crashed, when ``sae_lens`` is missing. Inference callables run under ``torch.no_grad()``.

The shared vocabulary (shapes, weights, ``Case``/``Peer``, the SAELens twins) lives in
:mod:`.workload` and is re-exported here; the cuda encoder cases are :mod:`.gpu_plan`'s, the drop-in
API's :mod:`.sae_cases`'s. :func:`build` and :func:`plan` pick among them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, ops
from ..sparse_acts import SparseActs
from . import gpu_plan, sae_cases
from .workload import (
    GEMMA,
    GPT2,
    MEM,
    OPS,
    QUICK_A,
    QUICK_B,
    QUICK_MEM,
    THRESHOLD_L0,
    Case,
    Peer,
    Shape,
    Weights,
    calibrate_threshold,
    dense_diff,
    dtype_name,
    jumprelu_sae,
    make_weights,
    max_diff,
    nograd,
    rng_device,
    sae_lens_missing,
    topk_code,
    topk_sae,
)

__all__ = [
    "CASES_PER_OP", "GEMMA", "GPT2", "MEM", "OPS", "QUICK_A", "QUICK_B", "QUICK_MEM", "THRESHOLD_L0",
    "TOPK_MATMUL_MAX", "TOPK_PEAK_MIB", "Case", "Peer", "Shape", "Weights", "build", "calibrate_threshold",
    "dense_diff", "dtype_name", "feature_topk_case", "jumprelu_sae", "make_weights", "max_diff", "nograd",
    "plan", "rng_device", "sae_lens_missing", "sparse_backward_case", "sparse_decode_cases",
    "threshold_encode_case", "topk_code", "topk_encode_case", "topk_sae",
]

CASES_PER_OP = {"sparse_decode": 2, "sae_forward": 2, "sae_cache": 3}  # cases build() returns (else 1)
TOPK_MATMUL_MAX = 1.10  # topk_encode time <= 1.10x bare matmul
TOPK_PEAK_MIB = 32.0  # topk_encode peak extra memory at N=2048, d_sae=65536


# ---- cases --------------------------------------------------------------------------------
def topk_encode_case(w: Weights, peak_target_mib: Optional[float] = None) -> Case:
    """topk_encode vs bare ``x @ W_enc`` and vs ``sae_lens.TopKSAE.encode`` (same tensors)."""
    s = w.shape
    ours = nograd(lambda: ops.topk_encode(w.x, w.W_enc, w.b_enc, s.k, b_dec=w.b_dec))
    matmul = Peer("matmul", "x @ W_enc (bare matmul)", nograd(lambda: w.x @ w.W_enc),
                  min_ratio=1 / TOPK_MATMUL_MAX, target=f"time <= {TOPK_MATMUL_MAX:.2f}x matmul")
    missing = sae_lens_missing()
    if missing:
        sae = Peer("sae_lens", "sae_lens.TopKSAE.encode", None, skip=missing)
    else:
        model = topk_sae(w)
        sae = Peer("sae_lens", "sae_lens.TopKSAE.encode", nograd(lambda: model.encode(w.x)),
                   check=dense_diff)
    return Case("topk_encode", s, ours, ("topk_encode",), [matmul, sae], peak_target_mib=peak_target_mib)


def threshold_encode_case(w: Weights, l0: float = THRESHOLD_L0) -> Case:
    """threshold_encode (JumpReLU) vs ``sae_lens.JumpReLUSAE.encode``; threshold set for L0≈l0."""
    s = w.shape
    thr = torch.full((s.d_sae,), calibrate_threshold(w, l0), dtype=w.dtype, device=w.device)
    ours_thr = thr.clamp_min(0)  # SAELens: relu(pre) * (pre > thr) == ours with max(thr, 0)
    ours = nograd(lambda: ops.threshold_encode(w.x, w.W_enc, w.b_enc, ours_thr, b_dec=w.b_dec))
    missing = sae_lens_missing()
    if missing:
        peer = Peer("sae_lens", "sae_lens.JumpReLUSAE.encode", None, skip=missing)
    else:
        model = jumprelu_sae(w, thr)
        peer = Peer("sae_lens", "sae_lens.JumpReLUSAE.encode", nograd(lambda: model.encode(w.x)),
                    min_ratio=1.0, target="no slower", check=dense_diff)

    def info(acts: SparseActs) -> dict[str, Any]:
        return {"target_l0": l0, "mean_l0": round(float(acts.l0().float().mean()), 2), "k_max": acts.k}

    return Case("threshold_encode", s, ours, ("threshold_encode",), [peer], info_fn=info)


def sparse_decode_cases(w: Weights) -> list[Case]:
    """sparse_decode vs ``F.embedding_bag`` (no bias) and, with b_dec, vs SAELens dense decode."""
    s = w.shape
    v, i, dense = topk_code(w)
    bag = Peer(
        "embedding_bag", "F.embedding_bag(mode='sum')",
        nograd(lambda: F.embedding_bag(i, w.W_dec, per_sample_weights=v, mode="sum")),
        min_ratio=1.5, target=">= 1.5x faster", check=max_diff,
    )
    plain = Case("sparse_decode", s, nograd(lambda: ops.sparse_decode(v, i, w.W_dec)),
                 ("sparse_decode",), [bag])
    missing = sae_lens_missing()
    if missing:
        sae = Peer("sae_lens", "sae_lens.TopKSAE.decode (dense code)", None, skip=missing)
    else:
        model = topk_sae(w)
        sae = Peer("sae_lens", "sae_lens.TopKSAE.decode (dense code)", nograd(lambda: model.decode(dense)),
                   min_ratio=80.0, target=">= 80x faster", check=max_diff)
    biased = Case("sparse_decode", s, nograd(lambda: ops.sparse_decode(v, i, w.W_dec, w.b_dec)),
                  ("sparse_decode",), [sae], variant="+b_dec")
    return [plain, biased]


def sparse_backward_case(w: Weights) -> Case:
    """Training step: sparse_decode fwd+bwd (grads of values, W_dec) vs dense ``code @ W_dec``."""
    s = w.shape
    v, i, dense = topk_code(w)
    grad_out = torch.randn(s.n, s.d_in, generator=torch.Generator().manual_seed(1)).to(w.x)
    W = w.W_dec.detach().requires_grad_(True)
    vals = v.detach().requires_grad_(True)
    code = dense.detach().requires_grad_(True)

    def ours() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            out = ops.sparse_decode(vals, i, W)
            return torch.autograd.grad(out, (vals, W), grad_out)

    def dense_step() -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            out = code @ W
            return torch.autograd.grad(out, (code, W), grad_out)

    def check(o: tuple[Tensor, Tensor], p: tuple[Tensor, Tensor]) -> float:
        return max(max_diff(o[0], p[0].gather(1, i)), max_diff(o[1], p[1]))

    peer = Peer("dense_autograd", "dense_code @ W_dec (autograd)", dense_step, check=check)
    backend_ops = ("sparse_decode", "sparse_decode_backward_values", "sparse_decode_backward_weight")
    return Case("sparse_decode_backward", s, ours, backend_ops, [peer])


def feature_topk_case(w: Weights) -> Case:
    """One streaming top-examples step: merge an ``[n, k]`` top-k code into a full per-feature
    top-k state (k examples per feature) vs the reference and vs a dense ``torch.topk`` over
    ``[d_sae, k + n]`` (state next to the batch's dense code, transposed)."""
    s = w.shape
    v, i, _ = topk_code(w)
    n, kx, d_sae = s.n, s.k, s.d_sae
    g = torch.Generator().manual_seed(2)
    loc = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.int64)], 1).to(w.device)
    # steady state: a state filled by earlier (rescaled, tie-free) batches at other locations;
    # 16 batches give each feature ~16 * n * k / d_sae candidates (43 at gpt2-small > k = 32)
    state0 = ops.FeatureTopKState.empty(d_sae, kx, device=w.device)
    with torch.no_grad():
        for b in range(1, 17):
            old = (v.float() * (0.5 + torch.rand(v.shape, generator=g)).to(v.device)).contiguous()
            state0 = ops.feature_topk_update(state0, SparseActs(old, i), loc + torch.tensor([b * n, 0], device=w.device),
                                             inplace=True)
    acts = SparseActs(v.float().contiguous(), i)
    ours = nograd(lambda: ops.feature_topk_update(state0, acts, loc))

    def dense_topk() -> ops.FeatureTopKState:
        dense = torch.zeros(n, d_sae, dtype=torch.float32, device=w.device)
        dense.scatter_(1, i, acts.values)
        cand = torch.where(dense > 0, dense, -math.inf).t()  # [d_sae, n]
        vals, idx = torch.cat([state0.values, cand], 1).topk(kx, dim=1)
        from_state = (idx < kx)[..., None]
        sloc = state0.locations.gather(1, idx.clamp(max=kx - 1)[..., None].expand(-1, -1, 2))
        locs = torch.where(from_state, sloc, loc[(idx - kx).clamp(min=0)])
        return ops.FeatureTopKState(vals, torch.where((vals == -math.inf)[..., None], -1, locs))

    def check(o: ops.FeatureTopKState, p: ops.FeatureTopKState) -> float:
        if not (torch.equal(o.locations, p.locations) and torch.equal(o.values == -math.inf, p.values == -math.inf)):
            return math.inf
        f = o.values > -math.inf
        return max_diff(o.values[f], p.values[f])

    def ref_step() -> ops.FeatureTopKState:
        with backends.use_backend("ref"):
            return ops.feature_topk_update(state0, acts, loc)

    peers = [Peer("ref", "sparsekern reference (torch sort)", nograd(ref_step), check=check),
             Peer("dense_topk", "dense torch.topk over [d_sae, k + n]", nograd(dense_topk), check=check)]
    filled = float((state0.locations[..., 0] >= 0).float().mean())
    return Case("feature_topk_update", s, ours, ("feature_topk_update",), peers,
                info={"examples_per_feature": kx, "code_k": kx, "rows": n, "state_filled": round(filled, 3)})


def build(op: str, w: Weights, *, peak_target_mib: Optional[float] = None) -> list[Case]:
    """Cases for ``op`` (one of :data:`OPS`) at ``w``'s shape (the encoders on cuda: one per strategy)."""
    if op in gpu_plan.ENCODER_OPS and w.device.type == "cuda":
        if op == "topk_encode":
            return gpu_plan.topk_encode_cases(w, peak_target_mib)
        return gpu_plan.threshold_encode_cases(w, min(THRESHOLD_L0, w.shape.d_sae // 32), peak_target_mib)
    if op == "topk_encode":
        return [topk_encode_case(w, peak_target_mib)]
    if op == "threshold_encode":
        return [threshold_encode_case(w, min(THRESHOLD_L0, w.shape.d_sae // 32))]
    if op == "sparse_decode":
        return sparse_decode_cases(w)
    if op == "sparse_decode_backward":
        return [sparse_backward_case(w)]
    if op == "feature_topk_update":
        return [feature_topk_case(w)]
    if op in sae_cases.BUILDERS:
        return sae_cases.BUILDERS[op](w, w.shape.name.startswith("quick"))
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def plan(quick: bool, device: str | torch.device = "cpu"
         ) -> list[tuple[Shape, tuple[str, ...], Optional[float]]]:
    """The default suite as (shape, ops at that shape, encoder peak target), grouped by shape.

    On cuda (not quick) the encoders run at :data:`gpu_plan.ENCODER_SHAPES` instead.
    """
    if torch.device(device).type == "cuda" and not quick:
        return gpu_plan.gpu_plan()
    a, b, mem = (QUICK_A, QUICK_B, QUICK_MEM) if quick else (GPT2, GEMMA, MEM)
    return [
        (a, OPS, None),
        (b, ("topk_encode", "threshold_encode", "sparse_decode"), None),
        (mem, ("topk_encode",), TOPK_PEAK_MIB),
    ]
