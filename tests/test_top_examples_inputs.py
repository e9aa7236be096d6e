"""``top_activating_examples`` on the inputs users pass it: Jacob Dunefsky's SparseAutoencoder, seed 001's
flattened ``[rows, d_in]`` batches, token batches with a model (his ``cfg.hook_point`` as the default
hook), and bad tokens / activations refused up front with a message naming what was expected."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformer_lens")

import sparsekern as sk  # noqa: E402
from sparsekern.features import top_activating_examples  # noqa: E402

from _bounds import assert_threshold_decided, assert_topk_decided, encoder_err  # noqa: E402
from _tiny_models import D, D_SAE, dunefsky, hooked_sae_transformer, one_thread, tokens  # noqa: E402

# float64 throughout: the state's values and locations are compared with a brute force over a code
# encoded in other batches (and, with a model, from activations of another batch size), so both sides
# differ by rounding only, bounded below and asserted to be far smaller than every gap that decides a
# location


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model() -> sk.HookedSAETransformer:
    return hooked_sae_transformer(torch.float64)


def brute_force(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature the k largest positive values of a dense [S, P, d_sae] code and their (seq, pos)."""
    S, P, d_sae = dense.shape
    flat = dense.double().reshape(S * P, d_sae).t()
    v, r = torch.where(flat > 0, flat, -math.inf).topk(k, dim=1)
    loc = torch.stack([r // P, r % P], -1)
    loc[v == -math.inf] = -1
    return v, loc


def assert_decided(tc, acts: torch.Tensor, k: int, slack: float = 0.0) -> None:
    """Every feature's k+1 best rows are apart by more than twice the float64 rounding bound of the
    pre-activations (plus ``slack``), and none of them is within it of 0 (the candidate cut): the
    locations are then exact on any machine."""
    x = acts.reshape(-1, D)
    pre = (x.double() - tc.b_dec.double()) @ tc.W_enc.double() + tc.b_enc.double()
    err = encoder_err(x, tc.W_enc, tc.b_enc, tc.b_dec) + slack
    assert_topk_decided(pre.t(), err.t(), k)
    top = pre.t().topk(k + 1, dim=1).indices
    assert_threshold_decided(pre.t().gather(1, top), 0.0, err.t().gather(1, top), x.dtype)


def assert_state(state, v, loc):
    assert torch.equal(state.locations, loc)
    f = v > -math.inf
    assert torch.equal(state.values == -math.inf, ~f)
    # float64 values from two encodes of the same rows: within 2 gamma(18) sum |terms| ~ 1e-15 here
    torch.testing.assert_close(state.values.double()[f], v[f], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_top_examples_take_dunefsky_class_and_flattened_rows(model):
    tc = dunefsky(dtype=torch.float64)
    acts = torch.randn(5, 4, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_decided(tc, acts, 3)
    v, loc = brute_force(tc.encode(acts), 3)
    assert_state(top_activating_examples(tc, acts.split(2), k=3, progress=False), v, loc)
    # seed 001's flattened [rows, d_in] batches: row r is sequence r, position 0
    rows = acts.reshape(-1, D)
    state = top_activating_examples(tc, rows.split(7), k=3, progress=False)
    v, loc = brute_force(tc.encode(rows)[:, None], 3)
    assert_state(state, v, loc)
    assert bool((state.locations[..., 1][state.locations[..., 0] >= 0] == 0).all())
    # with a model: his cfg.hook_point is the default hook
    toks = tokens(batch=4)
    toks[:, 0] = torch.arange(4)  # distinct prefixes: no ties between sequences
    _, cache = model.run_with_cache(toks, names_filter=tc.cfg.hook_point)
    # the activations of a 3 + 1 split may round differently from the batch of 4: one float64 forward
    # through embed, attention and LN, ~1e-15 relative times a condition of at most ~1e2; 1e-10 covers it
    assert_decided(tc, cache[tc.cfg.hook_point], 3, slack=1e-10)
    v, loc = brute_force(tc.encode(cache[tc.cfg.hook_point]), 3)
    assert_state(top_activating_examples(tc, toks.split(3), k=3, model=model, progress=False), v, loc)


def test_top_examples_reject_bad_tokens_and_activations_up_front():
    class NoModelCall:
        def run_with_cache(self, *a, **kw):
            raise AssertionError("the model must not run on bad tokens")

    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(TypeError, match=r"integer tokens \[batch, pos\].*float32"):
        top_activating_examples(sae, [tokens().float()], model=NoModelCall(), progress=False)
    with pytest.raises(TypeError, match=r"float tensor \[batch, pos, d_in\].*int64.*model="):
        top_activating_examples(sae, [tokens()], progress=False)
    with pytest.raises(ValueError, match=r"\[batch, pos, d_in\] or \[rows, d_in\]"):
        top_activating_examples(sae, [torch.randn(D)], progress=False)
    with pytest.raises(TypeError, match="encode_sparse"):
        top_activating_examples(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
