"""What :func:`~sparsekern.features.metrics.reconstruction_metrics` returns (:class:`ReconstructionMetrics`)
and the mergeable sums it is computed from (:class:`ReconstructionSums`).

The sums are float64 (int64 firing counts), kept on the activations' device (no host sync per batch).
Every field adds across splits of the token stream once both sides are taken about the same centre:
``sum ||x - c||^2`` and ``sum (x - c)`` are kept about a centre ``c`` near the data (the first batch's
mean) because ``E||x||^2 - ||E x||^2`` cancels catastrophically for activations with a large mean, and
:meth:`ReconstructionSums.merge` / :meth:`~ReconstructionSums.all_reduce` move them to a common one
(:meth:`~ReconstructionSums.recentre`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor

__all__ = ["ReconstructionMetrics", "ReconstructionSums"]

# per-token sums of the reconstruction (``ReconstructionSums.sums``) and of the downstream runs (``.ce``)
RECON_SUMS = ("sq_c", "res", "legacy", "cos", "norm_in", "norm_out", "ratio", "sq_out", "dot", "l0", "l1")
CE_SUMS = ("clean", "sae", "zero", "kl_sae", "kl_zero", "n_ce", "n_kl")
Device = Union[str, torch.device, None]


@dataclass
class ReconstructionMetrics:
    """Result of :func:`reconstruction_metrics` (definitions in the module docstring of
    :mod:`sparsekern.features.metrics`).

    Scalars are Python floats; the CE/KL fields are None when ``compute_downstream=False``.
    ``feature_density`` is ``[d_sae]`` float64; ``dead_features`` / ``dense_features`` are int64 feature
    ids (ascending). ``n_tokens`` counts the tokens the metrics cover (ignored tokens excluded).
    """

    n_tokens: int
    n_sequences: int
    explained_variance: float
    explained_variance_legacy: float
    mse: float
    cossim: float
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float
    l0: float
    l1: float
    feature_density: Tensor
    dead_features: Tensor
    dense_features: Tensor
    dense_threshold: float
    ce_loss_without_sae: Optional[float] = None
    ce_loss_with_sae: Optional[float] = None
    ce_loss_with_ablation: Optional[float] = None
    ce_loss_score: Optional[float] = None
    kl_div_with_sae: Optional[float] = None
    kl_div_with_ablation: Optional[float] = None
    kl_div_score: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """Scalars only (plus ``n_dead_features`` / ``n_dense_features``), e.g. for logging."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: v for k, v in out.items() if not isinstance(v, Tensor)}
        out["n_dead_features"] = int(self.dead_features.numel())
        out["n_dense_features"] = int(self.dense_features.numel())
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _masked_sum(t: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Float64 sum of ``t`` where ``keep`` (all of it if None), as a 0-d tensor."""
    t = t.double()
    return t.sum() if keep is None else torch.where(keep.to(t.device), t, 0).sum()


class ReconstructionSums:
    """Mergeable float64 sums over tokens behind :class:`ReconstructionMetrics`.

    Args:
        d_sae: number of features (``counts [d_sae]``).
        d: width of the reconstructed rows (``x [rows, d]``; hook_z heads flattened).
        dense_threshold: a feature is dense if it fires on more than this fraction of tokens.
        compute_downstream: whether the CE / KL sums are part of the result.
        device: where the reconstruction sums and counts live (default CPU); the CE / KL sums live on the
            device of the first losses added.

    State: ``n_tokens`` / ``n_sequences`` (ints); ``centre [d]`` (None before any token), ``sum_xc [d]`` =
    ``sum (x - centre)``, ``sums [11]`` (names in ``RECON_SUMS``: ``sum ||x - centre||^2``, the residual,
    per-token ratios, norms, dots, L0, L1), ``counts [d_sae]`` int64 firing counts, ``ce [7]`` (names in
    ``CE_SUMS``: CE and KL sums and their token counts).

    Use: :meth:`add_reconstruction` / :meth:`add_downstream` / :meth:`add_sequences` per batch, then
    :meth:`merge` (another split), :meth:`all_reduce` (across processes) and :meth:`finish`.
    """

    def __init__(self, d_sae: int, d: int, *, dense_threshold: float = 0.1, compute_downstream: bool = True,
                 device: Device = None) -> None:
        for name, v in (("d_sae", d_sae), ("d", d)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real) or not (
            0 <= dense_threshold <= 1
        ):
            raise ValueError(f"dense_threshold must be a fraction in [0, 1], got {dense_threshold!r}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.d_sae, self.d = int(d_sae), int(d)
        self.dense_threshold, self.compute_downstream = float(dense_threshold), bool(compute_downstream)
        self.n_tokens = self.n_sequences = 0
        self.centre: Optional[Tensor] = None
        self.sum_xc = torch.zeros(self.d, dtype=torch.float64, device=dev)
        self.sums = torch.zeros(len(RECON_SUMS), dtype=torch.float64, device=dev)
        self.counts = torch.zeros(self.d_sae, dtype=torch.int64, device=dev)
        self.ce: Optional[Tensor] = None  # created on the losses' device

    # ---- per batch ----------------------------------------------------------------------------------
    def add_reconstruction(self, x: Tensor, x_hat: Tensor, code_values: Tensor, code_indices: Tensor) -> None:
        """Add rows ``x``, ``x_hat [rows, d]`` (on this state's device) and their codes ``[rows, k]``.

        A code slot is active iff its value is ``!= 0`` (TopK slots clamped to 0 and threshold padding are
        not, as SAELens)."""
        if x.shape[-1] != self.d or x_hat.shape != x.shape:
            raise ValueError(f"x and x_hat must be [rows, d={self.d}], got {tuple(x.shape)} and "
                             f"{tuple(x_hat.shape)}")
        self.counts += torch.bincount(code_indices[code_values != 0], minlength=self.d_sae)
        if x.shape[0] == 0:
            return
        x, xh = x.double(), x_hat.double()
        if self.centre is None:
            self.centre = x.mean(0)
        xc = x - self.centre
        res = (x - xh).pow(2).sum(-1)
        dot = (x * xh).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), xh.norm(dim=-1)
        self.sum_xc += xc.sum(0)
        self.sums += torch.stack((
            xc.pow(2).sum(),
            res.sum(),
            (1 - res / (x - x.mean(0)).pow(2).sum(-1)).sum(),  # legacy: this batch's mean
            (dot / (norm_in * norm_out)).sum(),
            norm_in.sum(),
            norm_out.sum(),
            (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum(),
            norm_out.pow(2).sum(),
            dot.sum(),
            (code_values != 0).sum().to(x.device, torch.float64),
            code_values.double().abs().sum().to(x.device),
        ))
        self.n_tokens += x.shape[0]

    def add_downstream(self, ce_clean: Tensor, ce_sae: Tensor, ce_zero: Tensor, kl_sae: Tensor,
                       kl_zero: Tensor, keep: Optional[Tensor] = None) -> None:
        """Add per-token next-token CE losses ``[batch, pos - 1]`` (clean, SAE spliced, zero ablated) and
        KL(clean || patched) ``[batch, pos]``; ``keep [batch, pos]`` bool: positions that count (a CE term
        counts iff its predicting token is kept). Summed in float64."""
        ce_keep = None if keep is None else keep[:, :-1]  # the loss at t is that of predicting t+1 from t
        n_ce = ce_clean.numel() if ce_keep is None else ce_keep.sum()
        n_kl = kl_sae.numel() if keep is None else keep.sum()
        if self.ce is None:
            self.ce = torch.zeros(len(CE_SUMS), dtype=torch.float64, device=ce_clean.device)
        dev = self.ce.device
        self.ce += torch.stack([
            _masked_sum(ce_clean, ce_keep).to(dev), _masked_sum(ce_sae, ce_keep).to(dev),
            _masked_sum(ce_zero, ce_keep).to(dev), _masked_sum(kl_sae, keep).to(dev),
            _masked_sum(kl_zero, keep).to(dev),
            torch.as_tensor(n_ce, device=dev).double(), torch.as_tensor(n_kl, device=dev).double(),
        ])

    def add_sequences(self, n: int) -> None:
        self.n_sequences += int(n)

    # ---- combining -------------------------------------------------------------------------------------
    @torch.no_grad()
    def recentre(self, centre: Tensor) -> "ReconstructionSums":
        """Take the centred sums about ``centre [d]`` instead (exact algebra, in place); returns ``self``:
        ``sum ||x - c'||^2 = sum ||x - c||^2 + 2 (c - c') . sum (x - c) + n ||c - c'||^2``."""
        centre = centre.to(self.sums.device, torch.float64)
        if self.centre is not None and self.n_tokens:
            delta = self.centre - centre
            self.sums[0] += 2 * (delta @ self.sum_xc) + self.n_tokens * delta.pow(2).sum()
            self.sum_xc += self.n_tokens * delta
        self.centre = centre.clone()
        return self

    def _check_same(self, other: "ReconstructionSums") -> None:
        mine = (self.d_sae, self.d, self.dense_threshold, self.compute_downstream)
        theirs = (other.d_sae, other.d, other.dense_threshold, other.compute_downstream)
        if mine != theirs:
            raise ValueError(f"cannot merge ReconstructionSums of (d_sae, d, dense_threshold, "
                             f"compute_downstream) = {theirs} into {mine}")

    @torch.no_grad()
    def merge(self, other: "ReconstructionSums") -> "ReconstructionSums":
        """Add the sums of ``other`` (another split of the stream) in place, on this state's centre (or
        ``other``'s, if this one has no tokens yet); returns ``self``."""
        if not isinstance(other, ReconstructionSums):
            raise TypeError(f"merge expects a ReconstructionSums, got {type(other).__name__}")
        self._check_same(other)
        dev = self.sums.device
        if other.n_tokens:
            theirs = ReconstructionSums.from_state_dict(other.state_dict(), device=dev)
            if self.centre is None or not self.n_tokens:
                self.centre = theirs.centre.clone()
            theirs.recentre(self.centre)
            self.sums += theirs.sums
            self.sum_xc += theirs.sum_xc
        self.counts += other.counts.to(dev)
        if other.ce is not None:
            self.ce = other.ce.clone() if self.ce is None else self.ce + other.ce.to(self.ce.device)
        self.n_tokens += other.n_tokens
        self.n_sequences += other.n_sequences
        return self

    @torch.no_grad()
    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> "ReconstructionSums":
        """The sums over every process: a new state, the same on each.

        ``reduce_sum(t)`` must return the element-wise sum of ``t`` over the processes (e.g. wrapping
        ``torch.distributed.all_reduce``; any device, in place or not), and every process must call this
        with the same ``d_sae`` / ``d``. Three reductions: token counts and token-weighted centres (the
        common centre is their weighted mean), the float64 sums taken about it, and the firing counts.
        """
        dev = self.sums.device
        own_centre = self.centre if self.centre is not None else torch.zeros_like(self.sum_xc)
        head = torch.cat([torch.tensor([float(self.n_tokens)], dtype=torch.float64, device=dev),
                          own_centre.to(dev) * self.n_tokens])
        head = reduce_sum(head).to(dev)
        n_all = int(head[0].item())
        local = ReconstructionSums.from_state_dict(self.state_dict(), device=dev)
        if n_all:
            local.recentre(head[1:] / n_all)
        ce = local.ce.to(dev) if local.ce is not None else torch.zeros(len(CE_SUMS), dtype=torch.float64,
                                                                      device=dev)
        seq = torch.tensor([float(self.n_sequences)], dtype=torch.float64, device=dev)
        flat = reduce_sum(torch.cat([local.sums, local.sum_xc, ce, seq])).to(dev)
        counts = reduce_sum(local.counts.clone()).to(dev)
        k, d = len(RECON_SUMS), self.d
        out = ReconstructionSums(self.d_sae, d, dense_threshold=self.dense_threshold,
                                 compute_downstream=self.compute_downstream, device=dev)
        out.n_tokens, out.n_sequences = n_all, int(flat[-1].item())
        out.centre = local.centre if n_all else None
        out.sums, out.sum_xc, out.ce = flat[:k].clone(), flat[k:k + d].clone(), flat[k + d:-1].clone()
        out.counts = counts.to(self.counts.device)
        return out

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"d_sae", "d", "dense_threshold", "compute_downstream", "n_tokens", "n_sequences"}`` (JSON-able)
        plus the tensors ``"centre"`` (or None), ``"sum_xc"``, ``"sums"``, ``"counts"``, ``"ce"`` (or None).
        The tensors are the state's own (clone before modifying)."""
        return {"d_sae": self.d_sae, "d": self.d, "dense_threshold": self.dense_threshold,
                "compute_downstream": self.compute_downstream, "n_tokens": self.n_tokens,
                "n_sequences": self.n_sequences, "centre": self.centre, "sum_xc": self.sum_xc,
                "sums": self.sums, "counts": self.counts, "ce": self.ce}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: Device = None) -> "ReconstructionSums":
        """A new state from :meth:`state_dict` (tensors copied; ``device`` default: that of ``sums``)."""
        missing = sorted({"d_sae", "d", "n_tokens", "sums", "sum_xc", "counts"} - set(state))
        if missing:
            raise ValueError(f"a ReconstructionSums state_dict misses {missing}")
        dev = torch.device(device) if device is not None else state["sums"].device
        out = cls(state["d_sae"], state["d"], dense_threshold=state.get("dense_threshold", 0.1),
                  compute_downstream=state.get("compute_downstream", True), device=dev)
        for name, shape in (("sums", (len(RECON_SUMS),)), ("sum_xc", (out.d,)), ("counts", (out.d_sae,))):
            t = state[name]
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"state[{name!r}] must be a tensor of shape {shape}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            setattr(out, name, t.to(dev, torch.int64 if name == "counts" else torch.float64, copy=True))
        out.n_tokens, out.n_sequences = int(state["n_tokens"]), int(state.get("n_sequences", 0))
        centre, ce = state.get("centre"), state.get("ce")
        out.centre = None if centre is None else centre.to(dev, torch.float64, copy=True)
        out.ce = None if ce is None else ce.to(torch.float64, copy=True)
        if out.n_tokens and out.centre is None:
            raise ValueError("state['centre'] is required when n_tokens > 0")
        return out

    # ---- the result -------------------------------------------------------------------------------------
    def finish(self) -> ReconstructionMetrics:
        """:class:`ReconstructionMetrics` from the sums; ValueError if no token was added."""
        n = self.n_tokens
        if n == 0:
            raise ValueError(
                "no tokens to evaluate: tokens_batches was empty or every token is in ignore_tokens")
        s = dict(zip(RECON_SUMS, self.sums.tolist(), strict=True))
        mse = s["res"] / n
        mean_c = self.sum_xc / n
        total_var = s["sq_c"] / n - mean_c.pow(2).sum().item()
        if total_var < 1e-10:  # SAELens's convention for constant activations
            ev = 1.0 if mse < 1e-10 else 0.0
        else:
            ev = 1.0 - mse / total_var
        counts = self.counts
        density = counts.double().cpu() / n
        out = ReconstructionMetrics(
            n_tokens=n,
            n_sequences=self.n_sequences,
            explained_variance=ev,
            explained_variance_legacy=s["legacy"] / n,
            mse=mse,
            cossim=s["cos"] / n,
            l2_norm_in=s["norm_in"] / n,
            l2_norm_out=s["norm_out"] / n,
            l2_ratio=s["ratio"] / n,
            relative_reconstruction_bias=_ratio(s["sq_out"], s["dot"]),
            l0=s["l0"] / n,
            l1=s["l1"] / n,
            feature_density=density,
            dead_features=(counts == 0).nonzero().flatten().cpu(),
            dense_features=(density > self.dense_threshold).nonzero().flatten(),
            dense_threshold=self.dense_threshold,
        )
        if self.compute_downstream:
            ce = dict(zip(CE_SUMS, self.ce.tolist() if self.ce is not None else [0.0] * len(CE_SUMS)))
            # sequences of one token have no next-token loss: CE is NaN if no batch had any
            c = {k: _ratio(ce[k], ce["n_ce"]) for k in ("clean", "sae", "zero")}
            kl_sae, kl_zero = _ratio(ce["kl_sae"], ce["n_kl"]), _ratio(ce["kl_zero"], ce["n_kl"])
            out.ce_loss_without_sae, out.ce_loss_with_sae = c["clean"], c["sae"]
            out.ce_loss_with_ablation = c["zero"]
            out.ce_loss_score = _ratio(c["zero"] - c["sae"], c["zero"] - c["clean"])
            out.kl_div_with_sae, out.kl_div_with_ablation = kl_sae, kl_zero
            out.kl_div_score = _ratio(kl_zero - kl_sae, kl_zero)
        return out
