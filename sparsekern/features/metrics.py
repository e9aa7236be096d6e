"""Reconstruction metrics of an SAE / transcoder over a token stream, in one pass over the data.

Definitions follow SAELens's evals (``sae_lens/evals.py``: ``get_sparsity_and_variance_metrics``,
``get_recons_loss``, ``get_downstream_reconstruction_metrics``, ``ExplainedVarianceCalculator``), with
the same names; every token counts equally across the stream (sums accumulated in float64):

* ``explained_variance`` = 1 - E[||x - x_hat||^2] / (E[||x||^2] - ||E[x]||^2) over the whole stream
  (SAELens's current formula). This *is* the plain ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
  with the mean over the stream; it is accumulated about the first batch's mean to avoid the
  cancellation of ``E||x||^2 - ||E x||^2``. Constant activations: 1 if the MSE is ~0 too, else 0 (as
  SAELens).
* ``explained_variance_legacy``: SAELens's older per-token ``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2``
  averaged over tokens; depends on how the stream is batched.
* ``mse``: per-token ``||x - x_hat||^2`` (summed over dims), averaged over tokens (SAELens's convention;
  divide by ``d`` for the per-element mean). ``cossim``: mean per-token cos(x, x_hat) (NaN if either is
  zero, as SAELens).
* ``l2_norm_in`` / ``l2_norm_out`` / ``l2_ratio`` (``||x_hat|| / ||x||``, ``||x|| < 1e-4`` counted as 1):
  per-token means. ``relative_reconstruction_bias`` = E[||x_hat||^2] / E[x . x_hat] over the stream
  (SAELens averages this ratio per batch; equal for a single batch).
* ``l0`` / ``l1``: mean per-token count of non-zero codes / sum of |code|, from ``sae.encode_sparse``.
* ``feature_density [d_sae]``: fraction of tokens on which each feature is non-zero (SAELens's
  ``feature_density``); ``dead_features``: never fired over the stream; ``dense_features``: density
  ``> dense_threshold`` (default 0.1).
* ``ce_loss_without_sae`` / ``ce_loss_with_sae`` / ``ce_loss_with_ablation``: mean next-token CE of the
  clean model, with the activation replaced by the SAE's reconstruction, and with it zeroed;
  ``ce_loss_score`` = (ablation - with_sae) / (ablation - without_sae). ``kl_div_with_sae`` /
  ``kl_div_with_ablation``: mean per-token KL(clean || patched); ``kl_div_score`` = (ablation - sae) /
  ablation. Scores are ratios of stream means (as SAELens); NaN when the denominator is 0.
* ``ignore_tokens`` (SAELens's ``ignore_tokens`` / ``exclude_special_tokens``): those positions are left
  out of every metric (a CE term counts iff the *predicting* token is kept), the splice leaves their
  activations alone, and — as SAELens — zero ablation still zeroes every position.

Transcoders: x is the output hook's activation (``metadata.hook_name_out``) and x_hat the transcoder's
``decode(encode(x_in))`` from the input hook — exactly what ``HookedSAETransformer`` splices in, so a
skip transcoder's ``W_skip`` term is left out of both, as there. hook_z SAEs: the heads are flattened
(``[..., n_heads * d_head]``) for the metrics. Activation scaling (SAELens's ``ActivationScaler``) is
not applied: fold it into the SAE first (``fold_activation_norm_scaling_factor``).

Cost per batch: one clean forward (cached at the SAE's hooks), one SAE encode + sparse decode, and for
CE/KL two more forwards. Those two start from the cached residual stream at the hook's layer
(``start_at_layer``), so the layers before the hook are not recomputed, and the splice writes the
reconstruction already computed from the clean activations (the activation reaching the hook is the
clean one, so this equals running the SAE at the hook).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hook_names import layer_of

__all__ = ["ReconstructionMetrics", "reconstruction_metrics"]


@dataclass
class ReconstructionMetrics:
    """Result of :func:`reconstruction_metrics` (definitions in the module docstring).

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


# ---- streaming accumulators ------------------------------------------------------------------------
_SUMS = ("sq_c", "res", "legacy", "cos", "norm_in", "norm_out", "ratio", "sq_out", "dot", "l0", "l1")


class _Recon:
    """Float64 sums over tokens of the reconstruction metrics (x, x_hat: ``[rows, d]``), kept on the
    activations' device: no host sync per batch."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Optional[Tensor] = None  # first batch's mean: E||x-c||^2 - ||E[x-c]||^2 cancels less
        self.sum_xc: Optional[Tensor] = None
        self.sums: Optional[Tensor] = None  # [len(_SUMS)]

    def add(self, x: Tensor, xh: Tensor, code_values: Tensor) -> None:
        if x.shape[0] == 0:
            return
        x, xh = x.double(), xh.double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum_xc = torch.zeros_like(self.shift)
            self.sums = x.new_zeros(len(_SUMS))
        xc = x - self.shift
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
            # != 0, not > 0: TopK slots clamped to 0 and threshold padding are not active (as SAELens)
            (code_values != 0).sum().to(x.device, torch.float64),
            code_values.double().abs().sum().to(x.device),
        ))
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        n, s = self.n, dict(zip(_SUMS, self.sums.tolist(), strict=True))
        mse = s["res"] / n
        mean_c = self.sum_xc / n
        total_var = s["sq_c"] / n - mean_c.pow(2).sum().item()
        if total_var < 1e-10:  # SAELens's convention for constant activations
            ev = 1.0 if mse < 1e-10 else 0.0
        else:
            ev = 1.0 - mse / total_var
        return {
            "explained_variance": ev,
            "explained_variance_legacy": s["legacy"] / n,
            "mse": mse,
            "cossim": s["cos"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": _ratio(s["sq_out"], s["dot"]),
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _kl(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """Per-token KL(clean || new) ``[batch, pos]``, computed as SAELens's ``_kl``."""
    log_new = torch.nn.functional.log_softmax(new_logits, dim=-1)
    p_clean = torch.nn.functional.softmax(clean_logits, dim=-1)
    return torch.nn.functional.kl_div(log_new, p_clean, reduction="none").sum(-1)


# ---- helpers ---------------------------------------------------------------------------------------
def _resid_key(layer: int, n_layers: int) -> str:
    """The residual stream going into block ``layer`` (after the last block for ``layer == n_layers``)."""
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _flat(t: Tensor) -> Tensor:
    """``[batch, pos, ...]`` -> ``[batch * pos, d]`` (hook_z heads flattened)."""
    return t.reshape(t.shape[0] * t.shape[1], -1)


def _check_hooks(model: Any, names: Sequence[str]) -> None:
    attached = set(getattr(model, "_acts_to_saes", {}) or {}) | set(
        (getattr(model, "_output_hooks", {}) or {}).values()
    )
    for role, name in names:
        if name in attached:
            raise ValueError(
                f"an SAE is attached to the model at {role}={name!r}; detach it (model.reset_saes()) so the "
                "clean run sees the model's own activations"
            )
        if name not in model.hook_dict:
            raise ValueError(
                f"{role}={name!r} is not a hook of this model (see model.hook_dict, e.g. "
                "'blocks.0.hook_resid_pre'; blocks.L.mlp.hook_in exists on HookedSAETransformer only)"
            )


def _can_start_late(model: Any) -> bool:
    """Whether forward(start_at_layer=...) reproduces the full forward without extra inputs."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", "right") == "left":
        return False  # TransformerLens builds an attention mask from the tokens; not available mid-model
    return True  # (HookedSAETransformer's special-token masks read the tokens= passed alongside)


# ---- the pass --------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_metrics(
    model: Any,
    sae: Any,
    tokens_batches: Iterable[Tensor],
    *,
    hook_name: Optional[str] = None,
    hook_name_out: Optional[str] = None,
    compute_downstream: bool = True,
    ignore_tokens: Optional[Sequence[int]] = None,
    dense_threshold: float = 0.1,
    skip_early_layers: bool = True,
    progress: bool = True,
    total: Optional[int] = None,
) -> ReconstructionMetrics:
    """Reconstruction, sparsity and downstream (CE / KL) metrics of ``sae`` over token batches.

    Args:
        model: a TransformerLens ``HookedTransformer`` (``sparsekern.HookedSAETransformer`` too; SAEs
            attached elsewhere stay attached in all runs, none may sit at this SAE's hooks).
        sae: a sparsekern SAE or transcoder (a SAELens one is converted, sharing its weights).
        tokens_batches: iterable of int token tensors ``[batch, pos]`` (batches may differ in shape).
        hook_name: the hook the SAE reads; default ``sae.cfg.metadata.hook_name``.
        hook_name_out: the hook it reconstructs; default ``metadata.hook_name_out`` for transcoders,
            else ``hook_name``.
        compute_downstream: also run the spliced and zero-ablated forwards (CE / KL metrics).
        ignore_tokens: token ids left out of the metrics and of the splice (e.g. BOS), as SAELens.
        dense_threshold: a feature is dense if it fires on more than this fraction of tokens.
        skip_early_layers: start the spliced / ablated forwards at the hook's layer from the cached
            residual (results are the same; off = full forwards). Off automatically for left-padding
            tokenizers.
        progress: tqdm bar over the batches; ``total`` is its length if ``tokens_batches`` has no len.

    Returns :class:`ReconstructionMetrics`.
    """
    return _finish(_reconstruction_sums(
        model, sae, tokens_batches, hook_name=hook_name, hook_name_out=hook_name_out,
        compute_downstream=compute_downstream, ignore_tokens=ignore_tokens, dense_threshold=dense_threshold,
        skip_early_layers=skip_early_layers, progress=progress, total=total,
    ))


class _Sums(NamedTuple):
    """What :func:`_reconstruction_sums` accumulated (data parallel: summed over ranks before
    :func:`_finish`). recon: the reconstruction sums; counts ``[d_sae]`` int64 firing counts; ce: CE / KL
    sums and counts (floats or 0-d tensors); n_seq: sequences seen."""

    recon: "_Recon"
    counts: Tensor
    ce: dict
    n_seq: int
    dense_threshold: float
    compute_downstream: bool


@torch.no_grad()
def _reconstruction_sums(
    model: Any,
    sae: Any,
    tokens_batches: Iterable[Tensor],
    *,
    hook_name: Optional[str],
    hook_name_out: Optional[str],
    compute_downstream: bool,
    ignore_tokens: Optional[Sequence[int]],
    dense_threshold: float,
    skip_early_layers: bool,
    progress: bool,
    total: Optional[int],
) -> _Sums:
    """The pass of :func:`reconstruction_metrics` (same arguments): sums only, no result yet."""
    from ..hooked_sae_transformer import as_sparsekern_sae  # imports transformer_lens: keep it lazy

    sae = as_sparsekern_sae(sae)
    meta = sae.cfg.metadata
    if meta.get("hook_head_index") is not None:
        raise ValueError("SAEs on a single head (metadata.hook_head_index) are not supported")
    hook_in = hook_name or meta.get("hook_name")
    if not hook_in:
        raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    hook_out = hook_name_out or (meta.get("hook_name_out") if sae._is_transcoder else None) or hook_in
    _check_hooks(model, [("hook_name", hook_in), ("hook_name_out", hook_out)])
    if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real) or not (
        0 <= dense_threshold <= 1
    ):
        raise ValueError(f"dense_threshold must be a fraction in [0, 1], got {dense_threshold!r}")
    ignore = None
    if ignore_tokens is not None:
        ignore = torch.as_tensor(list(ignore_tokens), dtype=torch.int64)
        if ignore.dim() != 1:
            raise ValueError("ignore_tokens must be a sequence of token ids")

    n_layers = model.cfg.n_layers
    start = layer_of(hook_out, n_layers) if compute_downstream and skip_early_layers else None
    if start is not None and not _can_start_late(model):
        start = None
    names = {hook_in, hook_out}
    shortformer = getattr(model.cfg, "positional_embedding_type", None) == "shortformer"
    if start is not None:
        names.add(_resid_key(start, n_layers))
        if shortformer:
            names.add("hook_pos_embed")
    stop = None
    if not compute_downstream:  # only the hooks are needed: stop after the last block that computes them
        layers = [layer_of(h, n_layers) for h in (hook_in, hook_out)]
        stop = None if any(x is None or x >= n_layers for x in layers) else max(layers) + 1

    d_sae = sae.cfg.d_sae
    sae_device = sae.W_dec.device
    counts = torch.zeros(d_sae, dtype=torch.int64, device=sae_device)
    recon = _Recon()
    # CE / KL sums and counts: 0-d float64 tensors after the first batch (summed on device, no sync)
    ce: dict[str, Any] = dict.fromkeys(("clean", "sae", "zero", "kl_sae", "kl_zero", "n_ce", "n_kl"), 0.0)
    n_seq = 0
    if total is None and hasattr(tokens_batches, "__len__"):
        total = len(tokens_batches)  # type: ignore[arg-type]
    for tokens in tqdm(tokens_batches, total=total, disable=not progress, desc="reconstruction metrics"):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens_batches must yield int token tensors [batch, pos], got {got}")
        tokens = tokens.to(model.cfg.device)
        n_seq += tokens.shape[0]
        keep = None if ignore is None else ~torch.isin(tokens, ignore.to(tokens.device))  # [batch, pos]

        if compute_downstream:
            (clean_logits, clean_ce), cache = model.run_with_cache(
                tokens, names_filter=lambda n: n in names, return_type="both", loss_per_token=True
            )
        else:
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=stop)
        x_in, target = cache[hook_in], cache[hook_out]

        # ---- the SAE on the cached activations: sparse encode + sparse decode ----
        sae_in = x_in.to(sae_device)
        if sae_in.dim() > 3 and (sae._is_transcoder or not sae.hook_z_reshaping_mode):
            sae_in = sae_in.flatten(2)  # heads -> one vector, as SAELens's evals
        code = sae.encode_sparse(sae_in)
        x_hat = sae.decode(code)
        if x_hat.shape[:2] != target.shape[:2] or math.prod(x_hat.shape[2:]) != math.prod(target.shape[2:]):
            raise ValueError(
                f"the SAE's output {tuple(x_hat.shape)} does not match the activation at "
                f"hook_name_out={hook_out!r} {tuple(target.shape)}"
            )
        rows = None if keep is None else keep.flatten().to(sae_device)
        x_rows, xh_rows, vals = _flat(target.to(sae_device)), _flat(x_hat), _flat(code.values)
        idx = _flat(code.indices)
        if rows is not None:
            x_rows, xh_rows, vals, idx = x_rows[rows], xh_rows[rows], vals[rows], idx[rows]
        recon.add(x_rows, xh_rows, vals)
        counts += torch.bincount(idx[vals != 0], minlength=d_sae)

        if not compute_downstream:
            continue
        # ---- spliced and zero-ablated forwards ----
        splice = x_hat.to(device=target.device, dtype=target.dtype).reshape(target.shape)
        if keep is not None:
            m = keep.to(target.device).reshape(*keep.shape, *([1] * (target.dim() - 2)))
        else:
            m = None

        def replace(act: Tensor, hook: Any, splice: Tensor = splice, m: Optional[Tensor] = m) -> Tensor:
            return splice if m is None else torch.where(m, splice, act)

        def zero(act: Tensor, hook: Any) -> Tensor:
            return torch.zeros_like(act)

        kw: dict[str, Any] = {"return_type": "both", "loss_per_token": True}
        if start is None:
            run_in = tokens
        else:
            run_in = cache[_resid_key(start, n_layers)]
            kw.update(start_at_layer=start, tokens=tokens)
            if shortformer:
                kw["shortformer_pos_embed"] = cache["hook_pos_embed"]
        del cache
        ce_keep = None if keep is None else keep[:, :-1]  # the loss at t is that of predicting t+1 from t
        for name, fn in (("sae", replace), ("zero", zero)):
            logits, loss = model.run_with_hooks(run_in, fwd_hooks=[(hook_out, fn)], **kw)
            kl = _kl(clean_logits, logits)
            ce[name] += _masked_sum(loss, ce_keep)
            ce["kl_" + name] += _masked_sum(kl, keep)
            del logits
        ce["clean"] += _masked_sum(clean_ce, ce_keep)
        ce["n_ce"] += clean_ce.numel() if ce_keep is None else ce_keep.sum()
        ce["n_kl"] += clean_logits.shape[0] * clean_logits.shape[1] if keep is None else keep.sum()

    return _Sums(recon, counts, ce, n_seq, float(dense_threshold), bool(compute_downstream))


def _finish(sums: _Sums) -> ReconstructionMetrics:
    """:class:`ReconstructionMetrics` from the accumulated sums."""
    recon, counts, ce, n_seq = sums.recon, sums.counts, sums.ce, sums.n_seq
    dense_threshold, compute_downstream = sums.dense_threshold, sums.compute_downstream
    if recon.n == 0:
        raise ValueError("no tokens to evaluate: tokens_batches was empty or every token is in ignore_tokens")
    density = counts.double().cpu() / recon.n
    out = ReconstructionMetrics(
        n_tokens=recon.n,
        n_sequences=n_seq,
        **recon.result(),
        feature_density=density,
        dead_features=(counts == 0).nonzero().flatten().cpu(),
        dense_features=(density > dense_threshold).nonzero().flatten(),
        dense_threshold=float(dense_threshold),
    )
    if compute_downstream:
        s = {k: float(v) for k, v in ce.items()}  # one sync per value, once
        # sequences of one token have no next-token loss: CE is NaN if no batch had any
        c = {k: _ratio(s[k], s["n_ce"]) for k in ("clean", "sae", "zero")}
        kl_sae, kl_zero = _ratio(s["kl_sae"], s["n_kl"]), _ratio(s["kl_zero"], s["n_kl"])
        out.ce_loss_without_sae, out.ce_loss_with_sae = c["clean"], c["sae"]
        out.ce_loss_with_ablation = c["zero"]
        out.ce_loss_score = _ratio(c["zero"] - c["sae"], c["zero"] - c["clean"])
        out.kl_div_with_sae, out.kl_div_with_ablation = kl_sae, kl_zero
        out.kl_div_score = _ratio(kl_zero - kl_sae, kl_zero)
    return out


def _masked_sum(t: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Float64 sum of ``t`` where ``keep`` (all of it if None), as a 0-d tensor."""
    t = t.double()
    return t.sum() if keep is None else torch.where(keep.to(t.device), t, 0).sum()

