"""Feature ablation sweeps: the metric's change when each SAE feature is removed from a model's run.

:func:`ablate_features` splices an SAE (or transcoder) at its hook and, for every active feature ``f``
(or a given list), measures ``metric(ablated) - metric(baseline)``, where the ablated run subtracts the
feature's contribution to the reconstruction at the hook::

    act[b, t] -> act[b, t] - a_f(b, t) * W_dec[f]            (use_error_term=True, the default)
    act[b, t] -> recon[b, t] - a_f(b, t) * W_dec[f]          (use_error_term=False)

``a_f(b, t)`` is the SAE code (``encode_sparse``) of the baseline activation at the hook. The numbers
equal one ``model.run_with_hooks(tokens, fwd_hooks=[(hook, that edit)])`` per ablation (tested to 1e-5),
i.e. SAELens's ablation by zeroing ``hook_sae_acts_post[..., f]`` with the SAE attached (the error term,
when used, is computed from the unablated code).

**Conventions.**

* *Batch*: as in TransformerLens activation patching, an ablation acts on the whole batch at once --
  feature ``f`` is removed in every prompt (row) where it is active -- and the metric sees the
  ``[batch, pos, d_vocab]`` logits of that single run. For one ablation per (prompt, feature), call the
  function per prompt (a batch of one).
* ``per_position=False``: one ablation per feature, at every position (and row) where it is active.
  Output ``[n_features]``.
* ``per_position=True``: one ablation per (feature, position ``p``), only at ``p`` (in every row where
  ``f`` is active at ``p``). Output ``[n_features, pos]``.
* Inactive (feature, position) entries are not run: the ablation would change nothing, so their value
  is exactly ``0`` (``return_delta=True``) or the baseline metric (``return_delta=False``); the
  ``active`` mask of the result tells them apart from a measured zero.
* ``use_error_term=True``: the SAE is spliced with its error term, so the baseline is the model's own
  run. ``False``: the activation at the hook is replaced by the reconstruction (``decode(encode(x))``;
  for a transcoder without its skip connection, as ``HookedSAETransformer``) in the baseline and in
  every ablated run.
* SAEs with run-time input normalisation (``constant_norm_rescale``, ``layer_norm``) remove the feature's
  de-normalised contribution; TopK ``rescale_acts_by_decoder_norm`` codes are scaled as in ``decode``.

**Speed.** Each ablation is an activation patch at the hook's layer (the ablated value at the hook is
known in advance), so the sweep runs on :mod:`sparsekern.patching`'s engine: one baseline forward is
cached; each ablation starts at the hook's block from the cached ``resid_pre``; under causal attention it
recomputes only positions from the first one it changes (earlier keys/values and logits come from the
cache), ablations sharing that position run as one batched forward, and only the logit positions the
metric reads are unembedded (see ``sparsekern.patching``). Models or hooks the engine does not cover
(left padding, multi-device, hooks outside the blocks, SAEs attached with ``exclude_special_tokens``)
run one hooked forward per ablation, with a one-time warning.

**Steps.** :func:`ablate_features` is :func:`plan_ablations` (checks, the SAE's code, which ablations
to run), :func:`measure_ablations` (the baseline and one metric value per ablation) and
:func:`assemble_ablations` (deltas, inactive entries, the requested feature order). Run them yourself to
split the measuring: ``measure_ablations(plan, metric, shard=Shard(rank, world))`` runs one share of the
ablations and leaves 0 for the rest, so the shares' ``values`` sum to the full measurement
(``sparsekern.distributed.distributed_ablate_features`` does this across processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from ._ablations import Ablations, AblationEngine, active_ablations, check_features, setup
from ._common import (  # noqa: F401 - BACKENDS: importable from here as before
    BACKENDS,
    Metric,
    Shard,
    as_scalar,
    check_options,
    check_shard,
    check_tokens,
    run_reference,
    warn_once,
)
from ._patches import Patch, is_position_local_hook

__all__ = [
    "AblationPlan",
    "AblationValues",
    "FeatureAblationResult",
    "ablate_features",
    "assemble_ablations",
    "measure_ablations",
    "plan_ablations",
]


class FeatureAblationResult(NamedTuple):
    """Output of :func:`ablate_features`.

    values: ``[n_features]`` (``[n_features, pos]`` with ``per_position``) float32 on the model device:
        ``metric(ablated) - metric(baseline)`` (or ``metric(ablated)`` with ``return_delta=False``).
    feature_ids: ``[n_features]`` int64, the feature of each row (ascending when ``features=None``).
    active: bool, same shape as ``values``: whether the ablation changed anything (the feature is active
        in some row (at that position)); other entries were not run (0, or the baseline metric).
    baseline: 0-d float32, the metric of the unablated run.
    """

    values: Tensor
    feature_ids: Tensor
    active: Tensor
    baseline: Tensor


@dataclass(frozen=True, eq=False)
class AblationPlan:
    """What :func:`plan_ablations` resolved, before anything is measured (tensors on the model device).

    feature_ids: ``[n_features]`` int64, the requested ids in order (ascending when ``features=None``).
    inverse: ``[n_features]`` int64, each requested id's row among the sorted unique ids.
    active: ``[n_unique, pos]`` bool, unique feature active (nonzero code) in some row at that position.
    rows: ``[n_ablations]`` int64, the unique-feature row each ablation removes.
    positions: ``[n_ablations]`` int64, the one position it ablates (``per_position``), else -1 (all).
    per_position: whether each (feature, position) is ablated separately.
    hook: the hook point where the features are removed; model and tokens ``[batch, pos]``: the run.
    """

    feature_ids: Tensor
    inverse: Tensor
    active: Tensor
    rows: Tensor
    positions: Tensor
    per_position: bool
    hook: str
    model: object = field(repr=False)
    tokens: Tensor = field(repr=False)
    # how to run it (read by measure_ablations only)
    _ablations: Ablations = field(repr=False)
    _splice: list = field(repr=False)  # forward hooks of the baseline run (the splice without error term)
    _first: Tensor = field(repr=False)  # [n_ablations] first position each ablation changes
    _n_pos: Tensor = field(repr=False)  # [n_ablations] number of positions it changes
    _engine_reason: str | None = field(repr=False)  # why the engine cannot run it (None: it can)

    @property
    def n_ablations(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.cfg.device)


class AblationValues(NamedTuple):
    """What :func:`measure_ablations` measured.

    values: ``[n_ablations]`` metric of each ablated run (the metric's dtype, model device); with a
        ``shard``, 0 for the ablations of other ranks.
    baseline: 0-d metric of the unablated run (every shard computes it).
    """

    values: Tensor
    baseline: Tensor


def plan_ablations(
    model,
    tokens: Int[Tensor, "batch pos"],
    sae,
    features: None | Sequence[int] | Tensor = None,
    *,
    per_position: bool = False,
    use_error_term: bool = True,
) -> AblationPlan:
    """Step 1 of :func:`ablate_features` (same arguments): check them, encode the hook's activation with
    ``sae`` (one forward up to the hook's block) and list the ablations to run.

    Returns an :class:`AblationPlan` (``n_ablations`` = active (feature, position) pairs with
    ``per_position``, else active features); nothing of the metric is run yet."""
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_hooks"):
        raise TypeError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    tokens = check_tokens(tokens, "tokens", model.cfg.device)
    if not hasattr(sae, "W_dec") or not hasattr(sae, "cfg"):
        raise TypeError(
            f"sae must be a sparsekern.SAE or a sae_lens SAE/transcoder, got {type(sae).__name__}"
        )
    feats = check_features(features, sae.W_dec.shape[0], tokens.device)
    abl, splice, reason = setup(model, tokens, sae, bool(use_error_term))
    T = tokens.shape[1]
    feature_ids, inverse, act_u, u, first, n_pos = active_ablations(abl, feats, bool(per_position), T)
    return AblationPlan(
        feature_ids, inverse, act_u, u, abl.pos, bool(per_position), abl.hook, model, tokens,
        abl, splice, first, n_pos, reason,
    )  # fmt: skip


def measure_ablations(
    plan: AblationPlan,
    metric: Metric,
    *,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    shard: Shard | None = None,
) -> AblationValues:
    """Step 2 of :func:`ablate_features`: the baseline metric and the metric of every ablated run.

    Options as there; ``shard`` (a :class:`sparsekern.patching.Shard`): plan every ablation as one process
    would, but run only this rank's chunks (engine) or ablations (reference); the others' values are 0.
    """
    check_options(metric, "metric", backend, max_batch, memory_budget)
    shard = check_shard(shard)
    model, tokens, abl = plan.model, plan.tokens, plan._ablations
    reason, n_abl = plan._engine_reason, plan.n_ablations
    if reason is not None and backend == "auto":
        warn_once(
            "ablation:" + reason, f"sparsekern.patching.feature_ablation: one forward per ablation ({reason})"
        )
    if backend == "auto" and reason is None and n_abl:  # (nothing to ablate: just the baseline run)
        eng = AblationEngine(model, tokens, abl, plan._splice)
        base = as_scalar(metric(eng.logits), "metric", eng.device)
        local = is_position_local_hook(abl.hook)
        patches = []
        for i in range(n_abl):
            # causal attention: positions before the first ablated one are unchanged at every layer
            s = int(plan._first[i]) if eng.causal and local else 0
            # "pos": only position s changes at the hook, so (on CPU) a hook after the block's keys/values
            # runs its block at that one position (see Engine.join_layer)
            kind = "pos" if local and (plan.per_position or int(plan._n_pos[i]) == 1) else "ablate"
            patches.append(Patch(0, i, abl.layer, s, abl.hook, kind, (i,)))
        vals = eng.run(patches, {}, metric, "metric", max_batch, memory_budget, progress, shard=shard)
    else:
        device = plan.device
        with torch.no_grad():
            base = as_scalar(metric(model.run_with_hooks(tokens, fwd_hooks=plan._splice)), "metric", device)
        # the metric's dtype for the runs left to other ranks (every rank has it from the baseline): the
        # ranks' values can be summed
        vals = run_reference(
            model, tokens, abl.reference_runs(tokens.shape[1]), metric, "metric",
            shard=shard, label="feature ablation", progress=progress, fill_dtype=base.dtype,
        )  # fmt: skip
    return AblationValues(vals, base)


def assemble_ablations(
    plan: AblationPlan, measured: AblationValues, *, return_delta: bool = True
) -> FeatureAblationResult:
    """Step 3 of :func:`ablate_features`: lay the measured values out as a :class:`FeatureAblationResult`
    (``[n_features]``, or ``[n_features, pos]`` per position; deltas when ``return_delta``; inactive
    entries 0, or the baseline)."""
    vals, base, device = measured.values, measured.baseline, plan.device
    if vals.shape != (plan.n_ablations,):
        raise ValueError(
            f"measured.values must have shape [n_ablations={plan.n_ablations}], got {list(vals.shape)}"
        )
    # ablation i -> cell (rows[i], position) of the unique features' table -> the requested rows
    active_u = plan.active if plan.per_position else plan.active.any(1)
    table = torch.zeros(active_u.shape, device=device)  # as TransformerLens patching: default dtype
    base_out = base.to(device=device, dtype=table.dtype)
    if not return_delta:
        table[~active_u.to(device)] = base_out
    if plan.n_ablations:
        v = (vals - base if return_delta else vals).to(device=device, dtype=table.dtype)
        u = plan.rows.to(device)
        table[(u, plan.positions.to(device)) if plan.per_position else (u,)] = v
    inverse = plan.inverse.to(device)
    return FeatureAblationResult(
        table[inverse], plan.feature_ids.to(device), active_u.to(device)[inverse], base_out
    )


# -------------------------------------------------------------------------------------------- API
def ablate_features(
    model,
    tokens: Int[Tensor, "batch pos"],
    sae,
    metric: Metric,
    features: None | Sequence[int] | Tensor = None,
    *,
    per_position: bool = False,
    use_error_term: bool = True,
    return_delta: bool = True,
    progress: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
) -> FeatureAblationResult:
    """Metric change when each SAE feature is ablated at the SAE's hook (see the module docstring).

    Args:
        model: a ``HookedTransformer`` (or ``sparsekern.HookedSAETransformer``; SAEs attached elsewhere stay
            part of the model, none may be attached at ``sae``'s hook).
        tokens: ``[batch, pos]`` (or ``[pos]``) int tokens.
        sae: a ``sparsekern.SAE`` / transcoder or a sae_lens one (converted, weights shared) with
            ``cfg.metadata.hook_name`` (transcoders: read there, ablated at ``hook_name_out``). Its input is
            ``[batch, pos, d_in]`` or, at ``attn.hook_z``, ``[batch, pos, n_heads, d_head]``.
        metric: logits ``[batch, pos, d_vocab]`` -> scalar, as a patching metric (it may get a
            ``LazyLogits``, see ``sparsekern.patching``).
        features: None (every feature active anywhere in the batch, ascending) or int ids ``[n_features]``
            in ``[0, d_sae)`` (kept in the given order; duplicates are run once).
        per_position: ablate each feature at each position separately (output ``[n_features, pos]``).
        use_error_term: True: the baseline is the model's own run and an ablation subtracts
            ``a_f * W_dec[f]``; False: the hook's activation is replaced by the SAE's reconstruction.
        return_delta: return ``metric(ablated) - metric(baseline)`` (else ``metric(ablated)``).
        progress: tqdm bar. max_batch: ablations per forward pass (default: from ``memory_budget``).
        memory_budget: bytes one chunk may use (default: a quarter of free memory, capped).
        backend: ``"auto"`` (the fused patching engine where exact) or ``"reference"`` (one hooked forward
            per ablation).

    Returns:
        :class:`FeatureAblationResult` ``(values, feature_ids, active, baseline)``.

    It is :func:`plan_ablations`, :func:`measure_ablations` and :func:`assemble_ablations` in turn. It takes
    no ``shard``: a share's deltas would not sum to the whole; give the shard to ``measure_ablations``.
    """
    check_options(metric, "metric", backend, max_batch, memory_budget)  # before the setup's forward
    plan = plan_ablations(
        model, tokens, sae, features, per_position=per_position, use_error_term=use_error_term
    )
    measured = measure_ablations(
        plan, metric, progress=progress, max_batch=max_batch, memory_budget=memory_budget, backend=backend
    )
    return assemble_ablations(plan, measured, return_delta=return_delta)
