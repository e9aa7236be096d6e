"""``index_df`` of ``generic_activation_patch``: out-of-range indices raise IndexError and non-integer
columns a TypeError, each naming the column, before anything runs; negative indices still count from the
end, as in TransformerLens."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

tlp = pytest.importorskip("transformer_lens.patching")

import sparsekern.patching as skp  # noqa: E402

from _tiny_models import T, hooked_transformer, one_thread, tokens  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def patch_setup():
    # float64: sparsekern's batched patched runs and TransformerLens's one-by-one runs round differently
    # (other GEMM shapes); in float64 that is ~1e-15 relative times the model's condition (<= ~1e2),
    # so the 1e-5 comparison below holds on any machine (a worst-case fp32 bound would not support it)
    m = hooked_transformer(torch.float64)
    clean, corr = tokens(seed=4), tokens(seed=5)
    with torch.no_grad():
        _, cache = m.run_with_cache(clean)
    return m, corr, cache


def metric(logits):
    return logits[:, -1, 3].mean()


@pytest.mark.parametrize("setter,act,cols,bad", [
    ("layer_pos_patch_setter", "resid_pre", {"layer": [1, 0], "pos": [2, T]}, "pos"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [0], "pos": [-T - 1]}, "pos"),
    ("layer_pos_head_vector_patch_setter", "z", {"layer": [0], "pos": [T + 3], "head": [1]}, "pos"),
    ("layer_pos_head_vector_patch_setter", "z", {"layer": [0], "pos": [1], "head": [4]}, "head"),
    ("layer_head_vector_patch_setter", "v", {"layer": [1], "head": [-5]}, "head"),
    ("layer_head_pos_pattern_patch_setter", "pattern", {"layer": [0], "head": [1], "dest": [T]}, "dest"),
    ("layer_head_dest_src_pos_pattern_patch_setter", "pattern",
     {"layer": [0], "head": [1], "dest": [2], "src": [T]}, "src"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [2], "pos": [0]}, "layer"),
    ("layer_pos_patch_setter", "resid_pre", {"layer": [-1], "pos": [0]}, "layer"),
])
def test_index_df_out_of_range_raises_index_error(patch_setup, setter, act, cols, bad):
    m, corr, cache = patch_setup
    df = pd.DataFrame(cols)
    with pytest.raises(IndexError, match=f"index_df column '{bad}'"):
        skp.generic_activation_patch(m, corr, cache, metric, getattr(skp, setter), act, index_df=df,
                                     progress=False)
    if bad != "layer":  # TransformerLens's setters raise IndexError on the same rows
        with pytest.raises(IndexError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tlp.generic_activation_patch(m, corr, cache, metric, getattr(tlp, setter), act, index_df=df)


def test_index_df_negative_indices_still_match_transformer_lens(patch_setup):
    m, corr, cache = patch_setup
    df = pd.DataFrame({"layer": [0, 1], "pos": [-1, -T], "head": [-1, -4]})
    ours = skp.generic_activation_patch(m, corr, cache, metric, skp.layer_pos_head_vector_patch_setter, "z",
                                        index_df=df, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tlp.generic_activation_patch(m, corr, cache, metric, tlp.layer_pos_head_vector_patch_setter,
                                            "z", index_df=df)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols,bad", [
    ({"layer": [0, 1], "pos": [1.0, 2.0]}, "pos"),
    ({"layer": [0, 1], "pos": [0.5, 2]}, "pos"),
    ({"layer": [0.0, 1.0], "pos": [1, 2]}, "layer"),
    ({"layer": [0, 1], "pos": [True, False]}, "pos"),
    ({"layer": [0, 1], "pos": pd.Series([1, "2"], dtype=object)}, "pos"),
])
def test_index_df_float_columns_are_a_type_error_naming_the_column(patch_setup, cols, bad):
    m, corr, cache = patch_setup
    with pytest.raises(TypeError, match=f"index_df column '{bad}' must hold integer indices"):
        skp.generic_activation_patch(m, corr, cache, metric, skp.layer_pos_patch_setter, "resid_pre",
                                     index_df=pd.DataFrame(cols), progress=False)
