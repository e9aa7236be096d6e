"""top_activating_examples on tiny random data vs a brute-force dense top-k over the whole dataset."""

import math

import pytest
import torch

import sparsekern as sk
from sparsekern.features import top_activating_examples


def tiny_sae(arch="topk", d_in=12, d_sae=40, seed=0):
    torch.manual_seed(seed)
    if arch == "topk":
        sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    else:
        sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # random biases: more features fire, and not all positive
    return sae


def same(state, v, loc):
    """Locations exactly; values to fp32 rounding (the batched sparse encode and the one dense
    encode of everything round differently in the last bit)."""
    assert torch.equal(state.locations, loc)
    assert torch.equal(state.values == -math.inf, v == -math.inf)
    f = v > -math.inf
    assert torch.allclose(state.values.double()[f], v[f], rtol=1e-5, atol=1e-6)


def brute_force(sae, acts, k):
    """Dense codes of every token; per feature the k largest positive values and their (seq, pos)."""
    with torch.no_grad():
        dense = sae.encode(acts).double()  # [S, P, d_sae]
    S, P, d_sae = dense.shape
    flat = dense.reshape(S * P, d_sae).t()  # [d_sae, S*P]
    flat = torch.where(flat > 0, flat, -math.inf)
    v, r = flat.topk(k, dim=1)
    loc = torch.stack([r // P, r % P], -1)
    loc[v == -math.inf] = -1
    return v, loc


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_matches_brute_force(arch):
    sae = tiny_sae(arch)
    acts = torch.randn(10, 7, 12)
    state = top_activating_examples(sae, list(acts.split(3)), k=5, progress=False)
    v, loc = brute_force(sae, acts, 5)
    assert state.values.dtype == torch.float32
    same(state, v, loc)
    assert int(state.count().sum()) > 0


def test_continue_state_and_seq_offset():
    sae = tiny_sae()
    acts = torch.randn(8, 5, 12)
    first = top_activating_examples(sae, [acts[:3]], k=4, progress=False)
    both = top_activating_examples(sae, [acts[3:5], acts[5:]], state=first, seq_offset=3, progress=False)
    v, loc = brute_force(sae, acts, 4)
    assert both is first
    same(both, v, loc)


def test_with_tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=12, n_ctx=8, d_head=4, n_heads=3, d_vocab=30,
                                  act_fn="relu", seed=0)
    model = HookedTransformer(cfg)
    hook = "blocks.0.hook_resid_post"
    sae = tiny_sae()
    sae.cfg.metadata.hook_name = hook
    tokens = torch.randint(0, 30, (6, 8))
    tokens[:, 0] = torch.arange(6)  # distinct prefixes: no two tokens share an activation (no ties)
    state = top_activating_examples(sae, tokens.split(4), k=3, model=model, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    v, loc = brute_force(sae, cache[hook], 3)
    same(state, v, loc)


def test_bad_input():
    sae = tiny_sae()
    with pytest.raises(ValueError, match=r"activations must be \[batch, pos, d_in\] or \[rows, d_in\]"):
        top_activating_examples(sae, [torch.randn(12)], progress=False)  # [rows, d_in] is fine (issue 11)
    with pytest.raises(ValueError, match="state has d_sae=3"):
        top_activating_examples(sae, [], state=sk.ops.FeatureTopKState.empty(3, 2), progress=False)
    with pytest.raises(ValueError, match="hook_name is required"):
        top_activating_examples(sae, [], model=object(), progress=False)
