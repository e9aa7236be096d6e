"""Run-time activation normalisation against SAELens 6.54 (issue 19, section 8):
``run_time_activation_norm_fn_in`` / ``run_time_activation_norm_fn_out`` and the statistics they keep
(``x_norm_coeff``, ``ln_mu``, ``ln_std``), for every ``normalize_activations`` mode, on the same weights
and inputs as ``sae_lens``; and where encode / decode / forward leave those statistics."""

import warnings

import pytest
import torch

sl = pytest.importorskip("sae_lens")

import sparsekern as sk  # noqa: E402
from sparsekern.constants import NORMALIZE_MODES  # noqa: E402

warnings.filterwarnings("ignore", module="sae_lens")

D_IN, D_SAE, D_OUT = 24, 64, 20
STATS = ("x_norm_coeff", "ln_mu", "ln_std")
KEPT = {"constant_norm_rescale": ("x_norm_coeff",), "layer_norm": ("ln_mu", "ln_std")}  # others: identity
ARCHS = {  # id -> (SAELens class, config class, config kwargs)
    "standard": (sl.StandardSAE, sl.StandardSAEConfig, {}),
    "topk": (sl.TopKSAE, sl.TopKSAEConfig, {"k": 6}),
    "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {}),
    "gated": (sl.GatedSAE, sl.GatedSAEConfig, {}),
    "transcoder": (sl.Transcoder, sl.TranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}),
}


def make_pair(arch, mode, dtype="float32"):
    cls, cfg_cls, kw = ARCHS[arch]
    ref = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, normalize_activations=mode, dtype=dtype, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.3 if p.dim() == 2 else 0.1
            p.copy_((torch.rand(p.shape, generator=g) * 0.4 if name == "threshold"
                     else torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return ref, sk.SAE.from_sae_lens(ref, copy=True)


def inputs(dtype=torch.float32, seed=2, d=D_IN):
    return (torch.randn(3, 5, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5).to(dtype)


def kept(sae):
    return [n for n in STATS if hasattr(sae, n)]


# Tolerance 0 for the normalisation functions themselves: both sides run the same aten ops in the same
# order on the same tensors (norm, divide, multiply / mean, subtract, std, add, divide), and CPU kernels
# are deterministic for a given shape, so the results agree bit for bit.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", NORMALIZE_MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_norm_fns_and_their_statistics_match_sae_lens(arch, mode, dtype):
    ref, ours = make_pair(arch, mode, str(dtype).removeprefix("torch."))
    x, z = inputs(dtype), inputs(dtype, seed=5)
    y_ref, y = ref.run_time_activation_norm_fn_in(x), ours.run_time_activation_norm_fn_in(x)
    assert torch.equal(y, y_ref)
    assert kept(ours) == kept(ref) == list(KEPT.get(mode, ()))
    for name in kept(ref):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    if mode not in KEPT:
        assert y is x and y_ref is x  # identity modes return the input itself
    back_ref, back = ref.run_time_activation_norm_fn_out(z), ours.run_time_activation_norm_fn_out(z)
    assert torch.equal(back, back_ref)
    assert kept(ours) == kept(ref) == []  # consumed by fn_out, as in SAELens
    if mode in KEPT:
        assert not torch.equal(back, z)
        for sae in (ref, ours):  # nothing kept: SAELens's AttributeError
            with pytest.raises(AttributeError):
                sae.run_time_activation_norm_fn_out(z)
    else:
        assert back is z


@torch.no_grad()
def test_layer_norm_eps_matches_sae_lens():
    ref, ours = make_pair("standard", "layer_norm")
    x = inputs() * 1e-3  # small rows: eps matters
    for eps in (1e-5, 0.25):
        assert torch.equal(ours.run_time_activation_norm_fn_in(x, eps=eps),
                           ref.run_time_activation_norm_fn_in(x, eps=eps))
        assert torch.equal(ours.run_time_activation_norm_fn_out(x, eps=eps),
                           ref.run_time_activation_norm_fn_out(x, eps=eps))
    a = ours.run_time_activation_norm_fn_in(x, eps=0.25)
    assert not torch.equal(a, ours.run_time_activation_norm_fn_in(x))


# The pipeline against SAELens runs in float64, so the comparison tests how normalisation is wired in,
# not kernel rounding: every value is a float64 sum of at most max(d_in, d_sae) = 64 products, each side
# within gamma_64 * sum|terms| ~ 64 * 1.1e-16 * 50 ~ 4e-13 of the exact value (|x| ~ 2.5, |W| ~ 0.3; the
# normalised rows are O(1)), so 1e-10 has more than two orders of magnitude to spare.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("mode", NORMALIZE_MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
@torch.no_grad()
def test_encode_decode_forward_with_each_mode_match_sae_lens(arch, mode):
    ref, ours = make_pair(arch, mode, "float64")
    x = inputs(torch.float64)
    torch.testing.assert_close(ours(x), ref(x), **TOL64)
    assert kept(ours) == kept(ref)  # an SAE's forward drops them, a transcoder's keeps them
    f_ref, f = ref.encode(x), ours.encode(x)
    torch.testing.assert_close(f, f_ref, **TOL64)
    assert kept(ours) == kept(ref) == list(KEPT.get(mode, ()))
    for name in kept(ref):  # encode keeps the statistics, as SAELens's process_sae_in
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    torch.testing.assert_close(ours.decode(f), ref.decode(f_ref), **TOL64)
    assert kept(ours) == kept(ref)
    # SAELens user code normalising by hand: fn_in keeps the statistics that decode (SAE) or fn_out undoes
    g = torch.Generator().manual_seed(7)
    codes = torch.relu(torch.randn(3, 5, D_SAE, generator=g, dtype=torch.float64))
    ref.run_time_activation_norm_fn_in(x)
    ours.run_time_activation_norm_fn_in(x)
    torch.testing.assert_close(ours.decode(codes), ref.decode(codes), **TOL64)
    ours.encode(x)  # encode's statistics serve fn_out as well
    ref.encode(x)
    d = D_OUT if arch == "transcoder" else D_IN
    z = inputs(torch.float64, seed=9, d=d)
    back, back_ref = ours.run_time_activation_norm_fn_out(z), ref.run_time_activation_norm_fn_out(z)
    torch.testing.assert_close(back, back_ref, **TOL64)


def test_fn_out_consumes_the_statistics_decode_needs():
    _, ours = make_pair("standard", "constant_norm_rescale")
    x = inputs()
    ours.run_time_activation_norm_fn_out(ours.run_time_activation_norm_fn_in(x))
    with pytest.raises(RuntimeError, match=r"call encode\(\) first"):
        ours.decode(torch.zeros(D_SAE))
