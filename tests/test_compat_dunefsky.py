"""Jacob Dunefsky's ``SparseAutoencoder`` (``sparsekern.compat.transcoder_circuits``) spliced into a
HookedSAETransformer by ``add_sae`` / ``run_with_saes`` exactly as his own forward would be, and other
modules refused with a clear TypeError. Tiny random-weight models (tests/_tiny_models.py).

Numbers are compared in float64. The two sides differ only by rounding (sparse kernels and folded
biases against his forward), and a worst-case fp32 bound would not support a 1e-5 tolerance on the
logits: the splice's bound (his 48-feature code through W_dec, ~1.2e-4 on mlp_out) times the rest of
the model's |d logits / d mlp_out| row sums (<= 14, measured in float64) is ~1e-3. In float64 every
bound is 2^-29 of that, ~2e-12, so each tolerance below holds on any machine by a factor of >= 1e6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformer_lens")

import sparsekern as sk  # noqa: E402

from _tiny_models import dunefsky, hooked_sae_transformer, one_thread, tokens  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model() -> sk.HookedSAETransformer:
    return hooked_sae_transformer(torch.float64)


@torch.no_grad()
def test_dunefsky_transcoder_splices_like_his_forward(model):
    tc = dunefsky(dtype=torch.float64)
    toks = tokens()
    captured = {}

    def grab(x, hook):
        captured["x"] = x

    def replace(act, hook):
        return tc(captured["x"])[0]  # his forward on the MLP input, in place of the MLP output

    want = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.ln2.hook_normalized", grab),
                                                 ("blocks.0.hook_mlp_out", replace)])
    got = model.run_with_saes(toks, saes=[tc])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # with the error term the model's own output comes back: mlp_out is off by one rounding of
    # recon + (mlp_out - recon) (float64, ~1e-16 relative) and then by the rest of the model, ~1e-15
    torch.testing.assert_close(model.run_with_saes(toks, saes=[tc], use_error_term=True), model(toks),
                               rtol=1e-4, atol=1e-4)

    model.add_sae(tc)
    try:
        assert model.acts_to_saes == {"blocks.0.ln2.hook_normalized": tc}
        twin = sk.hooked_sae_transformer.as_sparsekern_sae(tc)
        assert isinstance(twin, sk.Transcoder)
        assert twin.W_enc is tc.W_enc and twin.W_dec is tc.W_dec and twin.b_dec is tc.b_dec_out  # shared
        _, cache = model.run_with_cache(toks)
        # the code itself: two float64 encodes (folded b_enc / his pre-bias), each within
        # gamma(18) * sum |terms| ~ 1e-15 of the exact one
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out.hook_sae_acts_post"],
                                   tc(captured["x"])[1], rtol=1e-5, atol=1e-6)
    finally:
        model.reset_saes()
    # an in-place edit of a weight the folded b_enc comes from is picked up by the next add_sae
    tc.b_dec.add_(0.5)
    model.run_with_hooks(toks, fwd_hooks=[("blocks.0.ln2.hook_normalized", grab)])
    torch.testing.assert_close(
        model.run_with_saes(toks, saes=[tc]),
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_mlp_out", replace)]), rtol=1e-5, atol=1e-5,
    )


@torch.no_grad()
def test_dunefsky_plain_sae_splices_and_other_modules_are_a_type_error(model):
    sae = dunefsky(transcoder=False, seed=1, dtype=torch.float64)
    toks = tokens()
    want = model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: sae(a)[0])])
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]), want, rtol=1e-5, atol=1e-5)
    twin = sae.to_sparsekern(share_weights=True)
    assert isinstance(twin, sk.StandardSAE) and all(
        getattr(twin, n) is getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))

    class LooksLikeAnSAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = object()
            self.W_dec = nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(TypeError, match="expected a sparsekern.SAE.*LooksLikeAnSAE"):
        model.add_sae(LooksLikeAnSAE())
