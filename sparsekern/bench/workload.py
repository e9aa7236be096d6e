"""The vocabulary of the ops suite: SAE shapes, seeded weights, :class:`Case` / :class:`Peer`, the SAELens
twins that hold the very same tensors, and the diffs that check a peer's output against sparsekern's.

Every case builder (:mod:`.cases` on any device, :mod:`.gpu_plan` for the cuda encoders,
:mod:`.sae_cases` for the drop-in API) builds on this module; it imports none of them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..sparse_acts import SparseActs

OPS = ("topk_encode", "threshold_encode", "sparse_decode", "sparse_decode_backward", "sae_forward",
       "sae_cache", "feature_topk_update")
THRESHOLD_L0 = 64  # JumpReLU thresholds are calibrated for this mean L0


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


# ---- SAELens twins and diffs ------------------------------------------------------------------------------
def sae_lens_missing() -> Optional[str]:
    """None if ``sae_lens`` imports, else the reason to print."""
    try:
        import sae_lens  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"sae_lens not installed ({type(e).__name__}: {e}); SAELens peer skipped"
    return None


def nograd(fn: Callable[[], Any]) -> Callable[[], Any]:
    @functools.wraps(fn)
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def dtype_name(dtype: torch.dtype) -> str:
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
        cfg = TopKSAEConfig(d_in=s.d_in, d_sae=s.d_sae, k=s.k, dtype=dtype_name(w.dtype), device="meta")
        w.cache["topk_sae"] = _install(TopKSAE(cfg), w)
    return w.cache["topk_sae"]


def jumprelu_sae(w: Weights, threshold: Tensor) -> nn.Module:
    """``sae_lens.JumpReLUSAE`` holding ``w`` and a ``[d_sae]`` threshold."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    s = w.shape
    cfg = JumpReLUSAEConfig(d_in=s.d_in, d_sae=s.d_sae, dtype=dtype_name(w.dtype), device="meta")
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


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def dense_diff(ours: SparseActs, dense: Tensor, max_elems: int = 2**24) -> float:
    """max |ours - dense| a block of rows at a time (a whole fp32 copy at 2^20 features is 16 GiB)."""
    d_sae = dense.shape[-1]
    dense = dense.reshape(-1, d_sae)
    ov, oi = ours.values.reshape(dense.shape[0], ours.k), ours.indices.reshape(dense.shape[0], ours.k)
    step = max(1, max_elems // d_sae)
    diffs = [max_diff(SparseActs(ov[r:r + step], oi[r:r + step]).to_dense(d_sae), dense[r:r + step])
             for r in range(0, dense.shape[0], step)]
    return max(diffs, default=0.0)


def calibrate_threshold(w: Weights, l0: float, rows: int = 256) -> float:
    """Scalar threshold so that about ``l0`` pre-activations per row exceed it (first rows)."""
    with torch.no_grad():
        pre = ((w.x[:rows] - w.b_dec) @ w.W_enc + w.b_enc).float().flatten()
    keep = max(1, min(pre.numel() - 1, round(l0 * pre.numel() / w.shape.d_sae)))
    return max(0.0, float(pre.kthvalue(pre.numel() - keep).values))
