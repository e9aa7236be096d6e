"""Fused activation patching: the ``transformer_lens.patching`` API, batched (issue 4).

Every public callable of ``transformer_lens.patching`` (same signatures, defaults, output shapes and
``index_df`` behaviour), computed by a batched engine that reuses the corrupted run (see ``_engine``).
Extra keyword-only options: ``progress``, ``max_batch``, ``memory_budget``, ``backend``, ``shard``.
``sparsekern.patching.attribution`` (attribution patching) and ``sparsekern.patching.feature_ablation``
(SAE feature ablation sweeps) are imported lazily on first access.

Seams for code built on the engine (distributed sweeps, new sweeps):

* :class:`Shard` ``(rank, world)``: pass ``shard=`` to a sweep to run one share of its plan; the other
  entries are 0, so the shares' outputs sum to the full result bitwise.
* :class:`Engine` (the cached corrupted run and the batched patches) with its extension points
  ``noop_patches`` / ``patch_hooks`` and :class:`Patch` (one patch); :func:`default_budget` (bytes a
  chunk may use by default on a device); :data:`Metric` (the metric's type).
"""

from __future__ import annotations

import importlib

from ._api import (
    generic_activation_patch,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_pre,
)
from ._common import Metric, Shard
from ._engine import Engine, default_budget
from ._patches import Patch
from ._setters import (
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
)

__all__ = [
    "Engine",
    "Metric",
    "Patch",
    "Shard",
    "default_budget",
    "generic_activation_patch",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_pre",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "make_df_from_ranges",
]


def __getattr__(name: str):
    # submodules kept off the import of the patching API; loaded when asked for
    if name in ("attribution", "feature_ablation"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
