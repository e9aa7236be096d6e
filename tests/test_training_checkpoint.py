"""Checkpoints: SAELens disk format loadable by both libraries; bitwise resume; config validation."""

import json

import pytest
import torch

import sparsekern
from sparsekern.training import SAETrainer, TrainingConfig

sae_lens = pytest.importorskip("sae_lens")

CASES = [
    ("topk", {}),
    ("topk", {"normalize_activations": "expected_average_only_in", "b_dec_init_method": "mean"}),
    ("batchtopk", {"normalize_activations": "expected_average_only_in"}),
    (
        "jumprelu",
        {"normalize_activations": "expected_average_only_in", "b_dec_init_method": "geometric_median"},
    ),
    ("standard", {"normalize_activations": "expected_average_only_in"}),
    ("gated", {}),
    ("gated", {"normalize_activations": "expected_average_only_in"}),
]


def _batches(n, d_in=12, seed=0, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, d_in, generator=g) * scale + 1.0 for _ in range(n)]


def _cfg(arch, **kw):
    base = dict(
        architecture=arch,
        d_in=12,
        d_sae=40,
        k=4,
        train_batch_size_tokens=32,
        training_tokens=32 * 20,
        dead_feature_window=3,
        n_batches_for_norm_estimate=2,
        jumprelu_init_threshold=0.05,
        lr=1e-2,
    )
    base.update(kw)
    return TrainingConfig(**base)


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(k)}" for a, k in CASES])
def test_checkpoint_loads_in_both_libraries_with_same_outputs(tmp_path, arch, kw):
    tr = SAETrainer(_cfg(arch, **kw))
    tr.fit(_batches(6), progress=False)
    path = tr.save_checkpoint(tmp_path / "ck")
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (path / name).is_file()
    assert json.loads((path / "cfg.json").read_text())["normalize_activations"] == "none"
    if arch == "batchtopk":
        assert json.loads((path / "cfg.json").read_text())["architecture"] == "jumprelu"
    ours = sparsekern.SAE.load_from_disk(path)
    theirs = sae_lens.SAE.load_from_disk(str(path))
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(11)) * 5.0 + 1.0
    with torch.no_grad():
        # float32 inference of the same weights: the encode (12 terms) and decode (<= 40 latents) sums are
        # reordered by the kernels, n <= 52 roundings of u = 6e-8 on sum|terms| <= ~3 |out|: independent
        # roundings give |err| ~ sqrt(52) * 6e-8 * 3 |out| = 1.3e-6 |out| (worst case 9e-6 |out|), within
        # atol + rtol |out| = 1e-5 + 1e-5 |out|. (Seeded x: no pre-activation within rounding of a
        # threshold / top-k boundary, where a flip would be an O(1) difference.)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        if arch == "batchtopk":  # exported as a JumpReLU: a fixed threshold, not the batch top-k
            return
        # the exported (folded) SAE reproduces the training module on raw inputs
        s = tr.scaling_factor or 1.0
        mod_out = tr.sae.forward_train(x * s, x * s, None, tr.coefficients()).sae_out / s
        # the folds (times s and the decoder norms, divided by them) add <= 3 roundings per weight and the
        # scaled forward 2 per value on top of the sums above: n <= ~60, worst case 60 u * 3 |out| = 1.1e-5
        # |out|, under 1e-4 + 1e-4 |out|
        torch.testing.assert_close(ours(x), mod_out, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*sparsekern addition that SAELens cannot load")
@pytest.mark.parametrize("mode", ["plain", "skip"])
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_transcoder_checkpoint_round_trip(tmp_path, arch, mode):
    cfg = _cfg(
        arch,
        transcoder=True,
        skip_transcoder=mode == "skip",
        d_out=10,
        hook_name="blocks.0.ln2.hook_normalized",
        hook_name_out="blocks.0.hook_mlp_out",
        normalize_activations="expected_average_only_in",
    )
    tr = SAETrainer(cfg)
    xs = _batches(6)
    ys = [x[:, :10] * 2 + 0.5 for x in xs]
    tr.fit(list(zip(xs, ys)), progress=False)
    path = tr.save_checkpoint(tmp_path / "tc")
    ours = sparsekern.SAE.load_from_disk(path)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(12)) * 5
    s = tr.scaling_factor
    with torch.no_grad():
        mod_out = tr.sae.forward_train(x * s, x[:, :10] * s, None, tr.coefficients()).sae_out / s
        # as in the SAE test above: the folds and the reordered float32 sums, worst case ~1.1e-5 |out|
        torch.testing.assert_close(ours(x), mod_out, atol=1e-4, rtol=1e-4)
        if arch != "topk":  # SAELens has no TopK transcoder class
            theirs = sae_lens.SAE.load_from_disk(str(path))
            # float32, the same weights: reordered sums only (derivation in the SAE test above)
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "standard", "gated"])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, arch):
    kw = dict(
        normalize_activations="expected_average_only_in",
        lr_warm_up_steps=3,
        lr_decay_steps=4,
        l1_warm_up_steps=5,
        l0_warm_up_steps=5,
        b_dec_init_method="mean",
    )
    batches = _batches(12, seed=3)
    full = SAETrainer(_cfg(arch, **kw))
    full.fit(batches, progress=False)

    part = SAETrainer(_cfg(arch, **kw))
    part.fit(batches[:5], progress=False)
    part.save_checkpoint(tmp_path / "mid")
    resumed = SAETrainer.resume(tmp_path / "mid")
    resumed.fit(batches[5:], progress=False)

    assert resumed.n_training_steps == full.n_training_steps == 12
    for (name, a), (_, b) in zip(full.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(full.n_forward_passes_since_fired, resumed.n_forward_passes_since_fired)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tr = SAETrainer(_cfg("topk"))
    tr.step(_batches(1)[0])
    path = tr.save_checkpoint(tmp_path / "ck")
    before = (path / "sae_weights.safetensors").read_bytes()
    tr.step(_batches(1, seed=1)[0])
    from sparsekern.training import checkpoint as ck

    monkeypatch.setattr(ck, "save_state", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        tr.save_checkpoint(path)
    assert (path / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(architecture="topk", d_sae=8, k=9), "k"),
        (dict(architecture="topk", transcoder=True, apply_b_dec_to_input=True), "apply_b_dec_to_input"),
        (dict(architecture="mystery"), "architecture"),
        (dict(d_sae=0), "d_sae"),
        (dict(d_in=-3), "d_in"),
        (dict(train_batch_size_tokens=0), "train_batch_size_tokens"),
        (dict(lr=0.0), "lr"),
        (dict(normalize_activations="layer_norm"), "normalize_activations"),
        (dict(b_dec_init_method="median"), "b_dec_init_method"),
        (dict(architecture="gated", transcoder=True), "gated"),
        (dict(architecture="batchtopk", k=0), "k"),
        (dict(device="cuda:7" if not torch.cuda.is_available() else "meta"), "device"),
    ],
)
def test_bad_configs_raise_naming_the_field(kw, field):
    base = dict(d_in=8, d_sae=32, k=4)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**base)


def test_step_rejects_wrong_shapes():
    tr = SAETrainer(_cfg("topk"))
    with pytest.raises(ValueError, match="d_in"):
        tr.step(torch.randn(4, 5))
    tc = SAETrainer(_cfg("topk", transcoder=True, d_out=6))
    with pytest.raises(ValueError, match="targets"):
        tc.step(torch.randn(4, 12))


def test_geometric_median_is_the_weiszfeld_fixed_point():
    from sparsekern.training.trainer import geometric_median

    g = torch.Generator().manual_seed(0)
    pts = torch.cat(
        [
            torch.randn(200, 5, generator=g, dtype=torch.float64),
            torch.full((20, 5), 50.0, dtype=torch.float64),
        ]
    )
    m = geometric_median(pts)
    u = (pts - m) / (pts - m).norm(dim=-1, keepdim=True)
    assert u.sum(0).norm() < 1e-4 * len(pts)  # the gradient of sum ||p - m|| vanishes
    assert m.norm() < 1.5 < pts.mean(0).norm()  # robust to the outliers, unlike the mean
