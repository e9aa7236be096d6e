"""sparsekern.distributed.synthetic: seeded synthetic SAE weights any feature range can be drawn from alone
(the torchrun demo and ``sparsekern bench distributed`` build shards with it, never the whole SAE)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekern.distributed.synthetic import BLOCK, synthetic_block, synthetic_shard_weights


def test_block_follows_its_seeding_contract():
    """Block j comes from its own generator seeded seed * 1_000_003 + j: these numbers must not move
    (the bench's single-process baseline and every shard depend on drawing the same ones)."""
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    w = torch.randn(4, BLOCK, generator=g) / math.sqrt(4)
    b = torch.randn(BLOCK, generator=g) * 0.1
    got_w, got_b = synthetic_block(2, 4, 5)
    assert torch.equal(got_w, w) and torch.equal(got_b, b)


def test_shards_are_slices_of_the_whole_across_block_boundaries():
    d_in, d_sae, seed = 3, 2 * BLOCK + 10, 7
    whole = synthetic_shard_weights(d_in, 0, d_sae, seed)
    assert whole["W_enc"].shape == (d_in, d_sae) and whole["W_dec"].shape == (d_sae, d_in)
    assert torch.equal(whole["W_dec"], whole["W_enc"].T) and whole["W_dec"].is_contiguous()
    bounds = [0, 100, BLOCK - 1, BLOCK + 5, 2 * BLOCK + 3, d_sae]  # shards straddling both block edges
    for lo, hi in zip(bounds, bounds[1:]):
        part = synthetic_shard_weights(d_in, lo, hi, seed)
        assert torch.equal(part["W_enc"], whole["W_enc"][:, lo:hi]), (lo, hi)
        assert torch.equal(part["b_enc"], whole["b_enc"][lo:hi])
        assert torch.equal(part["b_dec"], whole["b_dec"])
    assert not torch.equal(synthetic_shard_weights(d_in, 0, 10, seed + 1)["W_enc"], whole["W_enc"][:, :10])


@pytest.mark.parametrize("args, match", [
    ((0, 0, 4), "d_in must be >= 1"), ((4, 5, 5), "0 <= start < stop"), ((4, -1, 5), "0 <= start < stop"),
])
def test_bad_ranges_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        synthetic_shard_weights(*args)
