"""Loading and saving: SAELens folders both ways, pre-6 configs, sparsify / circuit-tracer / Gemma Scope
files written here in their upstream layouts, from_pretrained against a temporary Hugging Face cache,
and clear errors for missing / corrupt files."""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sl = pytest.importorskip("sae_lens")

import sparsekern as sk  # noqa: E402
from sparsekern.loading import PretrainedNotCachedError  # noqa: E402

warnings.filterwarnings("ignore", module="sae_lens")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:sae_lens.saes.sae")

D_IN, D_SAE = 32, 128
# fp32 against SAELens on the architectures and scales of tests/test_sae_api.py (sigma <= 2.6e-6 at the
# worst decoder output, tests/fp_tolerance.py): 1e-5 + 1e-5 |value| is >= 4.8 sigma. The float64 checks
# (1e-9) have u = 1.1e-16: even the worst case gamma_n * sum|t| (n <= 129, sum|t| <= 40) is 6e-13.
TOL = {"rtol": 1e-5, "atol": 1e-5}
SL_CASES = {
    "standard": (sl.StandardSAE, sl.StandardSAEConfig, {}),
    "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {}),
    "topk": (sl.TopKSAE, sl.TopKSAEConfig, {"k": 8, "rescale_acts_by_decoder_norm": True}),
    "gated": (sl.GatedSAE, sl.GatedSAEConfig, {}),
    "transcoder": (sl.Transcoder, sl.TranscoderConfig, {"d_out": 48, "apply_b_dec_to_input": False}),
    "jumprelu_skip_transcoder": (
        sl.JumpReLUSkipTranscoder,
        sl.JumpReLUSkipTranscoderConfig,
        {"d_out": 48, "apply_b_dec_to_input": False},
    ),
}
GPT2_RELEASE, GPT2_ID = "gpt2-small-res-jb", "blocks.0.hook_resid_pre"
GPT2_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"


@pytest.fixture(autouse=True)
def _backend():
    # these tests exercise file formats, not kernels
    with sk.use_backend(os.environ.get("SPARSEKERN_BACKEND") or "ref"):
        yield


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return m


def sl_sae(kind, seed=1):
    cls, cfg_cls, kw = SL_CASES[kind]
    return randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw)), seed)


def x_in(seed=2):
    return torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(seed))


def rand(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- SAELens folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SL_CASES))
@torch.no_grad()
def test_sae_lens_saves_sparsekern_loads(kind, tmp_path):
    ref = sl_sae(kind)
    ref.save_model(tmp_path)
    ours = sk.SAE.load_from_disk(tmp_path)
    assert type(ours).__name__ == type(ref).__name__
    assert ours.cfg.to_dict() == ref.cfg.to_dict()
    x = x_in()
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours.encode(x), ref.encode(x), **TOL)


@pytest.mark.parametrize("kind", list(SL_CASES))
@torch.no_grad()
def test_sparsekern_saves_sae_lens_loads(kind, tmp_path):
    ours = sk.SAE.from_sae_lens(sl_sae(kind), copy=True)
    weights, cfg_path = ours.save_model(tmp_path)
    assert weights.name == "sae_weights.safetensors" and cfg_path.name == "cfg.json"
    ref = sl.SAE.load_from_disk(tmp_path)
    assert type(ref).__name__ == type(ours).__name__
    x = x_in()
    torch.testing.assert_close(ref(x), ours(x), **TOL)
    for name, p in ours.named_parameters():
        assert torch.equal(dict(ref.named_parameters())[name], p), name


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk", "gated", "jumprelu_skip_transcoder"])
@torch.no_grad()
def test_load_with_fold_W_dec_norm_and_dtype_match_sae_lens(kind, tmp_path):
    sl_sae(kind).save_model(tmp_path)
    ref = sl.SAE.load_from_disk(tmp_path, dtype="float64", fold_W_dec_norm=True)
    ours = sk.SAE.load_from_disk(tmp_path, dtype="float64", fold_W_dec_norm=True)
    assert ours.cfg.dtype == "float64" and ours.W_enc.dtype == torch.float64
    x = x_in().double()
    torch.testing.assert_close(ours.encode(x), ref.encode(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)


def test_sparsity_round_trip(tmp_path):
    ours = sk.SAE.from_sae_lens(sl_sae("standard"))
    log_sparsity = torch.linspace(-6, 0, D_SAE)
    ours.save_model(tmp_path, sparsity=log_sparsity)
    loaded, sparsity = sk.SAE.load_from_disk_with_sparsity(tmp_path)
    assert torch.equal(sparsity, log_sparsity) and isinstance(loaded, sk.StandardSAE)
    ours.save_model(tmp_path / "none")
    assert sk.SAE.load_from_disk_with_sparsity(tmp_path / "none")[1] is None


@torch.no_grad()
def test_pre_6_config_is_upgraded_like_sae_lens(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
        "scaling_factor": torch.ones(D_SAE),
    }
    save_file(sd, str(tmp_path / "sae_weights.safetensors"))
    old_cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_point": "blocks.2.hook_resid_pre",
        "hook_point_layer": 2,
        "hook_point_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 7},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "sae_lens_training_version": "3.13.0",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(old_cfg))
    ref = sl.SAE.load_from_disk(tmp_path)
    ours = sk.SAE.load_from_disk(tmp_path)
    assert isinstance(ours, sk.TopKSAE) and ours.cfg.k == 7
    assert ours.cfg.metadata.hook_name == ref.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    x = x_in()
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_pre_6_config_dict_is_sae_lens_and_loading_needs_no_class(monkeypatch):
    """loading's upgrade without class info keeps every key (loading/ knows no config class); saes'
    trims to the architecture's config fields as SAELens does, and so does the public
    sparsekern.loading.handle_config_defaulting with the root's class info; all build the same config."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting as sl_upgrade

    import sparsekern.loading.sae_lens_format as slf
    import sparsekern.saes as saes
    from sparsekern.loading import handle_config_defaulting as public_upgrade

    def raw_upgrade(cfg):
        with monkeypatch.context() as m:
            m.setitem(slf._DEFAULTS, "config_fields", None)
            return public_upgrade(cfg)

    old = {"d_in": 8, "d_sae": 16, "model_name": "gpt2", "hook_point": "blocks.2.hook_z", "lr": 3e-4,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}, "normalize_activations": True,
           "context_size": 128, "sae_lens_training_version": "3.13.0"}
    theirs, ours = sl_upgrade(dict(old)), saes.handle_config_defaulting(dict(old))
    raw = raw_upgrade(dict(old))
    top = lambda d: {k: v for k, v in d.items() if k != "metadata"}  # noqa: E731
    assert top(ours) == top(theirs)
    # SAELens also writes neuronpedia_id=None into metadata; a missing SAEMetadata key reads None
    assert ours["metadata"] == {k: v for k, v in theirs["metadata"].items() if k != "neuronpedia_id"}
    assert ours["reshape_activations"] == "hook_z"
    assert ours["normalize_activations"] == "expected_average_only_in"
    assert {"lr", "activation_fn", "hook_name"} <= set(raw) - set(ours)
    assert saes.config_from_dict(old) == saes.SAEConfig.from_dict(raw) == saes.SAEConfig.from_dict(ours)
    assert public_upgrade(dict(old)) == ours  # as before loading/ lost the classes: SAELens's trimming


def test_disk_converter_is_accepted(tmp_path):
    """An SAELens-style disk converter (path, device, cfg_overrides) -> (cfg_dict, state_dict) plugs in."""
    ref = sl_sae("topk")
    ref.save_model(tmp_path)
    (tmp_path / "sae_weights.safetensors").rename(tmp_path / "renamed.safetensors")

    def converter(path, device, cfg_overrides=None):
        from safetensors.torch import load_file

        cfg = {**json.loads((path / "cfg.json").read_text()), "device": device, **(cfg_overrides or {})}
        return cfg, load_file(str(path / "renamed.safetensors"))

    ours = sk.SAE.load_from_disk(tmp_path, converter=converter, dtype="float64")
    assert isinstance(ours, sk.TopKSAE) and ours.W_enc.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(ours(x_in().double()).float(), ref(x_in()), **TOL)


# ---- other formats, written in their upstream layouts ------------------------------------------------
def write_sparsify(root, *, transcode=False, skip=False, folder="layers.3", normalize_decoder=True):
    """An EleutherAI sparsify checkpoint: SparseCoder.save_to_disk's cfg.json + sae.safetensors."""
    path = root / folder
    path.mkdir(parents=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": D_SAE // D_IN,
        "normalize_decoder": normalize_decoder,
        "num_latents": D_SAE,
        "k": 8,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D_IN,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    sd = {
        "encoder.weight": rand(D_SAE, D_IN, seed=1),
        "encoder.bias": rand(D_SAE, seed=2, scale=0.1),
        "W_dec": rand(D_SAE, D_IN, seed=3),
        "b_dec": rand(D_IN, seed=4, scale=0.1),
    }
    if skip:
        sd["W_skip"] = rand(D_IN, D_IN, seed=5, scale=0.1)
    save_file(sd, str(path / "sae.safetensors"))
    return path


def sparsify_reference(folder, x):
    """sparsify's SparseCoder.forward: relu(encoder(x - b_dec)) -> top-k -> decode (+ skip)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    sd = load_file(str(folder / "sae.safetensors"))
    xin = x if cfg["transcode"] else x - sd["b_dec"]
    pre = torch.relu(xin @ sd["encoder.weight"].T + sd["encoder.bias"])
    vals, idx = pre.topk(cfg["k"], sorted=False)
    out = (vals[..., None] * sd["W_dec"][idx]).sum(-2) + sd["b_dec"]
    return out + x @ sd["W_skip"].mT if "W_skip" in sd else out


@pytest.mark.parametrize(
    "transcode,skip,cls",
    [
        (False, False, sk.TopKSAE),
        (True, False, sk.TopKTranscoder),
        (True, True, sk.TopKSkipTranscoder),
        (False, True, sk.TopKSkipTranscoder),
    ],
)
@torch.no_grad()
def test_sparsify(tmp_path, transcode, skip, cls):
    folder = write_sparsify(
        tmp_path, transcode=transcode, skip=skip, folder="layers.3.mlp" if transcode else "layers.3"
    )
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    sae = sk.SAE.load_sparsify(folder)
    assert type(sae) is cls and sae.cfg.k == 8 and sae.cfg.metadata.model_name == "EleutherAI/pythia-70m"
    x = x_in()
    torch.testing.assert_close(sae(x), sparsify_reference(folder, x), **TOL)
    if transcode:
        assert sae.cfg.metadata.hook_name == "blocks.3.ln2.hook_normalized"
        assert sae.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    else:
        assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
        assert sae.cfg.apply_b_dec_to_input is (not skip)
    assert sk.SAE.load_sparsify(folder, hook_name="x.hook").cfg.metadata.hook_name == "x.hook"


def test_sparsify_rejects_unsupported(tmp_path):
    folder = write_sparsify(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(NotImplementedError, match="groupmax"):
        sk.SAE.load_sparsify(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "num_latents": D_SAE * 2}))
    with pytest.raises(ValueError, match="num_latents"):
        sk.SAE.load_sparsify(folder)


def write_circuit_tracer(path, *, threshold=True, skip=False, scalar=False, k=None, d_model=D_IN):
    """circuit-tracer SingleLayerTranscoder.to_safetensors layout."""
    sd = {
        "W_enc": rand(D_SAE, d_model, seed=1),
        "W_dec": rand(D_SAE, d_model, seed=2),
        "b_enc": rand(D_SAE, seed=3, scale=0.1),
        "b_dec": rand(d_model, seed=4, scale=0.1),
    }
    if threshold:  # some negative thresholds: circuit-tracer's JumpReLU has no ReLU, so they matter
        sd["activation_function.threshold"] = (
            torch.tensor(-0.05) if scalar else rand(D_SAE, seed=5, scale=0.2)
        )
    if k is not None:
        sd["k"] = torch.tensor(k)
    if skip:
        sd["W_skip"] = rand(d_model, d_model, seed=6, scale=0.1)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize(
    "threshold,skip,scalar,k,cls",
    [
        (True, False, False, None, sk.JumpReLUTranscoder),
        (True, True, False, None, sk.JumpReLUSkipTranscoder),
        (True, False, True, None, sk.JumpReLUTranscoder),
        (False, False, False, None, sk.Transcoder),
        (False, True, False, None, sk.SkipTranscoder),
        (False, False, False, 6, sk.TopKTranscoder),
    ],
)
@torch.no_grad()
def test_circuit_tracer(tmp_path, threshold, skip, scalar, k, cls):
    path = tmp_path / "layer_5.safetensors"
    sd = write_circuit_tracer(path, threshold=threshold, skip=skip, scalar=scalar, k=k)
    tc = sk.SAE.load_circuit_tracer(
        path, hook_name="blocks.5.hook_resid_mid", hook_name_out="blocks.5.hook_mlp_out"
    )
    assert type(tc) is cls and tc.cfg.metadata.hook_name_out == "blocks.5.hook_mlp_out"
    x = x_in()
    pre = x @ sd["W_enc"].T + sd["b_enc"]  # circuit-tracer: F.linear(x, W_enc, b_enc)
    if threshold:
        acts = pre * (pre > sd["activation_function.threshold"])  # its jumprelu: x * (x > threshold)
        assert (acts < 0).any()  # negative thresholds let negative activations through
    elif k is not None:
        _, idx = pre.topk(k)
        acts = pre * torch.zeros_like(pre).scatter_(-1, idx, 1.0)
    else:
        acts = torch.relu(pre)
    expected = acts @ sd["W_dec"] + sd["b_dec"] + (x @ sd["W_skip"].T if skip else 0)
    torch.testing.assert_close(tc.encode(x), acts, **TOL)
    torch.testing.assert_close(tc(x), expected, **TOL)
    if threshold and not scalar:
        with pytest.warns(UserWarning, match="apply_relu=False"):
            tc.save_model(tmp_path / "saved")
        torch.testing.assert_close(sk.SAE.load_from_disk(tmp_path / "saved")(x), expected, **TOL)


def test_circuit_tracer_missing_tensor(tmp_path):
    path = tmp_path / "layer_0.safetensors"
    save_file({"W_enc": rand(D_SAE, D_IN), "b_enc": rand(D_SAE)}, str(path))
    with pytest.raises(ValueError, match=r"layer_0.safetensors lacks tensors \['W_dec', 'b_dec'\]"):
        sk.SAE.load_circuit_tracer(path)


@pytest.mark.parametrize("transcoder", [False, True])
@torch.no_grad()
def test_gemma_scope_npz(tmp_path, transcoder):
    d_out = 48 if transcoder else D_IN
    arrays = {
        "W_enc": rand(D_IN, D_SAE, seed=1),
        "W_dec": rand(D_SAE, d_out, seed=2),
        "b_enc": rand(D_SAE, seed=3, scale=0.1),
        "b_dec": rand(d_out, seed=4, scale=0.1),
        "threshold": rand(D_SAE, seed=5, scale=0.2).abs(),
    }
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in arrays.items()})
    sae = sk.SAE.load_gemma_scope_npz(
        tmp_path / "params.npz", transcoder=transcoder, hook_name="blocks.0.hook_resid_post"
    )
    if transcoder:
        ref = sl.JumpReLUTranscoder(
            sl.JumpReLUTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False)
        )
    else:
        ref = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    ref.load_state_dict(arrays)
    assert type(sae).__name__ == type(ref).__name__ and sae.cfg.apply_b_dec_to_input is False
    x = x_in()
    torch.testing.assert_close(sae(x), ref(x), **TOL)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]  # Gemma Scope: relu(pre) * (pre > threshold), no b_dec shift
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > arrays["threshold"]), **TOL)
    if not transcoder:
        with pytest.raises(ValueError, match="transcoder=True"):
            np.savez(
                tmp_path / "wide.npz",
                **{
                    **{k: v.numpy() for k, v in arrays.items()},
                    "W_dec": rand(D_SAE, 40).numpy(),
                    "b_dec": rand(40).numpy(),
                },
            )
            sk.SAE.load_gemma_scope_npz(tmp_path / "wide.npz")


# ---- bad files -----------------------------------------------------------------------------------------
def test_truncated_and_corrupt_safetensors(tmp_path):
    sk.SAE.from_sae_lens(sl_sae("standard")).save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"could not read safetensors file .*sae_weights.safetensors.*truncated or corrupt"
    ):
        sk.SAE.load_from_disk(tmp_path)
    weights.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        sk.SAE.load_from_disk(tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        sk.SAE.load_from_disk(tmp_path)


def test_missing_files_and_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAE folder not found"):
        sk.SAE.load_from_disk(tmp_path / "nope")
    ours = sk.SAE.from_sae_lens(sl_sae("standard"))
    ours.save_model(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        sk.SAE.load_from_disk(tmp_path)
    ours.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg.json is not valid JSON"):
        sk.SAE.load_from_disk(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    with pytest.raises(
        ValueError, match=r"unknown SAE architecture 'mystery'; known architectures: .*'standard'"
    ):
        sk.SAE.load_from_disk(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE * 2}))
    with pytest.raises(ValueError, match=r"weights in .* do not fit a StandardSAE with d_in=32, d_sae=256"):
        sk.SAE.load_from_disk(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        sk.SAE.load_from_disk(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="bad.npz"):
        sk.SAE.load_gemma_scope_npz(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        sk.SAE.load_gemma_scope_npz(tmp_path / "missing.npz")


def test_load_from_disk_of_wrong_class(tmp_path):
    sk.SAE.from_sae_lens(sl_sae("standard")).save_model(tmp_path)
    with pytest.raises(ValueError, match="Use StandardSAE instead"):
        sk.TopKSAE.load_from_disk(tmp_path)
    assert isinstance(sk.StandardSAE.load_from_disk(tmp_path), sk.StandardSAE)


# ---- from_pretrained against a temporary Hugging Face cache ---------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path, offline, for sparsekern and for huggingface_hub itself."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))  # huggingface_hub read these at import
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache, repo_id, files, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay files out as huggingface_hub does: models--org--name/snapshots/<rev>/<file> + refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        dest = repo / "snapshots" / revision / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def test_from_pretrained_empty_cache_raises_clearly_and_fast(hf_cache):
    start = time.perf_counter()
    with pytest.raises(PretrainedNotCachedError) as err:
        sk.SAE.from_pretrained(GPT2_RELEASE, GPT2_ID)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for needed in (GPT2_REPO, f"{GPT2_ID}/cfg.json", f"{GPT2_ID}/sae_weights.safetensors", str(hf_cache)):
        assert needed in msg
    with pytest.raises(PretrainedNotCachedError, match="mwhanna/qwen3-0.6b-transcoders-lowl0"):
        sk.SAE.from_pretrained("mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_0")
    with pytest.raises(ValueError, match="not found in release"):
        sk.SAE.from_pretrained(GPT2_RELEASE, "blocks.99.nothing")
    with pytest.raises(ValueError, match="not found in SAELens's pretrained SAEs directory"):
        sk.SAE.from_pretrained("no-such-release", "x")
    with pytest.raises(ValueError, match="force_download"):
        sk.SAE.from_pretrained(GPT2_RELEASE, GPT2_ID, force_download=True)


@torch.no_grad()
def test_from_pretrained_reads_the_cache_like_sae_lens(hf_cache, tmp_path):
    ref = sl_sae("jumprelu")
    ref.cfg.metadata.hook_name = GPT2_ID
    ref.save_model(tmp_path / "src")
    log_sparsity = torch.linspace(-5, -1, D_SAE)
    save_file({"sparsity": log_sparsity}, str(tmp_path / "src" / "sparsity.safetensors"))
    put_in_cache(
        hf_cache,
        GPT2_REPO,
        {
            f"{GPT2_ID}/{f}": (tmp_path / "src" / f).read_bytes()
            for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
        },
    )
    ours, cfg_dict, sparsity = sk.SAE.from_pretrained_with_cfg_and_sparsity(
        GPT2_RELEASE, GPT2_ID, dtype="float64"
    )
    theirs = sl.SAE.from_pretrained(GPT2_RELEASE, GPT2_ID, dtype="float64")  # offline: reads the same cache
    assert type(ours).__name__ == type(theirs).__name__ == "JumpReLUSAE"
    assert ours.cfg.to_dict() == theirs.cfg.to_dict()
    assert torch.equal(sparsity, log_sparsity) and cfg_dict["d_sae"] == D_SAE
    x = x_in().double()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
    # a Hugging Face repo id works as the release, as in SAELens
    direct = sk.SAE.from_pretrained(GPT2_REPO, GPT2_ID)
    assert direct.cfg.dtype == "float32"
    torch.testing.assert_close(direct(x.float()), ref(x.float()), **TOL)


@torch.no_grad()
def test_from_pretrained_through_sae_lens_converter_offline(hf_cache):
    """A non-SAELens-format release (mwhanna transcoders) goes through SAELens's own converter, offline."""
    import yaml

    repo = "mwhanna/qwen3-0.6b-transcoders-lowl0"
    g = torch.Generator().manual_seed(0)
    sd = {
        "W_enc": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
    }
    from safetensors.torch import save as to_bytes

    wandb = {"d_model": {"value": D_IN}, "d_feature": {"value": D_SAE}, "batch_size": {"value": 16}}
    put_in_cache(
        hf_cache,
        repo,
        {
            "wandb-config.yaml": yaml.safe_dump(wandb).encode(),
            "config.yaml": yaml.safe_dump({"model_name": "Qwen/Qwen3-0.6B"}).encode(),
            "layer_0.safetensors": to_bytes(sd),
        },
    )
    ours = sk.SAE.from_pretrained("mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_0")
    theirs = sl.SAE.from_pretrained("mwhanna-qwen3-0.6b-transcoders-lowl0", "layer_0")
    assert isinstance(ours, sk.Transcoder) and ours.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    x = x_in()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(
        ours(x), torch.relu(x @ sd["W_enc"].T + sd["b_enc"]) @ sd["W_dec"] + sd["b_dec"], **TOL
    )
    # SAELens's module is restored afterwards
    import sae_lens.loading.pretrained_sae_loaders as L
    from huggingface_hub import hf_hub_download

    assert L.hf_hub_download is hf_hub_download
