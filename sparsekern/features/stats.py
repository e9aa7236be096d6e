"""Streaming per-feature statistics of SAE codes (``FeatureStats``) and a driver over a model/SAE.

Everything is a segmented reduction over the sparse code of one batch at a time, kept by mergeable
accumulators (:mod:`sparsekern.features.accumulators`), one per kind of statistic:

* per feature (``MomentsAccumulator``): firing count, sum, sum of squares, max and min of the activation,
  and a histogram on log-spaced bins (quantiles);
* co-occurrence: exact counts of features firing on the same token in a dense ``[F, F]`` int32 table or
  an ``[S, S]`` table over a feature subset (``PairTableAccumulator``), or a per-feature sketch of the
  heaviest partners (``PartnerSketchAccumulator``);
* conditioned statistics of another activation ``y`` (``ConditionedAccumulator``: MLP neurons, another
  SAE's code, ...): ``sum_t a_f(t) y(t)`` and ``#{t: f fires, y(t) > 0}`` (``[F, d_y]``, through the
  ``sparse_decode`` weight-gradient op), optionally ``sum_{t: f fires} y(t)``, second moments of ``y``
  given chosen features, and the overall mean/covariance of ``y``.

**Firing.** A slot fires iff its value is ``> 0`` (SAELens's ``acts > 0``). Zeros (padding), negative
values (a JumpReLU with a negative threshold) and NaN are ignored by *every* statistic, so each one
equals the same statistic of the dense code ``relu(acts)``. States merge exactly (``merge``), which is
how a dataset is split across processes; ``state_dict`` / ``from_state_dict`` carry a state as JSON-able
metadata and named tensors (``save``/``load`` write them with safetensors).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hook_names import stop_layer
from .accumulators import FeatureStatsConfig, PartnerCounts
from .accumulators.pair_table import INT32_MAX  # noqa: F401  (a name this module had; read there)
from .feature_statistics import FeatureStats

__all__ = ["FeatureStats", "FeatureStatsConfig", "PartnerCounts", "feature_stats", "sae_fingerprint"]


# ---- driver ----------------------------------------------------------------------------------------------
def sae_fingerprint(sae: Any) -> str:
    """A short id of an SAE's weights (class, shapes, a hash of a strided sample of ``W_enc``)."""
    w = sae.W_enc.detach()
    sample = w.reshape(-1)[:: max(1, w.numel() // 65536)][:65536].to("cpu", torch.float32).contiguous()
    digest = hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16]
    return f"{type(sae).__name__}:{tuple(w.shape)}:{digest}"


@torch.no_grad()
def feature_stats(
    sae: Any,
    batches: Iterable[Any],
    *,
    model: Any = None,
    hook_name: Optional[str] = None,
    conditioned_hook: Optional[str] = None,
    stats: Optional[FeatureStats] = None,
    progress: bool = True,
    total: Optional[int] = None,
    **config: Any,
) -> FeatureStats:
    """Stream a dataset through ``sae.encode_sparse`` into a :class:`FeatureStats`.

    Args:
        sae: a sparsekern SAE/transcoder (``encode_sparse``, ``W_enc``, ``cfg.d_sae``).
        batches: with ``model``: token batches ``[batch, pos]`` run through ``model.run_with_cache`` (stopping
            after the last block needed). Without: activation batches ``[batch, pos, d_in]``, or pairs
            ``(x, y)`` when conditioning.
        hook_name: the hook the SAE reads; default ``sae.cfg.metadata.hook_name``.
        conditioned_hook: a hook cached alongside (e.g. ``blocks.0.mlp.hook_post``, ``[batch, pos, ...]``,
            trailing dims flattened to d_y) and passed as ``y``; ``conditioned_on`` defaults to its width.
        stats: continue an existing state (updated in place); it must come from the same SAE and hooks.
        progress, total: tqdm bar and its length if ``batches`` has no ``len``.
        config: :class:`FeatureStats` arguments for a new state (``cooccurrence=True``, ...). ``source``
            defaults to the SAE's fingerprint and the hooks, so states from another SAE refuse to merge.

    Returns the :class:`FeatureStats` (on the SAE's device).
    """
    d_sae = sae.cfg.d_sae
    device = sae.W_enc.device
    if model is not None and hook_name is None:
        hook_name = sae.cfg.metadata.get("hook_name")
        if hook_name is None:
            raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    source = config.pop("source", None) or json.dumps(
        {"sae": sae_fingerprint(sae), "hook_name": hook_name, "conditioned_hook": conditioned_hook},
        sort_keys=True)
    if stats is not None:
        if config:
            raise ValueError(f"pass either stats or FeatureStats arguments, not both (got {sorted(config)})")
        if stats.d_sae != d_sae:
            raise ValueError(f"stats has d_sae={stats.d_sae} but the SAE has d_sae={d_sae}")
        if stats.config["source"] != source:
            raise ValueError(f"stats comes from source {stats.config['source']!r}, not {source!r}")
    names = [h for h in (hook_name, conditioned_hook) if h is not None]
    stop = stop_layer(names)
    for batch in tqdm(batches, total=total, disable=not progress, desc="feature stats"):
        y = None
        if model is not None:
            if not isinstance(batch, Tensor) or batch.dim() != 2:
                raise ValueError(f"with a model, batches must be tokens [batch, pos], got {_shape(batch)}")
            _, cache = model.run_with_cache(batch, names_filter=names, stop_at_layer=stop)
            x = cache[hook_name]
            if conditioned_hook is not None:
                y = cache[conditioned_hook]
        elif conditioned_hook is not None or isinstance(batch, (tuple, list)):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    "without a model, conditioned batches must be pairs (x [batch, pos, d_in], y)")
            x, y = batch
        else:
            x = batch
        if x.dim() < 3:
            raise ValueError(f"activations must be [batch, pos, d_in], got {tuple(x.shape)}")
        acts = sae.encode_sparse(x.to(device=device, dtype=sae.W_enc.dtype))
        if y is not None:
            y = y.to(device).reshape(*acts.shape[:-1], -1)
        if stats is None:
            d_y = y.shape[-1] if y is not None else None
            config.setdefault("conditioned_on", d_y)
            stats = FeatureStats(d_sae, source=source, device=device, **config)
        stats.update(acts, y)
    if stats is None:
        stats = FeatureStats(d_sae, source=source, device=device, **config)
    return stats


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
