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

Mergeable: :func:`reconstruction_sums` is the same pass returning its float64
:class:`~sparsekern.features.reconstruction.ReconstructionSums` (``merge``, ``all_reduce``, ``state_dict``,
``finish``); the metrics of several streams are ``finish()`` of their merged sums.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hook_names import layer_of, stop_layer
from .reconstruction import ReconstructionMetrics, ReconstructionSums

__all__ = ["ReconstructionMetrics", "ReconstructionSums", "reconstruction_metrics", "reconstruction_sums"]


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
    attached = set(getattr(model, "attached_hooks", {}))  # HookedSAETransformer: hooks its SAEs occupy
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
    return reconstruction_sums(
        model, sae, tokens_batches, hook_name=hook_name, hook_name_out=hook_name_out,
        compute_downstream=compute_downstream, ignore_tokens=ignore_tokens, dense_threshold=dense_threshold,
        skip_early_layers=skip_early_layers, progress=progress, total=total,
    ).finish()


@torch.no_grad()
def reconstruction_sums(
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
) -> ReconstructionSums:
    """The pass of :func:`reconstruction_metrics` (same arguments), returning its mergeable
    :class:`ReconstructionSums` (``.finish()`` gives the metrics): sums of several token streams (other
    batches, other processes) combine with ``merge`` / ``all_reduce`` before ``finish``."""
    from ..hooked_sae_transformer import as_sparsekern_sae  # imports transformer_lens: keep it lazy

    sae = as_sparsekern_sae(sae)
    meta = sae.cfg.metadata
    if meta.get("hook_head_index") is not None:
        raise ValueError("SAEs on a single head (metadata.hook_head_index) are not supported")
    hook_in = hook_name or meta.get("hook_name")
    if not hook_in:
        raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    hook_out = hook_name_out or (meta.get("hook_name_out") if sae.is_transcoder else None) or hook_in
    _check_hooks(model, [("hook_name", hook_in), ("hook_name_out", hook_out)])
    sums = ReconstructionSums(sae.cfg.d_sae, math.prod(sae.W_dec.shape[1:]), dense_threshold=dense_threshold,
                              compute_downstream=compute_downstream, device=sae.W_dec.device)
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
    # only the hooks are needed: stop after the last block that computes them
    stop = None if compute_downstream else stop_layer((hook_in, hook_out))

    sae_device = sae.W_dec.device
    if total is None and hasattr(tokens_batches, "__len__"):
        total = len(tokens_batches)  # type: ignore[arg-type]
    for tokens in tqdm(tokens_batches, total=total, disable=not progress, desc="reconstruction metrics"):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens_batches must yield int token tensors [batch, pos], got {got}")
        tokens = tokens.to(model.cfg.device)
        sums.add_sequences(tokens.shape[0])
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
        if sae_in.dim() > 3 and (sae.is_transcoder or not sae.hook_z_reshaping_mode):
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
        sums.add_reconstruction(x_rows, xh_rows, vals, idx)

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
        runs = {}
        for name, fn in (("sae", replace), ("zero", zero)):
            logits, loss = model.run_with_hooks(run_in, fwd_hooks=[(hook_out, fn)], **kw)
            runs[name] = (loss, _kl(clean_logits, logits))
            del logits
        sums.add_downstream(clean_ce, runs["sae"][0], runs["zero"][0], runs["sae"][1], runs["zero"][1], keep)

    return sums
