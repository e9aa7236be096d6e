"""Benchmark case builders: seeded random SAE weights and inputs, sparsekern vs its peers.

Every builder returns :class:`Case` objects whose callables close over ready tensors, so the CLI
suite and the pytest-benchmark files time exactly the same work. Peers that need SAELens get the
*very same* weight tensors (installed as the SAE's parameters) and are marked skipped, not
crashed, when ``sae_lens`` is missing. Inference callables run under ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..sparse_acts import SparseActs

OPS = ("topk_encode", "threshold_encode", "sparse_decode", "sparse_decode_backward", "sae_forward",
       "sae_cache", "feature_topk_update")
CASES_PER_OP = {"sparse_decode": 2, "sae_forward": 2, "sae_cache": 3}
TOPK_MATMUL_MAX = 1.10  # topk_encode time <= 1.10x bare matmul
TOPK_PEAK_MIB = 32.0  # topk_encode peak extra memory at N=2048, d_sae=65536
THRESHOLD_L0 = 64


@dataclass(frozen=True)
class Shape:
    """One SAE problem size: N rows of d_in -> d_sae features, k kept per row (top-k)."""

    name: str
    d_in: int
    d_sae: int
    n: int
    k: int

    def dims(self) -> dict[str, int]:
        return {"n": self.n, "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k}


GPT2 = Shape("gpt2-small", d_in=768, d_sae=24576, n=2048, k=32)
GEMMA = Shape("gemma-2-2b", d_in=2304, d_sae=65536, n=512, k=64)
MEM = Shape("gpt2-65k", d_in=768, d_sae=65536, n=2048, k=32)  # the peak-memory target shape
QUICK_A = Shape("quick-a", d_in=64, d_sae=2048, n=128, k=16)
QUICK_B = Shape("quick-b", d_in=96, d_sae=4096, n=64, k=32)
QUICK_MEM = Shape("quick-mem", d_in=64, d_sae=8192, n=256, k=16)


@dataclass
class Peer:
    """A competitor for one case: ``ratio = peer_ms / sparsekern_ms`` must reach ``min_ratio``."""

    key: str  # short id (pytest parametrize id)
    name: str
    fn: Optional[Callable[[], Any]]
    min_ratio: Optional[float] = None
    target: Optional[str] = None  # human-readable target
    skip: Optional[str] = None  # why the peer cannot run here
    check: Optional[Callable[[Any, Any], float]] = None  # (ours_out, peer_out) -> max |diff|


@dataclass
class Case:
    """sparsekern's callable for one op/shape plus the peers it is compared with."""

    op: str
    shape: Shape
    ours: Callable[[], Any]
    backend_ops: tuple[str, ...]  # registry op names whose selected backend is reported
    peers: list[Peer]
    variant: str = ""
    peak_target_mib: Optional[float] = None  # bound on sparsekern's peak extra memory
    info: dict[str, Any] = field(default_factory=dict)
    info_fn: Optional[Callable[[Any], dict[str, Any]]] = None  # facts read off ours' output

    def peer(self, key: str) -> Peer:
        for p in self.peers:
            if p.key == key:
                return p
        raise KeyError(f"{self.op} has no peer {key!r}; peers: {[p.key for p in self.peers]}")


@dataclass
class Weights:
    """Random SAE parameters and an input batch for one shape (shared by all ops at it)."""

    shape: Shape
    x: Tensor  # [n, d_in]
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    cache: dict[str, Any] = field(default_factory=dict)  # derived tensors / SAE objects

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def rng_device(device: str | torch.device) -> torch.device:
    """Where :func:`make_weights` draws: on the GPU itself for cuda (2304 x 2^20 on a CPU takes
    minutes), on the CPU otherwise (so CPU and MPS see the same numbers)."""
    dev = torch.device(device)
    return dev if dev.type == "cuda" else torch.device("cpu")


def make_weights(shape: Shape, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> Weights:
    """Seeded weights, drawn in fp32 on :func:`rng_device` (so both dtypes see the same numbers)."""
    gen_dev = rng_device(device)
    g = torch.Generator(device=gen_dev).manual_seed(seed)

    def rnd(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=g, device=gen_dev) * scale).to(device=device, dtype=dtype)

    s = shape
    return Weights(
        shape=s,
        x=rnd(s.n, s.d_in),
        W_enc=rnd(s.d_in, s.d_sae, scale=1 / math.sqrt(s.d_in)),
        b_enc=rnd(s.d_sae, scale=0.1),
        W_dec=rnd(s.d_sae, s.d_in, scale=1 / math.sqrt(s.d_in)),
        b_dec=rnd(s.d_in, scale=0.1),
    )


# ---- helpers ------------------------------------------------------------------------------
def sae_lens_missing() -> Optional[str]:
    """None if ``sae_lens`` imports, else the reason to print."""
    try:
        import sae_lens  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"sae_lens not installed ({type(e).__name__}: {e}); SAELens peer skipped"
    return None


def _nograd(fn: Callable[[], Any]) -> Callable[[], Any]:
    @functools.wraps(fn)
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _install(sae: nn.Module, w: Weights, **extra: Tensor) -> nn.Module:
    """Put ``w``'s very tensors in as the SAE's parameters (no copy, no grad)."""
    for name, t in dict(W_enc=w.W_enc, b_enc=w.b_enc, W_dec=w.W_dec, b_dec=w.b_dec, **extra).items():
        setattr(sae, name, nn.Parameter(t, requires_grad=False))
    sae.device = w.device
    sae.cfg.device = str(w.device)
    return sae


def topk_sae(w: Weights) -> nn.Module:
    """``sae_lens.TopKSAE`` built on the meta device (skips its random init) holding ``w``."""
    if "topk_sae" not in w.cache:
        from sae_lens import TopKSAE, TopKSAEConfig

        s = w.shape
        cfg = TopKSAEConfig(d_in=s.d_in, d_sae=s.d_sae, k=s.k, dtype=_dtype_name(w.dtype), device="meta")
        w.cache["topk_sae"] = _install(TopKSAE(cfg), w)
    return w.cache["topk_sae"]


def jumprelu_sae(w: Weights, threshold: Tensor) -> nn.Module:
    """``sae_lens.JumpReLUSAE`` holding ``w`` and a ``[d_sae]`` threshold."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    s = w.shape
    cfg = JumpReLUSAEConfig(d_in=s.d_in, d_sae=s.d_sae, dtype=_dtype_name(w.dtype), device="meta")
    return _install(JumpReLUSAE(cfg), w, threshold=threshold)


def topk_code(w: Weights) -> tuple[Tensor, Tensor, Tensor]:
    """(values [n,k], indices [n,k], dense [n,d_sae]): SAELens TopKSAE.encode's code for ``w.x``.

    Computed with plain torch exactly as ``TopKSAE.encode`` does (b_dec-centred matmul, top-k,
    ReLU, scatter into zeros), so it exists without sae_lens too.
    """
    if "code" not in w.cache:
        with torch.no_grad():
            pre = (w.x - w.b_dec) @ w.W_enc + w.b_enc
            v, i = pre.topk(w.shape.k, dim=-1, sorted=False)
            del pre
            v = v.relu()
            dense = torch.zeros(w.shape.n, w.shape.d_sae, dtype=w.dtype, device=w.device)
            dense.scatter_(-1, i, v)
        w.cache["code"] = (v.contiguous(), i.contiguous(), dense)
    return w.cache["code"]


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _dense_diff(ours: SparseActs, dense: Tensor, max_elems: int = 2**24) -> float:
    """max |ours - dense| a block of rows at a time (a whole fp32 copy at 2^20 features is 16 GiB)."""
    d_sae = dense.shape[-1]
    dense = dense.reshape(-1, d_sae)
    ov, oi = ours.values.reshape(dense.shape[0], ours.k), ours.indices.reshape(dense.shape[0], ours.k)
    step = max(1, max_elems // d_sae)
    diffs = [_max_diff(SparseActs(ov[r:r + step], oi[r:r + step]).to_dense(d_sae), dense[r:r + step])
             for r in range(0, dense.shape[0], step)]
    return max(diffs, default=0.0)


def calibrate_threshold(w: Weights, l0: float, rows: int = 256) -> float:
    """Scalar threshold so that about ``l0`` pre-activations per row exceed it (first rows)."""
    with torch.no_grad():
        pre = ((w.x[:rows] - w.b_dec) @ w.W_enc + w.b_enc).float().flatten()
    keep = max(1, min(pre.numel() - 1, round(l0 * pre.numel() / w.shape.d_sae)))
    return max(0.0, float(pre.kthvalue(pre.numel() - keep).values))


# ---- cases --------------------------------------------------------------------------------
def topk_encode_case(w: Weights, peak_target_mib: Optional[float] = None) -> Case:
    """topk_encode vs bare ``x @ W_enc`` and vs ``sae_lens.TopKSAE.encode`` (same tensors)."""
    s = w.shape
    ours = _nograd(lambda: ops.topk_encode(w.x, w.W_enc, w.b_enc, s.k, b_dec=w.b_dec))
    matmul = Peer("matmul", "x @ W_enc (bare matmul)", _nograd(lambda: w.x @ w.W_enc),
                  min_ratio=1 / TOPK_MATMUL_MAX, target=f"time <= {TOPK_MATMUL_MAX:.2f}x matmul")
    missing = sae_lens_missing()
    if missing:
        sae = Peer("sae_lens", "sae_lens.TopKSAE.encode", None, skip=missing)
    else:
        model = topk_sae(w)
        sae = Peer("sae_lens", "sae_lens.TopKSAE.encode", _nograd(lambda: model.encode(w.x)),
                   check=_dense_diff)
    return Case("topk_encode", s, ours, ("topk_encode",), [matmul, sae], peak_target_mib=peak_target_mib)


def threshold_encode_case(w: Weights, l0: float = THRESHOLD_L0) -> Case:
    """threshold_encode (JumpReLU) vs ``sae_lens.JumpReLUSAE.encode``; threshold set for L0≈l0."""
    s = w.shape
    thr = torch.full((s.d_sae,), calibrate_threshold(w, l0), dtype=w.dtype, device=w.device)
    ours_thr = thr.clamp_min(0)  # SAELens: relu(pre) * (pre > thr) == ours with max(thr, 0)
    ours = _nograd(lambda: ops.threshold_encode(w.x, w.W_enc, w.b_enc, ours_thr, b_dec=w.b_dec))
    missing = sae_lens_missing()
    if missing:
        peer = Peer("sae_lens", "sae_lens.JumpReLUSAE.encode", None, skip=missing)
    else:
        model = jumprelu_sae(w, thr)
        peer = Peer("sae_lens", "sae_lens.JumpReLUSAE.encode", _nograd(lambda: model.encode(w.x)),
                    min_ratio=1.0, target="no slower", check=_dense_diff)

    def info(acts: SparseActs) -> dict[str, Any]:
        return {"target_l0": l0, "mean_l0": round(float(acts.l0().float().mean()), 2), "k_max": acts.k}

    return Case("threshold_encode", s, ours, ("threshold_encode",), [peer], info_fn=info)


def sparse_decode_cases(w: Weights) -> list[Case]:
    """sparse_decode vs ``F.embedding_bag`` (no bias) and, with b_dec, vs SAELens dense decode."""
    s = w.shape
    v, i, dense = topk_code(w)
    bag = Peer(
        "embedding_bag", "F.embedding_bag(mode='sum')",
        _nograd(lambda: F.embedding_bag(i, w.W_dec, per_sample_weights=v, mode="sum")),
        min_ratio=1.5, target=">= 1.5x faster", check=_max_diff,
    )
    plain = Case("sparse_decode", s, _nograd(lambda: ops.sparse_decode(v, i, w.W_dec)),
                 ("sparse_decode",), [bag])
    missing = sae_lens_missing()
    if missing:
        sae = Peer("sae_lens", "sae_lens.TopKSAE.decode (dense code)", None, skip=missing)
    else:
        model = topk_sae(w)
        sae = Peer("sae_lens", "sae_lens.TopKSAE.decode (dense code)", _nograd(lambda: model.decode(dense)),
                   min_ratio=80.0, target=">= 80x faster", check=_max_diff)
    biased = Case("sparse_decode", s, _nograd(lambda: ops.sparse_decode(v, i, w.W_dec, w.b_dec)),
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
        return max(_max_diff(o[0], p[0].gather(1, i)), _max_diff(o[1], p[1]))

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
    ours = _nograd(lambda: ops.feature_topk_update(state0, acts, loc))

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
        return _max_diff(o.values[f], p.values[f])

    def ref_step() -> ops.FeatureTopKState:
        from .. import backends

        with backends.use_backend("ref"):
            return ops.feature_topk_update(state0, acts, loc)

    peers = [Peer("ref", "sparsekern reference (torch sort)", _nograd(ref_step), check=check),
             Peer("dense_topk", "dense torch.topk over [d_sae, k + n]", _nograd(dense_topk), check=check)]
    filled = float((state0.locations[..., 0] >= 0).float().mean())
    return Case("feature_topk_update", s, ours, ("feature_topk_update",), peers,
                info={"examples_per_feature": kx, "code_k": kx, "rows": n, "state_filled": round(filled, 3)})


def build(op: str, w: Weights, *, peak_target_mib: Optional[float] = None) -> list[Case]:
    """Cases for ``op`` (one of :data:`OPS`) at ``w``'s shape (the encoders on cuda: one per strategy)."""
    if op in ("topk_encode", "threshold_encode") and w.device.type == "cuda":
        from . import gpu_plan

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
    if op in ("sae_forward", "sae_cache"):
        from .sae_cases import BUILDERS

        return BUILDERS[op](w, w.shape.name.startswith("quick"))
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def plan(quick: bool, device: str | torch.device = "cpu"
         ) -> list[tuple[Shape, tuple[str, ...], Optional[float]]]:
    """The default suite as (shape, ops at that shape, encoder peak target), grouped by shape.

    On cuda (not quick) the encoders run at :data:`gpu_plan.ENCODER_SHAPES` instead.
    """
    if torch.device(device).type == "cuda" and not quick:
        from .gpu_plan import gpu_plan

        return gpu_plan()
    a, b, mem = (QUICK_A, QUICK_B, QUICK_MEM) if quick else (GPT2, GEMMA, MEM)
    return [
        (a, OPS, None),
        (b, ("topk_encode", "threshold_encode", "sparse_decode"), None),
        (mem, ("topk_encode",), TOPK_PEAK_MIB),
    ]
