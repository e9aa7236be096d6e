"""Index grids and patch setters, behaviour-identical to ``transformer_lens.patching``.

A setter takes ``(corrupted_activation, index, clean_activation)`` for one corrupted batch, writes the
clean slice selected by ``index`` into the corrupted activation (in place) and returns it. The fused
engine recognises these setters (and TransformerLens's own) by identity and applies many of them at
once; any other setter is run one patch at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pandas as pd
import torch

__all__ = [
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "make_df_from_ranges",
]


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]) -> pd.DataFrame:
    """Cartesian product of ``range(m)`` for each column, last column fastest (TransformerLens order).

    Returns a DataFrame with ``prod(column_max_ranges)`` rows and the given column names.
    """
    rows = list(itertools.product(*[range(m) for m in column_max_ranges]))
    return pd.DataFrame(rows, columns=column_names)


def axis_sizes(cfg, pos: int, activation_name: str) -> dict[str, int]:
    """The size of each index axis name of a sweep over ``activation_name`` (TransformerLens's
    ``max_range``): ``layer`` (``cfg.n_layers``), ``pos`` / ``src_pos`` / ``dest_pos`` (``pos``, the
    sequence length) and ``head_index`` / ``head`` (``cfg.n_heads``; ``cfg.n_key_value_heads`` for
    ``k`` / ``v`` under grouped-query attention)."""
    n_heads = cfg.n_heads
    if activation_name in ("k", "v") and cfg.n_key_value_heads is not None:
        n_heads = cfg.n_key_value_heads  # GQA: keys/values have fewer heads (TransformerLens rule)
    return {"layer": cfg.n_layers, "pos": pos, "src_pos": pos, "dest_pos": pos,
            "head_index": n_heads, "head": n_heads}


def layer_pos_patch_setter(corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor):
    """index = [layer, pos]; activation ``[batch, pos, ...]``: copy ``clean[:, pos]``."""
    assert len(index) == 2
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(
    corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor
):
    """index = [layer, pos, head]; activation ``[batch, pos, head, d_head]``: copy ``clean[:, pos, head]``."""
    assert len(index) == 3
    _, pos, head_index = index
    corrupted_activation[:, pos, head_index] = clean_activation[:, pos, head_index]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor):
    """index = [layer, head]; activation ``[batch, pos, head, d_head]``: copy ``clean[:, :, head]``."""
    assert len(index) == 2
    _, head_index = index
    corrupted_activation[:, :, head_index] = clean_activation[:, :, head_index]
    return corrupted_activation


def layer_head_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor
):
    """index = [layer, head]; activation ``[batch, head, dest, src]``: copy ``clean[:, head]``."""
    assert len(index) == 2
    _, head_index = index
    corrupted_activation[:, head_index, :, :] = clean_activation[:, head_index, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor
):
    """index = [layer, head, dest]; activation ``[batch, head, dest, src]``: copy ``clean[:, head, dest]``."""
    assert len(index) == 3
    _, head_index, dest_pos = index
    corrupted_activation[:, head_index, dest_pos, :] = clean_activation[:, head_index, dest_pos, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor
):
    """index = [layer, head, dest, src]; activation ``[batch, head, dest, src]``: copy one entry per batch."""
    assert len(index) == 4
    _, head_index, dest_pos, src_pos = index
    corrupted_activation[:, head_index, dest_pos, src_pos] = clean_activation[
        :, head_index, dest_pos, src_pos
    ]
    return corrupted_activation


# kind name -> (index length). The engine's vectorised version of each setter is keyed by kind.
_OWN_KINDS = {
    layer_pos_patch_setter: "pos",
    layer_pos_head_vector_patch_setter: "pos_head",
    layer_head_vector_patch_setter: "head",
    layer_head_pattern_patch_setter: "pattern_head",
    layer_head_pos_pattern_patch_setter: "pattern_dest",
    layer_head_dest_src_pos_pattern_patch_setter: "pattern_dest_src",
}
INDEX_LEN = {"pos": 2, "pos_head": 3, "head": 2, "pattern_head": 2, "pattern_dest": 3, "pattern_dest_src": 4}
# kind -> the activation axis each index entry after the layer selects (e.g. pos_head: act[:, pos, head])
INDEX_AXES = {
    "pos": (1,),
    "pos_head": (1, 2),
    "head": (2,),
    "pattern_head": (1,),
    "pattern_dest": (1, 2),
    "pattern_dest_src": (1, 2, 3),
}


def setter_kind(setter) -> str | None:
    """The engine's name for a known setter (ours or TransformerLens's), else None."""
    kind = _OWN_KINDS.get(setter)
    if kind is not None:
        return kind
    try:  # TransformerLens's setters behave identically; recognise them by identity too
        import transformer_lens.patching as tlp
    except Exception:  # pragma: no cover - transformer_lens is a dependency of this subpackage
        return None
    for name, own in (
        ("layer_pos_patch_setter", layer_pos_patch_setter),
        ("layer_pos_head_vector_patch_setter", layer_pos_head_vector_patch_setter),
        ("layer_head_vector_patch_setter", layer_head_vector_patch_setter),
        ("layer_head_pattern_patch_setter", layer_head_pattern_patch_setter),
        ("layer_head_pos_pattern_patch_setter", layer_head_pos_pattern_patch_setter),
        ("layer_head_dest_src_pos_pattern_patch_setter", layer_head_dest_src_pos_pattern_patch_setter),
    ):
        if setter is getattr(tlp, name, None):
            return _OWN_KINDS[own]
    return None
