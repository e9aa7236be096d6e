"""Top activating examples of every SAE feature, streamed batch by batch in O(d_sae * k) memory.

Activations (or tokens run through a TransformerLens model) go through ``sae.encode_sparse`` and
:func:`sparsekern.ops.feature_topk_update`; only the sparse code of one batch exists at a time.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..hook_names import stop_layer
from ..ops.feature_topk import FeatureTopKState, feature_topk_update


def _sae_d_sae(sae: Any) -> int:
    d_sae = getattr(sae, "d_sae", None)  # Dunefsky's SparseAutoencoder; sparsekern SAEs: cfg.d_sae
    return int(d_sae if d_sae is not None else sae.cfg.d_sae)


def _sae_hook_name(sae: Any) -> Optional[str]:
    metadata = getattr(sae.cfg, "metadata", None)
    if metadata is not None:
        return metadata.get("hook_name")
    return getattr(sae.cfg, "hook_point", None)  # Dunefsky's config names it hook_point


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
        sae: a sparsekern SAE, or Dunefsky's :class:`sparsekern.compat.transcoder_circuits.SparseAutoencoder`
            (anything with ``encode_sparse``, ``W_enc`` and ``cfg.d_sae``).
        batches: without ``model``, float activation batches ``[batch, pos, d_in]``, or flattened rows
            ``[rows, d_in]`` (each row is then its own sequence: location ``(row, 0)``); with ``model``,
            integer token batches ``[batch, pos]`` run through ``model.run_with_cache`` up to ``hook_name``.
            Sequences (rows) are numbered consecutively across batches, starting at ``seq_offset``.
            A hook_z SAE also takes ``[..., n_heads, d_head]``.
        k: examples kept per feature (ignored if ``state`` is given).
        model: optional TransformerLens ``HookedTransformer``.
        hook_name: the hook whose activations the SAE reads; default ``sae.cfg.metadata.hook_name``
            (``sae.cfg.hook_point`` for Dunefsky's class).
        state: continue from an existing :class:`FeatureTopKState` (updated in place); pass
            ``seq_offset`` = the number of sequences it has seen so locations stay unique.
        seq_offset: sequence number of the first sequence of the first batch.
        progress: show a tqdm bar; ``total`` is its length if ``batches`` has no ``len``.

    Returns :class:`FeatureTopKState` with ``values [d_sae, k]`` (float32, -inf when fewer than k
    positive activations were seen) and ``locations [d_sae, k, 2]`` = (sequence, position), -1 when
    empty. Ties go to the smaller (sequence, position).
    """
    if not callable(getattr(sae, "encode_sparse", None)) or not hasattr(sae, "W_enc"):
        raise TypeError(
            "sae must be a sparsekern SAE or a sparsekern.compat.transcoder_circuits.SparseAutoencoder "
            f"(with encode_sparse and W_enc), got {type(sae).__name__}; convert a sae_lens SAE with "
            "sparsekern.SAE.from_sae_lens(sae)"
        )
    d_sae = _sae_d_sae(sae)
    d_in = sae.W_enc.shape[0]
    device = sae.W_enc.device
    if state is None:
        state = FeatureTopKState.empty(d_sae, k, device=device)
    elif state.d_sae != d_sae:
        raise ValueError(f"state has d_sae={state.d_sae} but the SAE has d_sae={d_sae}")
    if model is not None and hook_name is None:
        hook_name = _sae_hook_name(sae)
        if hook_name is None:
            raise ValueError("hook_name is required: the SAE's metadata names no hook_name")
    seq = seq_offset
    for batch in tqdm(batches, total=total, disable=not progress, desc="top activating examples"):
        if not isinstance(batch, Tensor):
            raise TypeError(f"batches must yield torch.Tensor, got {type(batch).__name__}")
        if model is not None:
            # checked here: float tokens would otherwise fail deep inside the embedding
            if batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
                raise TypeError(
                    f"with a model, batches must be integer tokens [batch, pos], got dtype {batch.dtype}"
                )
            if batch.dim() != 2:
                raise ValueError(
                    f"with a model, batches must be tokens [batch, pos], got shape {tuple(batch.shape)}"
                )
            _, cache = model.run_with_cache(
                batch, names_filter=hook_name, stop_at_layer=stop_layer(hook_name)
            )
            x = cache[hook_name]
        else:
            if not batch.dtype.is_floating_point:
                raise TypeError(
                    f"activations must be a float tensor [batch, pos, d_in] or [rows, d_in], got dtype "
                    f"{batch.dtype} (tokens? pass model=)"
                )
            x = batch
        # a hook_z SAE reads [..., n_heads, d_head]: two feature dims instead of one
        feature_dims = 2 if getattr(sae, "hook_z_reshaping_mode", False) and x.shape[-1] != d_in else 1
        lead = x.dim() - feature_dims
        if lead == 1:  # flattened rows: each row is sequence `seq + row`, position 0
            x = x.unsqueeze(1)
        elif lead != 2:
            raise ValueError(
                f"activations must be [batch, pos, d_in] or [rows, d_in] (d_in={d_in}), got {tuple(x.shape)}"
            )
        acts = sae.encode_sparse(x.to(device=device, dtype=sae.W_enc.dtype))
        state = feature_topk_update(state, acts, seq_offset=seq, inplace=True)
        seq += x.shape[0]
    return state
