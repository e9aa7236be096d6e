"""One ``generic_activation_patch`` request, resolved: its index rows, output shape, setter kind and
hook names, checked against the model and the clean cache as TransformerLens would use them, and turned
into the engine's :class:`Patch` records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ._patches import Patch, is_pattern_hook, is_position_local_hook
from ._setters import INDEX_AXES, INDEX_LEN, axis_sizes, make_df_from_ranges, setter_kind


class Sweep:
    """One ``generic_activation_patch`` call, resolved: index rows, output shape, patch kind."""

    def __init__(self, model, tokens, clean_cache, patch_setter, activation_name, index_axis_names, index_df):
        from transformer_lens import utils as tl_utils

        cfg = model.cfg
        if index_df is None:
            if index_axis_names is None:
                raise ValueError("generic_activation_patch: give index_axis_names or index_df")
            max_range = axis_sizes(cfg, tokens.shape[-1], activation_name)
            bad = [a for a in index_axis_names if a not in max_range]
            if bad:
                raise ValueError(
                    f"index_axis_names: unknown axis name(s) {bad}; choose from {sorted(max_range)}"
                )
            self.shape = [max_range[a] for a in index_axis_names]
            index_df = make_df_from_ranges(self.shape, index_axis_names)
            self.flat = False
        else:
            if not isinstance(index_df, pd.DataFrame):
                raise TypeError(f"index_df must be a pandas DataFrame, got {type(index_df).__name__}")
            # TransformerLens asserts index_axis_names is None here; we also accept the prebuilt functions'
            # bound names when they equal the DataFrame's columns.
            if index_axis_names is not None and list(index_axis_names) != list(index_df.columns):
                raise ValueError(
                    f"index_df was given, so index_axis_names must be None (or equal to its columns "
                    f"{list(index_df.columns)}); got {list(index_axis_names)}"
                )
            _check_index_dtypes(index_df)
            self.shape = [len(index_df)]
            self.flat = True
        self.index_df = index_df
        self.rows = [row.to_list() for _, row in index_df.iterrows()]  # exactly what TransformerLens passes
        self.activation_name = activation_name
        self.setter = patch_setter
        self.kind = setter_kind(patch_setter)
        if self.flat:  # before the cache lookup, which would blame a missing 'blocks.<bad layer>' entry
            self._check_layers(cfg)
        self.hook_names = [tl_utils.get_act_name(activation_name, layer=r[0]) for r in self.rows]
        self._check_cache(model, tokens, clean_cache)
        if self.flat:
            self._check_index_ranges(clean_cache)

    def _check_layers(self, cfg) -> None:
        if len(self.index_df.columns) == 0:
            raise ValueError("index_df has no columns: the first column must be the layer")
        col = self.index_df.columns[0]
        layers = self.index_df[col].to_numpy()
        bad = (layers < 0) | (layers >= cfg.n_layers)
        if bad.any():
            i = int(bad.argmax())
            raise IndexError(
                f"index_df column {col!r} (the layer) row {i}: layer {layers[i]} is out of range for a "
                f"model with n_layers={cfg.n_layers} (valid: 0..{cfg.n_layers - 1})"
            )

    def _check_index_ranges(self, clean_cache) -> None:
        """IndexError for an index outside its activation axis, as TransformerLens's setters raise (the
        fused engine would otherwise wrap positions around silently). Negative indices count from the end."""
        cols = list(self.index_df.columns)
        if self.kind is None or len(cols) != INDEX_LEN[self.kind]:
            return  # an unknown setter indexes the real tensor itself (and raises there)
        shapes = {name: tuple(clean_cache[name].shape) for name in dict.fromkeys(self.hook_names)}
        for col, axis in zip(cols[1:], INDEX_AXES[self.kind]):
            vals = self.index_df[col].to_numpy()
            sizes = np.array([shapes[n][axis] if len(shapes[n]) > axis else 0 for n in self.hook_names])
            bad = (vals < -sizes) | (vals >= sizes)
            if bad.any():
                i = int(bad.argmax())
                name = self.hook_names[i]
                raise IndexError(
                    f"index_df column {col!r} row {i}: index {vals[i]} is out of range for axis {axis} of "
                    f"{name!r} (shape {list(shapes[name])}; valid: {-sizes[i]}..{sizes[i] - 1})"
                )

    def _check_cache(self, model, tokens, clean_cache):
        B, T = tokens.shape[0], tokens.shape[-1]
        for name in dict.fromkeys(self.hook_names):
            try:
                act = clean_cache[name]
            except (KeyError, IndexError, TypeError):
                raise ValueError(
                    f"clean_cache has no activation {name!r} (needed to patch activation_name="
                    f"{self.activation_name!r}); run the clean input with run_with_cache without filtering it out"
                ) from None
            if not isinstance(act, torch.Tensor):
                raise TypeError(f"clean_cache[{name!r}] must be a tensor, got {type(act).__name__}")
            pos_axis = 2 if is_pattern_hook(name) else 1
            if act.dim() <= pos_axis or act.shape[0] != B or act.shape[pos_axis] != T:
                raise ValueError(
                    f"corrupted_tokens has shape {list(tokens.shape)} (batch {B}, pos {T}) but "
                    f"clean_cache[{name!r}] has shape {list(act.shape)}: clean and corrupted runs must have "
                    f"the same batch size and sequence length"
                )

    def reference_runs(self, model, clean_cache) -> list[tuple[list, int | None]]:
        """``(fwd_hooks, layer)`` per index row, for ``run_reference``: the user's setter at the row's hook;
        ``layer`` is the row's block when the hook lies inside it (a run may start from its cached input)."""
        runs = []
        for row, name in zip(self.rows, self.hook_names):

            def hook(act, hook, index=row, clean_act=clean_cache[name]):
                if act.requires_grad:
                    act = act.clone()
                return self.setter(act, index, clean_act)

            layer = row[0]
            inside = (
                isinstance(layer, int) and 0 <= layer < model.cfg.n_layers and name.startswith(f"blocks.{layer}.")
            )
            runs.append(([(name, hook)], layer if inside else None))
        return runs

    def patches(self, sweep_id: int, cfg, T: int, causal: bool) -> list[Patch] | None:
        """Engine patches, or None when the setter is unknown or an index does not fit its kind."""
        if self.kind is None:
            return None
        out = []
        for slot, (row, name) in enumerate(zip(self.rows, self.hook_names)):
            if len(row) != INDEX_LEN[self.kind] or not all(float(v).is_integer() for v in row):
                return None
            layer = int(row[0])
            if not (0 <= layer < cfg.n_layers) or not name.startswith(f"blocks.{layer}."):
                return None
            idx = tuple(int(v) for v in row[1:])
            start = 0
            if causal and is_position_local_hook(name):
                pattern = is_pattern_hook(name)
                # the axis that holds the query/dest position for this kind on this layout
                if self.kind in ("pos", "pos_head") and not pattern:
                    start = idx[0] % T
                elif self.kind in ("pattern_dest", "pattern_dest_src") and pattern:
                    start = idx[1] % T
            out.append(
                Patch(sweep_id, slot, layer, start, name, self.kind, _normalise(idx, self.kind, T, name))
            )
        return out


def _check_index_dtypes(index_df: pd.DataFrame) -> None:
    """Index columns must hold integers: TransformerLens indexes tensors with them, and one float column
    turns every row into floats (layer 1 -> 'blocks.1.0.hook_z')."""

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for col in index_df.columns:
        series = index_df[col]
        ok = pd.api.types.is_integer_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if series.dtype == object:
            ok = all(is_int(v) for v in series)
        if not ok or series.isna().any():
            bad = next((v for v in series if not is_int(v)), None)
            example = f" (e.g. {bad!r})" if bad is not None else ""
            raise TypeError(
                f"index_df column {col!r} must hold integer indices, got dtype {series.dtype}{example}"
            )


def _normalise(idx: tuple, kind: str, T: int, name: str) -> tuple:
    # negative positions are legal Python indices in TransformerLens's setters; shift them to >= 0
    if kind in ("pos", "pos_head") and not is_pattern_hook(name):
        return (idx[0] % T, *idx[1:])
    if kind in ("pattern_dest", "pattern_dest_src") and is_pattern_hook(name):
        return (idx[0], idx[1] % T, *idx[2:])
    return idx
