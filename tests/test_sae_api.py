"""sparsekern.SAE reproduces sae_lens.SAE (v6) for every architecture on small random weights: encode,
encode_sparse, decode (dense and sparse), forward, use_error_term (with hooks editing the code), hook
values, gradients, fold_W_dec_norm, .to(), configs; plus the bad-input errors."""

import os
import warnings

import pytest
import torch

sl = pytest.importorskip("sae_lens")

from conftest import cpu_backends  # noqa: E402
from sae_lens.saes.sae import SAEMetadata as SLMeta  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.sae import SAE, dense_to_sparse  # noqa: E402

warnings.filterwarnings("ignore", module="sae_lens")

D_IN, D_SAE = 32, 128
# each case: (id, SAELens class, SAELens config class, config kwargs)
ARCHS = [
    ("standard", sl.StandardSAE, sl.StandardSAEConfig, {}),
    ("jumprelu", sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {}),
    ("topk", sl.TopKSAE, sl.TopKSAEConfig, {"k": 8}),
    ("topk_rescale", sl.TopKSAE, sl.TopKSAEConfig, {"k": 8, "rescale_acts_by_decoder_norm": True}),
    ("gated", sl.GatedSAE, sl.GatedSAEConfig, {}),
    ("standard_layer_norm", sl.StandardSAE, sl.StandardSAEConfig, {"normalize_activations": "layer_norm"}),
    (
        "jumprelu_const_norm",
        sl.JumpReLUSAE,
        sl.JumpReLUSAEConfig,
        {"normalize_activations": "constant_norm_rescale"},
    ),
    ("topk_no_b_dec_in", sl.TopKSAE, sl.TopKSAEConfig, {"k": 8, "apply_b_dec_to_input": False}),
]
ARCH_IDS = [a[0] for a in ARCHS]
# fp32 on both sides, summed in different orders (tests/fp_tolerance.py): encoder values are sums of
# n = d_in + 1 = 33 terms with ||t||_2 <= 3.7 (|W| ~ 0.3, x ~ N(0, 1)), sigma <= 1.0e-6; decoder outputs sums
# over <= 73 active features with ||t||_2 <= 6.6 (TopK: 9 terms, ||t||_2 <= 12), sigma <= 2.6e-6. So 1e-5 +
# 1e-5 |value| is >= 4.8 sigma at the worst element of any architecture here (>= 12 sigma for the codes).
TOL = {"rtol": 1e-5, "atol": 1e-5}
# SPARSEKERN_BACKEND narrows the backend matrix (e.g. while the C++ extension is being rebuilt)
BACKENDS = (
    [os.environ["SPARSEKERN_BACKEND"]]
    if os.environ.get("SPARSEKERN_BACKEND")
    else cpu_backends("topk_encode")
)


def randomize(sae, seed=1):
    """Random weights (thresholds ~N(0, 0.1): some negative, which JumpReLU must clamp like SAELens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return sae


def make_pair(arch_id, seed=1, **extra):
    """(sae_lens SAE with random weights, the sparsekern equivalent with copied weights)."""
    _, cls, cfg_cls, kw = next(a for a in ARCHS if a[0] == arch_id)
    ref = randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw, **extra)), seed)
    return ref, sk.SAE.from_sae_lens(ref, copy=True)


def inputs(seed=2, lead=(3, 5)):
    return torch.randn(*lead, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with sk.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _ref_backend_by_default(request):
    # tests that don't take `backend` test the API layer, not kernels: pin the reference backend
    if "backend" in request.fixturenames:
        yield
    else:
        with sk.use_backend(os.environ.get("SPARSEKERN_BACKEND") or "ref"):
            yield


@pytest.mark.parametrize("arch", ARCH_IDS)
@torch.no_grad()
def test_encode_decode_forward_match_sae_lens(arch, backend):
    ref, ours = make_pair(arch)
    assert type(ours).__name__ == type(ref).__name__
    x = inputs()
    dense = ref.encode(x)
    got = ours.encode(x)
    torch.testing.assert_close(got, dense, **TOL)
    assert torch.equal(got != 0, dense != 0)
    acts = ours.encode_sparse(x)
    assert isinstance(acts, sk.SparseActs) and acts.shape[:-1] == x.shape[:-1]
    torch.testing.assert_close(acts.to_dense(D_SAE), dense, **TOL)
    expected_recon = ref.decode(ref.encode(x))  # re-encode: normalising SAEs consume their stats in decode
    ours.encode(x)
    torch.testing.assert_close(ours.decode(dense), expected_recon, **TOL)
    ours.encode(x)
    torch.testing.assert_close(ours.decode(acts), expected_recon, **TOL)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    # 1-D and 2-D inputs keep their leading shape
    for lead in [(7,), ()]:
        xi = inputs(3, lead)
        torch.testing.assert_close(ours(xi), ref(xi), **TOL)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "gated"])
def test_many_rows_with_trainable_parameters(arch, backend):
    """Realistic use: nn.Parameters (requires_grad) and enough rows for the kernels' multi-row tiling,
    with and without grad mode."""
    ref, ours = make_pair(arch)
    assert ours.W_enc.requires_grad
    x = inputs(lead=(4, 80))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@pytest.mark.parametrize("arch", ARCH_IDS)
@torch.no_grad()
def test_hook_values_match_sae_lens(arch):
    ref, ours = make_pair(arch)
    x = inputs()
    for use_error_term in (False, True):
        ref.use_error_term = ours.use_error_term = use_error_term
        out_ref, cache_ref = ref.run_with_cache(x)
        out, cache = ours.run_with_cache(x)
        assert set(cache.keys()) == set(cache_ref.keys())
        for name in cache_ref.keys():
            assert cache[name].shape == cache_ref[name].shape, name
            torch.testing.assert_close(cache[name], cache_ref[name], **TOL, msg=name)
        torch.testing.assert_close(out, out_ref, **TOL)
    assert set(ours.hook_dict) == set(ref.hook_dict)


def _zero_and_double(acts, hook):
    acts = acts.clone()
    acts[..., : D_SAE // 3] = 0
    return acts * 2


def _zero_in_place(acts, hook):
    acts[..., : D_SAE // 3] = 0


# every architecture for the acts_post edit the brief is about; a spread of them for the other points
EDIT_CASES = [(a, "hook_sae_acts_post", f) for a in ARCH_IDS for f in ("replace", "in_place")] + [
    (a, p, f)
    for a in ("standard", "topk_rescale", "gated", "jumprelu_const_norm")
    for p, fs in (
        ("hook_sae_acts_pre", ("replace", "in_place")),
        ("hook_sae_input", ("replace",)),
        ("hook_sae_recons", ("replace",)),
    )
    for f in fs
]


@pytest.mark.parametrize("arch,point,how", EDIT_CASES)
@torch.no_grad()
def test_use_error_term_with_editing_hooks_matches_sae_lens(arch, point, how):
    hook_fn = _zero_and_double if how == "replace" else _zero_in_place
    ref, ours = make_pair(arch)
    ref.use_error_term = ours.use_error_term = True
    x = inputs()
    if point in ("hook_sae_input", "hook_sae_recons"):
        hook_fn = lambda t, hook: t * 0.5  # noqa: E731  (these hooks see [.., d_in] tensors)
    expected = ref.run_with_hooks(x, fwd_hooks=[(point, hook_fn)])
    got = ours.run_with_hooks(x, fwd_hooks=[(point, hook_fn)])
    torch.testing.assert_close(got, expected, **TOL)
    # the edit shows through the error term: zeroing / doubling codes moves outputs by O(0.1), not rounding
    assert not torch.allclose(got, x, atol=1e-4)
    # the error term itself equals SAELens's
    err_ref, err = [], []
    ref.run_with_hooks(x, fwd_hooks=[(point, hook_fn), ("hook_sae_error", lambda t, hook: err_ref.append(t))])
    ours.run_with_hooks(x, fwd_hooks=[(point, hook_fn), ("hook_sae_error", lambda t, hook: err.append(t))])
    torch.testing.assert_close(err[0], err_ref[0], **TOL)


@pytest.mark.parametrize("arch", ["standard", "topk", "gated"])
@torch.no_grad()
def test_use_error_term_runs_the_sae_once(arch, monkeypatch):
    _, ours = make_pair(arch)
    ours.use_error_term = True
    calls = []
    orig = type(ours)._process_in  # one call per pass through the encoder
    monkeypatch.setattr(type(ours), "_process_in", lambda self, *a: calls.append(1) or orig(self, *a))
    x = inputs()
    ours.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", _zero_and_double)])
    assert len(calls) == 1
    ours.run_with_cache(x)  # caching hooks observe but don't edit: still one pass
    assert len(calls) == 2
    # an edit before the code is taken needs SAELens's hook-free second pass for the clean reconstruction
    ours.run_with_hooks(x, fwd_hooks=[("hook_sae_input", lambda t, hook: t * 0.5)])
    assert len(calls) == 4


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk_rescale", "gated"])
@torch.no_grad()
def test_no_dense_pre_activations_without_hooks(arch, monkeypatch):
    """Without hooks on acts_pre/acts_post nothing [.., d_sae] is built on the forward path."""
    _, ours = make_pair(arch)

    def boom(*a, **k):
        raise AssertionError("dense path used")

    x = inputs()
    expected = ours(x)
    monkeypatch.setattr(type(ours), "_dense_pre", boom)
    monkeypatch.setattr(type(ours), "_dense_act", boom)
    monkeypatch.setattr(sk.SparseActs, "to_dense", boom)
    torch.testing.assert_close(ours(x), expected)
    ours.run_with_hooks(x, fwd_hooks=[("hook_sae_input", lambda t, hook: None)])
    with pytest.raises(AssertionError, match="dense path used"):
        ours.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_pre", lambda t, hook: None)])


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk_rescale", "gated"])
def test_gradients_match_sae_lens(arch, backend):
    ref, ours = make_pair(arch)
    x1, x2 = inputs().requires_grad_(), inputs().requires_grad_()
    ref(x1).square().sum().backward()
    ours(x2).square().sum().backward()
    # Gradients are fp32 sums of the same kind, scaled by 2 |out| <= 26: |grad| reaches 1.1e3 (rms 20 to
    # 400). An input gradient sums ~73 terms of rms ~4 (2 out @ W_dec.T, then @ W_enc.T), so sigma ~
    # sqrt(2) * u * sqrt(73 / 3) * 4 * sqrt(73) ~ 2e-5 at an entry that cancels to ~0; parameter gradients
    # add the 15 rows alike. atol 1e-4 is ~5 sigma there, and rtol 1e-4 is >= 100 sigma wherever |grad| > 10.
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_params[name].grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCH_IDS)
@torch.no_grad()
def test_fold_W_dec_norm_matches_sae_lens(arch):
    ref, ours = make_pair(arch)
    x = inputs()
    if arch.startswith("topk") and "rescale" not in arch:
        with pytest.raises(NotImplementedError):
            ref.fold_W_dec_norm()
        with pytest.raises(NotImplementedError):
            ours.fold_W_dec_norm()
        return
    ref.fold_W_dec_norm()
    ours.fold_W_dec_norm()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name], p, msg=name)
    torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


@torch.no_grad()
def test_hook_z_reshaping_matches_sae_lens():
    ref, ours = make_pair(
        "standard", metadata=SLMeta(hook_name="blocks.0.attn.hook_z"), reshape_activations="hook_z"
    )
    assert ours.hook_z_reshaping_mode
    x = torch.randn(2, 5, 4, D_IN // 4)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    assert ours(x).shape == x.shape
    ours.turn_off_forward_pass_hook_z_reshaping()
    with pytest.raises(ValueError, match=r"\[\.\.\., d_in=32\]"):
        ours(x)
    ours.turn_on_forward_pass_hook_z_reshaping()
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    _, plain = make_pair("standard", metadata=SLMeta(hook_name="blocks.0.hook_resid_pre"))
    with pytest.raises(ValueError, match="hook_z"):
        plain.turn_on_forward_pass_hook_z_reshaping()


@torch.no_grad()
def test_input_is_cast_to_the_sae_dtype_like_sae_lens():
    ref, ours = make_pair("topk")
    x = inputs().double()
    out = ours(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x), **TOL)
    ref.to(torch.float64)
    ours.to(torch.float64)
    assert ours.cfg.dtype == ref.cfg.dtype == "float64" and ours.dtype == torch.float64
    assert ours.W_enc.dtype == torch.float64
    # float64: u = 1.1e-16, so even the worst case gamma_129 * sum|t| (sum|t| <= 40) is 6e-13 << 1e-10
    torch.testing.assert_close(ours(x.float()), ref(x.float()), rtol=1e-10, atol=1e-10)
    ours.to("cpu")
    assert ours.cfg.device == "cpu"


def test_config_fields_and_dicts_match_sae_lens():
    for arch, cls, cfg_cls, kw in ARCHS:
        ref_cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SLMeta(hook_name="blocks.1.hook_resid_pre"), **kw)
        ours = sk.SAE.from_sae_lens(cls(ref_cfg))
        d_ref, d = ref_cfg.to_dict(), ours.cfg.to_dict()
        assert d == d_ref, arch
        assert type(ours.cfg).__name__ == cfg_cls.__name__
        assert ours.cfg.architecture() == ref_cfg.architecture()
        round_trip = sk.SAEConfig.from_dict(d)
        assert round_trip.to_dict() == d and type(round_trip) is type(ours.cfg)
        assert ours.cfg.metadata.hook_name == "blocks.1.hook_resid_pre" and ours.cfg.metadata.missing is None
        sae = sk.SAE.from_dict(d)
        assert type(sae) is type(ours)
        assert {n: p.shape for n, p in sae.named_parameters()} == {
            n: p.shape for n, p in cls(ref_cfg).named_parameters()
        }
    gated = sk.GatedSAE(sk.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    assert gated.b_enc is None and "b_enc" not in gated.state_dict()


def test_construct_directly_and_load_state_dict():
    ref, _ = make_pair("jumprelu")
    ours = sk.JumpReLUSAE(sk.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs()), ref(inputs()), **TOL)
    ours.eval()
    assert not ours.training


def test_from_sae_lens_shares_weights_unless_copy():
    ref, _ = make_pair("standard")
    shared = sk.SAE.from_sae_lens(ref)
    copied = sk.SAE.from_sae_lens(ref, copy=True)
    with torch.no_grad():
        ref.W_dec.mul_(2)
    assert torch.equal(shared.W_dec, ref.W_dec) and not torch.equal(copied.W_dec, ref.W_dec)


@torch.no_grad()
def test_from_sae_lens_training_sae_becomes_its_inference_form():
    cfg = sl.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8)
    tsae = randomize(sl.BatchTopKTrainingSAE(cfg))
    tsae.topk_threshold = torch.tensor(0.15)
    before = {k: v.clone() for k, v in tsae.state_dict().items()}
    ours = sk.SAE.from_sae_lens(tsae)
    assert isinstance(ours, sk.JumpReLUSAE)
    torch.testing.assert_close(ours.threshold, torch.full((D_SAE,), 0.15))
    assert all(torch.equal(v, tsae.state_dict()[k]) for k, v in before.items())  # source untouched
    ref = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(inputs()), ref(inputs()), **TOL)


@torch.no_grad()
def test_dense_to_sparse_and_edited_encode_sparse():
    _, ours = make_pair("standard")
    x = inputs()
    dense = ours.encode(x)
    acts = dense_to_sparse(dense)
    torch.testing.assert_close(acts.to_dense(D_SAE), dense)
    out = ours.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", _zero_and_double)])
    assert out.shape == x.shape
    edited = _zero_and_double(dense, None)
    with ours.hooks(fwd_hooks=[("hook_sae_acts_post", _zero_and_double)]):
        torch.testing.assert_close(ours.encode_sparse(x).to_dense(D_SAE), edited)


# ---- bad input -----------------------------------------------------------------------------------
def test_wrong_d_in_is_a_clear_value_error():
    _, ours = make_pair("topk")
    with pytest.raises(ValueError, match=r"expects input of shape \[\.\.\., d_in=32\], got \(3, 31\)"):
        ours(torch.randn(3, 31))
    with pytest.raises(ValueError, match=r"d_in=32"):
        ours.encode(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours.encode([[1.0] * D_IN])


def test_device_mismatch_is_a_clear_error():
    _, ours = make_pair("standard")
    with pytest.raises(ValueError, match=r"input is on meta but StandardSAE's weights are on cpu"):
        ours(torch.empty(2, D_IN, device="meta"))


def test_decode_wrong_width_is_a_clear_error():
    _, ours = make_pair("standard")
    with pytest.raises(ValueError, match=r"\[\.\.\., d_sae=128\]"):
        ours.decode(torch.randn(2, D_SAE + 1))
    with pytest.raises(ValueError, match="d_sae"):
        ours.decode(sk.SparseActs(torch.ones(2, 1), torch.full((2, 1), D_SAE)))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'nope'.*'gated'.*'jumprelu'.*'topk'"):
        sk.SAE.from_dict({"architecture": "nope", "d_in": 4, "d_sae": 8})
    with pytest.raises(ValueError, match="batchtopk.*jumprelu"):
        sk.SAEConfig.from_dict({"architecture": "batchtopk", "d_in": 4, "d_sae": 8})


def test_bad_configs():
    with pytest.raises(ValueError, match="normalize_activations"):
        sk.StandardSAEConfig(d_in=4, d_sae=8, normalize_activations="bogus")
    with pytest.raises(ValueError, match="d_sae must be a positive int"):
        sk.StandardSAEConfig(d_in=4, d_sae=0)
    with pytest.raises(ValueError, match="k must be an int"):
        sk.TopKSAEConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="invalid dtype"):
        sk.StandardSAEConfig(d_in=4, d_sae=8, dtype="int8")
    with pytest.raises(TypeError, match="abstract"):
        SAE(sk.StandardSAEConfig(d_in=4, d_sae=8))
    with pytest.raises(ValueError, match="Use TopKSAE instead"):
        sk.JumpReLUSAE.from_dict(sk.TopKSAEConfig(d_in=4, d_sae=8, k=2).to_dict())


def test_decode_of_normalising_sae_needs_encode_first():
    _, ours = make_pair("standard_layer_norm")
    with pytest.raises(RuntimeError, match="call encode\\(\\) first"):
        ours.decode(torch.zeros(2, D_SAE))


@torch.no_grad()
def test_deepcopy_and_torch_save_keep_working():
    import copy
    import io

    _, ours = make_pair(
        "standard", metadata=SLMeta(hook_name="blocks.0.attn.hook_z"), reshape_activations="hook_z"
    )
    x = torch.randn(2, 4, D_IN // 4)
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(clone(x), ours(x))
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own object, written just above
    torch.testing.assert_close(loaded(x), ours(x))
    assert loaded.cfg.metadata.hook_name == "blocks.0.attn.hook_z" and loaded.cfg.metadata.absent is None
