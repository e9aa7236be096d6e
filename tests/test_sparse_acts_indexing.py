"""``SparseActs`` indexed like a tensor over its leading dims (never across k), and inside TransformerLens's
``ActivationCache`` utilities (batch slices, position slices, device moves, ``remove_batch_dim``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsekern as sk

from _tiny_models import D, D_SAE, T, hooked_sae_transformer, one_thread, tokens


def sparse_acts(*lead: int, k: int = 3) -> sk.SparseActs:
    g = torch.Generator().manual_seed(0)
    return sk.SparseActs(torch.rand(*lead, k, generator=g), torch.randint(0, 50, (*lead, k), generator=g))


def same_acts(a: sk.SparseActs, values: torch.Tensor, indices: torch.Tensor) -> None:
    assert isinstance(a, sk.SparseActs)
    assert torch.equal(a.values, values) and torch.equal(a.indices, indices)


def test_sparse_acts_indexing_leading_dims():
    acts = sparse_acts(2, 5)
    v, i = acts.values, acts.indices
    same_acts(acts[0, -1], v[0, -1], i[0, -1])
    same_acts(acts[1], v[1], i[1])
    same_acts(acts[:, 1:4], v[:, 1:4], i[:, 1:4])
    same_acts(acts[..., -1], v[:, -1], i[:, -1])  # '...' spans the leading dims only
    same_acts(acts[..., 0, :], v[0], i[0])
    same_acts(acts[torch.tensor([1, 0, 1])], v[[1, 0, 1]], i[[1, 0, 1]])
    mask = torch.tensor([[True, False, True, False, False]] * 2)
    same_acts(acts[mask], v[mask], i[mask])
    same_acts(acts[np.array([0, 0])], v[[0, 0]], i[[0, 0]])
    same_acts(acts[None, 0], v[None, 0], i[None, 0])
    same_acts(acts[0, 2, :], v[0, 2], i[0, 2])  # an explicit full ':' on k is allowed
    assert acts[0, -1].shape == (3,) and acts[0, -1].l0().shape == ()
    for key in ((0, 1, 0), (0, 1, slice(0, 2)), (0, 0, 0, 0), (Ellipsis, 0, 0, 0)):
        with pytest.raises(IndexError, match="SparseActs"):
            acts[key]
    with pytest.raises(IndexError):
        acts[2]  # out of range, as torch


@torch.no_grad()
def test_sparse_cache_supports_activation_cache_utilities():
    pytest.importorskip("transformer_lens")
    from transformer_lens.utilities.slice import Slice

    with one_thread():
        model = hooked_sae_transformer()
        sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
        sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
        sae.b_enc.normal_(0, 0.2)
        key = "blocks.1.hook_resid_pre.hook_sae_acts_post"
        toks = tokens(batch=3)
        _, cache = model.run_with_cache_with_saes(toks, saes=[sae], sparse=True)
        _, single = model.run_with_cache_with_saes(toks[:1], saes=[sae], sparse=True)
    acts = cache[key]
    assert isinstance(acts, sk.SparseActs)
    assert acts.ndim == acts.dim() == 3 and acts.size() == acts.shape and acts.size(0) == 3
    assert acts.size(-2) == T and acts.device == torch.device("cpu")
    for moved in (acts.detach(), acts.cpu(), acts.clone(), acts.to("cpu")):
        same_acts(moved, acts.values, acts.indices)
    assert acts.clone().values.data_ptr() != acts.values.data_ptr()

    one = cache.apply_slice_to_batch_dim(1)
    same_acts(one[key], acts.values[1], acts.indices[1])
    assert not one.has_batch_dim
    two = cache.apply_slice_to_batch_dim((0, 2))
    same_acts(two[key], acts.values[:2], acts.indices[:2])
    picked = cache.apply_slice_to_batch_dim([2, 0])
    same_acts(picked[key], acts.values[[2, 0]], acts.indices[[2, 0]])
    # the position slices TransformerLens's helpers apply with dim=-2
    same_acts(Slice(-1).apply(acts, dim=-2), acts.values[:, -1], acts.indices[:, -1])
    same_acts(Slice((1, 4)).apply(acts, dim=-2), acts.values[:, 1:4], acts.indices[:, 1:4])
    cache.to("cpu")
    assert isinstance(cache[key], sk.SparseActs)

    full = single[key]
    single.remove_batch_dim()
    same_acts(single[key], full.values[0], full.indices[0])
    assert single["hook_embed"].shape == (T, D)
