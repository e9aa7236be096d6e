"""Top activating examples of every SAE feature, streamed batch by batch in O(d_sae * k) memory.

Activations (or tokens run through a TransformerLens model) go through ``sae.encode_sparse`` and
:func:`sparsekern.ops.feature_topk_update`; only the sparse code of one batch exists at a time.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ops.feature_topk import FeatureTopKState, feature_topk_update


def _stop_layer(hook_name: str) -> Optional[int]:
    """``blocks.L.*`` hooks are computed by block L: the model can stop after it."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) + 1 if m else None


@torch.no_grad()
def top_activating_examples(
    sae: Any,
    batches: Iterable[Tensor],
    *,
    k: int = 20,
    model: Any = None,
    hook_name: Optional[str] = None,
    state: Optional[FeatureTopKState] = None,
    seq_offset: int = 0,
    progress: bool = True,
    total: Optional[int] = None,
) -> FeatureTopKState:
    """The k largest activations of every feature of ``sae`` over a stream, with their locations.

    Args:
        sae: a sparsekern SAE (anything with ``encode_sparse`` and ``cfg.d_sae``).
        batches: without ``model``, activation batches ``[batch, pos, d_in]``; with ``model``, token
            batches ``[batch, pos]`` (int64) run through ``model.run_with_cache`` up to ``hook_name``.
            Sequences are numbered consecutively across batches, starting at ``seq_offset``.
        k: examples kept per feature (ignored if ``state`` is given).
        model: optional TransformerLens ``HookedTransformer``.
        hook_name: the hook whose activations the SAE reads; default ``sae.cfg.metadata.hook_name``.
        state: continue from an existing :class:`FeatureTopKState` (updated in place); pass
            ``seq_offset`` = the number of sequences it has seen so locations stay unique.
        seq_offset: sequence number of the first sequence of the first batch.
        progress: show a tqdm bar; ``total`` is its length if ``batches`` has no ``len``.

    Returns :class:`FeatureTopKState` with ``values [d_sae, k]`` (float32, -inf when fewer than k
    positive activations were seen) and ``locations [d_sae, k, 2]`` = (sequence, position), -1 when
    empty. Ties go to the smaller (sequence, position).
    """
    d_sae = sae.cfg.d_sae
    device = sae.W_enc.device
    if state is None:
        state = FeatureTopKState.empty(d_sae, k, device=device)
    elif state.d_sae != d_sae:
        raise ValueError(f"state has d_sae={state.d_sae} but the SAE has d_sae={d_sae}")
    if model is not None and hook_name is None:
        hook_name = sae.cfg.metadata.get("hook_name")
        if hook_name is None:
            raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    seq = seq_offset
    for batch in tqdm(batches, total=total, disable=not progress, desc="top activating examples"):
        if model is not None:
            if batch.dim() != 2:
                raise ValueError(f"with a model, batches must be tokens [batch, pos], got {tuple(batch.shape)}")
            _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=_stop_layer(hook_name))
            x = cache[hook_name]
        else:
            x = batch
        if x.dim() < 3:  # [batch, pos, d_in] (or [batch, pos, heads, d_head] for hook_z SAEs)
            raise ValueError(f"activations must be [batch, pos, d_in], got {tuple(x.shape)}")
        acts = sae.encode_sparse(x.to(device=device, dtype=sae.W_enc.dtype))
        state = feature_topk_update(state, acts, seq_offset=seq, inplace=True)
        seq += x.shape[0]
    return state
