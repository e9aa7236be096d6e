"""Issue 12, "checkpoints never lose data": atomic ``save_model``, loaders that check the config against the
tensors before allocating (naming the file), and nn.Module casts (``.double()``, ``.half()``, ...) that keep
``cfg.dtype`` in step with the parameters."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern as sk
from test_transcoder_circuits import _HisParams, fake_sae_training, random_weights, write

from sparsekern.compat.transcoder_circuits import SparseAutoencoder

D_IN, D_SAE, D_OUT = 12, 40, 10
CASES = {
    "standard": (sk.StandardSAE, sk.StandardSAEConfig, {}),
    "gated": (sk.GatedSAE, sk.GatedSAEConfig, {}),
    "jumprelu": (sk.JumpReLUSAE, sk.JumpReLUSAEConfig, {}),
    "topk": (sk.TopKSAE, sk.TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "transcoder": (sk.Transcoder, sk.TranscoderConfig, {"d_out": D_OUT}),
    "topk_skip_transcoder": (sk.TopKSkipTranscoder, sk.TopKSkipTranscoderConfig, {"d_out": D_OUT, "k": 5}),
}


@pytest.fixture(autouse=True)
def _backend():
    with sk.use_backend(os.environ.get("SPARSEKERN_BACKEND") or "ref"):
        yield


def make(kind="standard", seed=0, dtype="float32"):
    cls, cfg_cls, kw = CASES[kind]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=dtype, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 2 else 0.1))
            if name == "threshold":
                p.abs_()
    return sae


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---- atomic save_model ---------------------------------------------------------------------------
def test_save_model_with_unserialisable_metadata_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    make(seed=0).save_model(path, sparsity=torch.zeros(D_SAE))
    before = snapshot(path)
    other = make(seed=1)
    other.cfg.metadata.model_from_pretrained_kwargs = {"device_map": object()}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        other.save_model(path)
    assert snapshot(path) == before and leftovers(tmp_path, "ckpt") == []


@pytest.mark.parametrize("bad", [[0.0] * D_SAE, torch.zeros(D_SAE + 1), torch.zeros(D_SAE, dtype=torch.long)])
def test_save_model_with_a_bad_sparsity_writes_nothing(tmp_path, bad):
    make(seed=0).save_model(tmp_path / "ckpt")
    before = snapshot(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"sparsity must be a float tensor \[d_sae=40\]"):
        make(seed=1).save_model(tmp_path / "ckpt", sparsity=bad)
    assert snapshot(tmp_path / "ckpt") == before and leftovers(tmp_path, "ckpt") == []
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="sparsity"):
        make(seed=1).save_model(tmp_path / "new", sparsity=bad)
    assert not (tmp_path / "new").exists()


def test_save_model_failing_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    make(seed=0).save_model(tmp_path)  # tmp_path itself, as several tests do
    before = snapshot(tmp_path)
    real = safetensors.torch.save_file

    def half_write(tensors, filename, *a, **kw):
        real(tensors, filename, *a, **kw)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        make(seed=1).save_model(tmp_path)
    assert snapshot(tmp_path) == before and leftovers(tmp_path.parent, tmp_path.name) == []
    monkeypatch.undo()
    torch.testing.assert_close(sk.SAE.load_from_disk(tmp_path).W_enc, make(seed=0).W_enc)


def test_save_model_over_an_existing_folder_keeps_other_files(tmp_path):
    path = tmp_path / "ckpt"
    make(seed=0).save_model(path, sparsity=torch.full((D_SAE,), -2.0))
    (path / "README.md").write_text("notes")
    (path / "sub").mkdir()
    (path / "sub" / "x.txt").write_text("x")
    path.chmod(0o750)
    weights, cfg_path = make(seed=1).save_model(path)
    assert path.stat().st_mode & 0o777 == 0o750
    assert (weights, cfg_path) == (path / "sae_weights.safetensors", path / "cfg.json")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["README.md", "cfg.json", "sae_weights.safetensors", "sub"]
    assert (path / "sub" / "x.txt").read_text() == "x" and leftovers(tmp_path, "ckpt") == []
    loaded, sparsity = sk.SAE.load_from_disk_with_sparsity(path)
    assert sparsity is None  # the old sparsity belonged to the old weights
    torch.testing.assert_close(loaded.W_enc, make(seed=1).W_enc)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        make().save_model(tmp_path / "file")


# ---- loaders check before they allocate ----------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    make().save_model(tmp_path)
    return tmp_path, json.loads((tmp_path / "cfg.json").read_text())


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"d_sae": None}, r"cfg.json has no 'd_sae'"),
        ({"d_sae": -4}, r"cfg.json: d_sae must be a positive int, got -4"),
        ({"d_sae": 10**13}, r"safetensors do not fit a StandardSAE with d_in=12, d_sae=10000000000000"),
        ({"dtype": "int32"}, r"cfg.json: invalid dtype 'int32'"),
    ],
)
def test_sae_lens_folder_config_errors_name_the_file(saved, edit, match):
    path, cfg = saved
    cfg = {**cfg, **edit}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        sk.SAE.load_from_disk(path)


def test_load_devices(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"cfg.json: unknown device 'tpu9'"):
        sk.SAE.load_from_disk(path, device="tpu9")
    with pytest.raises(ValueError, match=r"cfg.json: cannot load onto the 'meta' device"):
        sk.SAE.load_from_disk(path, device="meta")
    with pytest.raises(ValueError, match=r"cfg.json: invalid dtype 'int64'"):
        sk.SAE.load_from_disk(path, dtype="int64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"CUDA is not available"):
            sk.SAE.load_from_disk(path, device="cuda")


def test_a_meta_config_does_not_drop_the_weights():
    sae = make()
    cfg = {**sae.cfg.to_dict(), "device": "meta"}
    with pytest.raises(ValueError, match=r"in here\.safetensors asks for the 'meta' device"):
        sk.SAE.from_cfg_and_state_dict(cfg, dict(sae.state_dict()), source="here.safetensors")


def _npz(path, **over):
    g = np.random.default_rng(0)
    arrays = {
        "W_enc": g.standard_normal((D_IN, D_SAE)).astype(np.float32),
        "W_dec": g.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_enc": np.zeros(D_SAE, np.float32),
        "b_dec": np.zeros(D_IN, np.float32),
        "threshold": np.full(D_SAE, 0.1, np.float32),
        **over,
    }
    np.savez(path, **arrays)
    return path


def test_gemma_scope_npz_is_checked_before_loading(tmp_path):
    good = _npz(tmp_path / "good.npz")
    assert isinstance(sk.SAE.load_gemma_scope_npz(good), sk.JumpReLUSAE)
    with pytest.raises(ValueError, match=r"flat\.npz: W_enc and W_dec must be 2-D"):
        sk.SAE.load_gemma_scope_npz(_npz(tmp_path / "flat.npz", W_enc=np.zeros(D_IN * D_SAE, np.float32)))
    with pytest.raises(ValueError, match=r"bias\.npz: tensor shapes .* do not fit together"):
        sk.SAE.load_gemma_scope_npz(_npz(tmp_path / "bias.npz", b_enc=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"int\.npz: threshold has dtype int64"):
        sk.SAE.load_gemma_scope_npz(_npz(tmp_path / "int.npz", threshold=np.ones(D_SAE, np.int64)))
    with pytest.raises(ValueError, match=r"good\.npz: cannot load onto the 'meta' device"):
        sk.SAE.load_gemma_scope_npz(good, device="meta")
    with pytest.raises(ValueError, match=r"good\.npz: .*not a floating-point dtype|good\.npz: invalid dtype"):
        sk.SAE.load_gemma_scope_npz(good, dtype=torch.int32)


def dunefsky_file(directory, **cfg_attrs):
    """His checkpoint (d_in = d_out = 16, d_sae = 64 weights) with ``cfg_attrs`` set on the pickled cfg."""
    path = str(directory / "tc.pt")
    with fake_sae_training() as Cfg:
        cfg = Cfg()
        for k, v in cfg_attrs.items():
            setattr(cfg, k, v)
        write(path, {"cfg": cfg, "state_dict": _HisParams(random_weights()).state_dict()}, "pt")
    return path


@pytest.mark.parametrize(
    "cfg_kwargs, match",
    [
        ({"d_sae": -5}, r"cfg d_sae must be a positive int, got -5"),
        ({"d_sae": 10**12}, r"weights do not match the file's cfg \(d_in=16, d_sae=1000000000000"),
        ({"d_out": -1}, r"cfg d_out must be a positive int, got -1"),
        ({"d_in": 15}, r"weights do not match the file's cfg \(d_in=15, d_sae=64"),
        ({"dtype": torch.int64}, r"dtype torch.int64 is not a floating-point dtype"),
        ({"device": "tpu9"}, r"cfg.device 'tpu9' is not a device"),
        ({"device": "meta"}, r"cannot load onto the 'meta' device"),
    ],
)
def test_dunefsky_config_is_checked_before_allocating(tmp_path, cfg_kwargs, match):
    path = dunefsky_file(tmp_path, **cfg_kwargs)
    with pytest.raises(ValueError, match=match) as info:
        SparseAutoencoder.load_from_pretrained(path)
    assert os.path.basename(path) in str(info.value)


def test_dunefsky_explicit_device_is_checked(tmp_path):
    path = dunefsky_file(tmp_path)
    assert SparseAutoencoder.load_from_pretrained(path, device="cpu").W_enc.shape == (16, 64)
    with pytest.raises(ValueError, match="cannot load onto the 'meta' device"):
        SparseAutoencoder.load_from_pretrained(path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SparseAutoencoder.load_from_pretrained(path, device="cuda")


# ---- casts keep cfg.dtype in step ----------------------------------------------------------------
def _float64_twin(sae):
    ref = type(sae)(type(sae.cfg).from_dict({**sae.cfg.to_dict(), "dtype": "float64"}))
    ref.load_state_dict({k: v.double() for k, v in sae.state_dict().items()})
    return ref


CASTS = {
    "double": (lambda m: m.double(), torch.float64),
    "to_float64": (lambda m: m.to(torch.float64), torch.float64),
    "to_kw": (lambda m: m.to(dtype=torch.float64), torch.float64),
    "parent_double": (lambda m: nn.Sequential(m).double()[0], torch.float64),
    "double_then_float": (lambda m: m.double().float(), torch.float32),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("kind", list(CASES))
@torch.no_grad()
def test_casts_keep_cfg_dtype_and_match_float64(kind, cast):
    fn, dtype = CASTS[cast]
    low = dtype in (torch.float16, torch.bfloat16)
    if low and kind not in ("standard", "transcoder"):
        pytest.skip("a threshold / top-k choice may flip in 16-bit: compared on the ReLU models only")
    sae = make(kind)
    ref = _float64_twin(fn(copy.deepcopy(sae)) if low else sae)
    out = fn(sae)
    assert out.cfg.dtype == str(dtype).removeprefix("torch.") and out.dtype == dtype
    assert out.W_enc.dtype == dtype and out.cfg.device == "cpu"
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))
    tol = {"rtol": 3e-2, "atol": 3e-2} if low else {}
    if dtype == torch.float32:
        tol = {"rtol": 1e-5, "atol": 1e-5}
    codes = out.encode(x)
    assert codes.dtype == dtype
    torch.testing.assert_close(codes.double(), ref.encode(x.double()), **tol)
    torch.testing.assert_close(out.decode(codes).double(), ref.decode(codes.double()), **tol)
    torch.testing.assert_close(out(x).double(), ref(x.double()), **tol)
    torch.testing.assert_close(out.encode_sparse(x).to_dense(D_SAE).double(), ref.encode(x.double()), **tol)


def test_cast_round_trips_through_save(tmp_path):
    sae = make("jumprelu").double()
    sae.save_model(tmp_path)
    loaded = sk.SAE.load_from_disk(tmp_path)
    assert loaded.cfg.dtype == "float64" and loaded.W_enc.dtype == torch.float64
