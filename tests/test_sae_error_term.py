"""The error-term identity (issue 19, section 5): with ``use_error_term`` an SAE returns its target ``x`` up
to the rounding of ONE sum ``recon + (x - recon)``, computed from the same ``recon`` tensor it returned, on
any CPU -- called on its own, and spliced into a model by ``HookedSAETransformer`` (SAEs and transcoders).

The bound. Let ``e = fl(x - r)`` and ``g = fl(r + e)``, each op rounded to nearest with unit roundoff
``u = eps/2`` (``eps = torch.finfo(out dtype).eps``). Then ``g - x = (x - r) d1 + (r + e) d2`` with
``|d1|, |d2| <= u``, so ``|g - x| <= u |x - r| + u (|r| + |e|) ~ eps (|r| + |x - r|)`` elementwise. (bf16
ops round through fp32 first: per op at most ``u_bf16 + u_fp32``, inside the same bound.) A
reconstruction that came from another computation than the returned one (another decode kernel, a
dense vs a sparse path) differs from it by several ulps of ``|r|`` and breaks this bound; and given the
same ``recon`` the result is exactly ``r + (x - r)``, which the tests also assert.
"""

import pytest
import torch

from conftest import cpu_backends

import sparsekern as sk

D_IN, D_SAE, K = 48, 192, 12
SAES = {
    "standard": {},
    "topk": {"k": K},
    "topk_rescale": {"k": K, "rescale_acts_by_decoder_norm": True},
    "jumprelu": {},
    "gated": {},
    "standard_const_norm": {"normalize_activations": "constant_norm_rescale"},
    "jumprelu_layer_norm": {"normalize_activations": "layer_norm"},
}
# (SAE dtype, input dtype): the identity is checked in the output's dtype (bf16 SAE + fp32 input -> fp32)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["fp32", "bf16", "bf16_sae_fp32_input"]


def randomize(sae, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return sae


def make_sae(name, dtype=torch.float32, **cfg):
    extra = dict(SAES.get(name, {}))
    arch = name.split("_")[0] if name in SAES else name
    sae = sk.SAE.from_dict({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, **extra, **cfg})
    return randomize(sae).to(dtype)


def assert_one_rounding(out, x, recon):
    """``out == recon + (x - recon)`` exactly, and ``|out - x| <= eps (|recon| + |x - recon|)``."""
    assert out.dtype == torch.promote_types(x.dtype, recon.dtype)
    assert torch.equal(out, recon + (x - recon))
    eps = torch.finfo(out.dtype).eps
    r, x64 = recon.double(), x.double()
    bound = eps * (r.abs() + (x64 - r).abs())
    err = (out.double() - x64).abs()
    excess = (err - bound).max().item()
    assert bool((err <= bound).all()), f"max excess {excess:.3g} over the one-rounding bound"


@pytest.mark.parametrize("backend", cpu_backends("sparse_decode"))
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SAES))
@torch.no_grad()
def test_sae_on_its_own_returns_x_up_to_one_rounding(name, dtypes, backend):
    sae_dtype, x_dtype = dtypes
    sae = make_sae(name, sae_dtype)
    x = (torch.randn(4, 9, D_IN, generator=torch.Generator().manual_seed(2)) * 3).to(x_dtype)
    seen = {}
    sae.hook_sae_error.add_hook(lambda t, hook: seen.__setitem__("error", t))
    with sk.use_backend(backend):
        sae.use_error_term = False
        recon = sae(x)  # the same pipeline without the error term (deterministic on one machine)
        sae.use_error_term = True
        out = sae(x)
    assert torch.equal(seen["error"], x - recon)  # the error term is x minus exactly that recon
    assert_one_rounding(out, x, recon)
    assert not torch.allclose(recon.float(), x.float(), atol=1e-2)  # a real reconstruction: the bound bites


@pytest.mark.parametrize("name", ["standard", "topk"])
@torch.no_grad()
def test_the_error_term_comes_from_the_returned_recon_tensor(name):
    """Captured inside one call (hook_sae_recons observes, edits nothing): out == recon + (x - recon)."""
    sae = make_sae(name)
    sae.use_error_term = True
    x = torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(4)) * 3
    seen = {}
    sae.hook_sae_recons.add_hook(lambda t, hook: seen.__setitem__("recon", t))
    sae.hook_sae_error.add_hook(lambda t, hook: seen.__setitem__("error", t))
    out = sae(x)
    assert torch.equal(seen["error"], x - seen["recon"])
    assert_one_rounding(out, x, seen["recon"])


# ---- spliced into a model --------------------------------------------------------------------------
D_MODEL, VOCAB = 32, 50


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=8, n_heads=4, d_mlp=64,
                                  d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN", seed=0)
    torch.manual_seed(0)
    return sk.HookedSAETransformer(cfg).eval()


def spliced(name, hook_in, hook_out=None, dtype=torch.float32):
    cfg = {"d_in": D_MODEL, "d_sae": 128, **({"k": K} if "topk" in name else {})}
    if hook_out is not None:
        cfg.update(d_out=D_MODEL, apply_b_dec_to_input=False)
    sae = make_sae(name, dtype, **cfg)
    sae.cfg.metadata.hook_name = hook_in
    if hook_out is not None:
        sae.cfg.metadata.hook_name_out = hook_out
    return sae


CASES = [  # (architecture, input hook, output hook or None)
    ("standard", "blocks.1.hook_resid_pre", None),
    ("topk", "blocks.1.hook_resid_pre", None),
    ("jumprelu", "blocks.0.hook_mlp_out", None),
    ("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
    ("skip_transcoder", "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"),
    ("jumprelu_transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
    ("topk_transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
]


@pytest.mark.parametrize("capture", ["hooks", "cache"])  # cache: the dense path (acts_pre is hooked)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_sae", "bf16_sae"])
@pytest.mark.parametrize("name, hook_in, hook_out", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_hooked_sae_transformer_error_term_is_one_rounding(model, name, hook_in, hook_out, dtype, capture):
    sae = spliced(name, hook_in, hook_out, dtype)
    where = hook_out or hook_in
    toks = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    _, clean = model.run_with_cache(toks, names_filter=[where])
    act = clean[where]  # what the model computes at the SAE's output hook (same upstream ops, same bits)
    names = [f"{where}.hook_sae_{n}" for n in ("recons", "error", "output")]
    if capture == "cache":
        _, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=True)
    else:  # only the three points observed: the code stays sparse
        cache = {}
        sae.use_error_term = True
        model.run_with_hooks_with_saes(
            toks, saes=[sae], fwd_hooks=[(n, lambda t, hook: cache.__setitem__(hook.name, t)) for n in names]
        )
    recon, error, out = (cache[n] for n in names)
    assert torch.equal(error, act - recon)
    assert_one_rounding(out, act, recon)
    assert not torch.allclose(recon.float(), act, atol=1e-2)  # a real reconstruction, not the identity
