"""sparsekern.hook_names: the one rule turning a TransformerLens hook name into the block computing it
(read by training's activation store, feature statistics / top examples / metrics and feature ablation)."""

from sparsekern.hook_names import block_index, layer_of, stop_layer


def test_block_index():
    assert block_index("blocks.0.hook_resid_pre") == 0
    assert block_index("blocks.11.attn.hook_z") == 11
    assert block_index("blocks.3.hook_mlp_out", n_layers=4) == 3
    assert block_index("blocks.4.hook_mlp_out", n_layers=4) is None  # past the model's last block
    for other in ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "unembed", "blocks.x.hook",
                  "xblocks.1.hook_resid_pre", "blocks.2"):
        assert block_index(other) is None, other


def test_layer_of_maps_ln_final_after_the_last_block():
    assert layer_of("blocks.2.hook_resid_post", 4) == 2
    assert layer_of("ln_final.hook_normalized", 4) == 4
    assert layer_of("hook_embed", 4) is None


def test_stop_layer():
    assert stop_layer("blocks.1.hook_resid_pre") == 2
    assert stop_layer(["blocks.0.mlp.hook_post", "blocks.3.hook_resid_pre"]) == 4
    assert stop_layer(iter(["blocks.2.attn.hook_z"])) == 3  # any iterable
    # a hook outside the blocks (or no hook) needs the whole model
    assert stop_layer(["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]) is None
    assert stop_layer(["hook_embed"]) is None
    assert stop_layer([]) is None
