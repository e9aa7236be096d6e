"""Training refuses bad input (issue 19, part 6): non-finite inputs / losses / gradients are refused before
the optimiser touches the weights (or skipped with ``skip_nonfinite``), non-float activations get a hint,
every checkpoint / activation reader names the file it could not read, and sequences longer than the
model's ``n_ctx`` are refused up front."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sparsekern.training import (ActivationStore, NonFiniteError, Reducer, SAETrainer, TrainingConfig,
                                 train_sae)

D_IN, D_SAE, N = 8, 32, 24
ARCHS = ["topk", "batchtopk", "jumprelu", "standard", "gated"]


def _cfg(arch="topk", **kw):
    base = dict(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=3, lr=1e-2, train_batch_size_tokens=N,
                training_tokens=N * 50, dead_feature_window=2, checkpoint_path=None)
    return TrainingConfig(**{**base, **kw})


def _batch(seed=0, n=N, d=D_IN):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _state(tr):
    """Everything a refused step must leave alone."""
    return {
        "params": {k: v.detach().clone() for k, v in tr.sae.state_dict().items()},
        "optim": copy.deepcopy(tr.optimizer.state_dict()["state"]),
        "counters": (tr.n_training_steps, tr.n_training_tokens, tr.n_frac_active_samples,
                     tr.n_forward_passes_since_fired.clone(), tr.act_freq_scores.clone()),
        "init": (tr.scaling_factor, tr.b_dec_initialized),
    }


def _assert_unchanged(before, tr):
    after = _state(tr)
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), k
    assert before["optim"].keys() == after["optim"].keys()
    for i, st in before["optim"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["optim"][i][key])), (i, key)
    c0, c1 = before["counters"], after["counters"]
    assert c0[:3] == c1[:3] and torch.equal(c0[3], c1[3]) and torch.equal(c0[4], c1[4])
    assert before["init"] == after["init"]
    assert all(p.grad is None for p in tr.sae.parameters())


# ---- non-finite inputs, losses, gradients --------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises_before_the_weights_change(arch, bad):
    tr = SAETrainer(_cfg(arch))
    for i in range(2):  # Adam has moments: they must not move either
        tr.step(_batch(i))
    before = _state(tr)
    x = _batch(5)
    x[3, 1] = bad
    x[7, 0] = bad
    msg = r"step 2 refused: the input activations x hold 2 NaN / inf"
    with pytest.raises(NonFiniteError, match=msg) as e:
        tr.step(x)
    assert e.value.step == 2 and e.value.what == ["x"]
    assert "skip_nonfinite=True" in str(e.value)  # says how to skip instead
    _assert_unchanged(before, tr)
    tr.step(_batch(6))  # the trainer still works
    assert tr.n_training_steps == 3


def test_nonfinite_targets_of_a_transcoder_are_named():
    tr = SAETrainer(_cfg("topk", transcoder=True, d_out=6))
    y = _batch(1, d=6)
    y[0, 0] = float("nan")
    before = _state(tr)
    with pytest.raises(NonFiniteError, match="the targets y hold 1 NaN") as e:
        tr.step(_batch(0), y)
    assert e.value.what == ["y"]
    _assert_unchanged(before, tr)


@pytest.mark.parametrize("arch", ARCHS)
def test_nonfinite_loss_from_finite_input_is_refused_and_the_first_batch_init_undone(arch):
    # finite in float32, but the squared error overflows (1e20^2 > 3.4e38): the loss is inf. On a first
    # step the batch has already set b_dec (mean init): that is undone.
    tr = SAETrainer(_cfg(arch, b_dec_init_method="mean"))
    x = _batch(0)
    x[0] = 1e20
    before = _state(tr)
    with pytest.raises(NonFiniteError, match=r"step 0 refused: the loss") as e:
        tr.step(x)
    assert "loss" in e.value.what or any(w.endswith("_loss") for w in e.value.what), e.value.what
    _assert_unchanged(before, tr)
    assert not tr.b_dec_initialized and not tr.sae.b_dec.any()  # b_dec is not left at this batch's mean
    tr.step(_batch(1))
    # the next batch sets it; then its first Adam step moves each entry by |m / sqrt(v)| * lr <= lr = 1e-2
    torch.testing.assert_close(tr.sae.b_dec.detach(), _batch(1).mean(0), atol=1.1e-2, rtol=0)


def test_a_refused_step_undoes_the_forward_s_threshold_clamp():
    tr = SAETrainer(_cfg("jumprelu"))
    tr.sae.threshold.data[:4] = -0.5  # as Adam may leave it; the next forward clamps it to >= 0
    before = _state(tr)
    x = _batch(0)
    x[0] = 1e20  # an inf loss, found after the forward
    with pytest.raises(NonFiniteError, match="the loss"):
        tr.step(x)
    _assert_unchanged(before, tr)


def test_the_loss_term_that_is_not_finite_is_named():
    tr = SAETrainer(_cfg("standard"))
    tr.sae.W_dec.data[0, 0] = float("inf")  # ||W_dec[0]|| = inf: the L1 term; the decode too
    with pytest.raises(NonFiniteError, match=r"the loss term\(s\) .*l1_loss") as e:
        tr.step(_batch(0))
    assert "l1_loss" in e.value.what


def test_nonfinite_gradient_with_a_finite_loss_is_refused():
    tr = SAETrainer(_cfg("topk"))
    tr.step(_batch(0))
    tr.sae.W_dec.register_hook(lambda g: g * float("nan"))
    before = _state(tr)
    with pytest.raises(NonFiniteError, match=r"gradient norm is nan although the loss is finite") as e:
        tr.step(_batch(1))
    assert e.value.what == ["gradient"]
    _assert_unchanged(before, tr)


def test_skip_nonfinite_skips_counts_and_warns(tmp_path):
    tr = SAETrainer(_cfg("topk", skip_nonfinite=True))
    tr.step(_batch(0))
    before = _state(tr)
    x = _batch(1)
    x[2, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipped the batch of step 1: the input activations x hold 1"):
        m = tr.step(x)
    assert m == {"skipped": 1.0, "skipped_batches": 1.0}
    _assert_unchanged(before, tr)
    assert tr.n_skipped_batches == 1
    m = tr.step(_batch(2))
    assert m["skipped_batches"] == 1.0 and tr.n_training_steps == 2
    # the count survives a checkpoint
    back = SAETrainer.resume(tr.save_checkpoint(tmp_path / "ck"))
    assert back.n_skipped_batches == 1


def test_skipped_batches_in_fit_equal_a_run_without_them():
    good = [_batch(i) for i in range(6)]
    bad = _batch(99)
    bad[0, 0] = float("inf")
    clean = SAETrainer(_cfg("topk", skip_nonfinite=True))
    clean.fit(good, n_steps=6, progress=False)
    skipping = SAETrainer(_cfg("topk", skip_nonfinite=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        skipping.fit(good[:3] + [bad] + good[3:], n_steps=6, progress=False)
    assert skipping.n_skipped_batches == 1 and skipping.n_training_steps == clean.n_training_steps == 6
    for (k, a), b in zip(clean.sae.state_dict().items(), skipping.sae.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_bare_first_step_refuses_a_batch_whose_norm_overflows():
    tr = SAETrainer(_cfg("topk", normalize_activations="expected_average_only_in"))
    x = _batch(0)
    x[0] = 1e20  # finite, but its norm is not in float32
    before = _state(tr)
    with pytest.raises(NonFiniteError, match="have NaN / inf activation norms"):
        tr.step(x)
    _assert_unchanged(before, tr)


def test_scaling_estimate_refuses_or_leaves_out_nonfinite_batches():
    good = [_batch(i) for i in range(3)]
    bad = _batch(9)
    bad[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 batch\(es\) have NaN / inf activation norms"):
        SAETrainer(_cfg("topk")).estimate_scaling_factor(good + [bad])
    want = SAETrainer(_cfg("topk")).estimate_scaling_factor(good)
    got = SAETrainer(_cfg("topk", skip_nonfinite=True)).estimate_scaling_factor(good[:1] + [bad] + good[1:])
    assert got == want


def test_a_step_combines_its_nonfinite_checks_once():
    # the inputs', losses' and gradient's checks go through one reducer.sum (one collective under data
    # parallelism, one host sync on a GPU); only a step that estimates the scale checks its inputs first
    calls = []

    class Counting(Reducer):
        def sum(self, values, what):
            calls.append(what)
            return super().sum(values, what)

    tr = SAETrainer(_cfg("topk"), reducer=Counting())
    tr.step(_batch(0))
    tr.step(_batch(1))
    assert calls == ["non-finite checks"] * 2
    calls.clear()
    tr = SAETrainer(_cfg("topk", normalize_activations="expected_average_only_in"), reducer=Counting())
    tr.step(_batch(0))
    tr.step(_batch(1))
    assert calls == ["non-finite checks", "scaling factor", "non-finite checks", "non-finite checks"]
    x = _batch(2)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the input activations x hold 1 NaN") as e:
        tr.step(x)  # found by the one check after the backward, and named as an input
    assert e.value.what == ["x"]


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_nonfinite must be a bool"):
        _cfg(skip_nonfinite="yes")


# ---- non-float activations -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_tokens_passed_as_activations_are_refused_with_a_hint(dtype):
    tr = SAETrainer(_cfg("topk"))
    before = _state(tr)
    tokens = torch.randint(0, 2, (N, D_IN)).to(dtype)
    hint = r"x must hold float activations .*did you pass tokens\? pass activations"
    with pytest.raises(TypeError, match=hint):
        tr.step(tokens)
    with pytest.raises(TypeError, match="use train_sae with a model"):
        tr.fit([tokens], progress=False)
    with pytest.raises(TypeError, match="did you pass tokens"):  # a token matrix of any width
        tr.step(torch.randint(0, 50, (4, 128)))
    _assert_unchanged(before, tr)
    tc = SAETrainer(_cfg("topk", transcoder=True, d_out=6))
    with pytest.raises(TypeError, match="y must hold float activations"):
        tc.step(_batch(0), torch.zeros(N, 6, dtype=torch.int64))


def test_tokens_passed_to_the_scaling_estimate_are_refused():
    tr = SAETrainer(_cfg("topk", normalize_activations="expected_average_only_in"))
    with pytest.raises(TypeError, match="did you pass tokens"):
        tr.fit([torch.randint(0, 9, (N, D_IN))], progress=False)
    assert tr.scaling_factor is None


# ---- checkpoint and activation readers name the file --------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    tr = SAETrainer(_cfg("topk"))
    tr.step(_batch(0))
    return tr.save_checkpoint(tmp_path / "ck")


def test_truncated_trainer_state_names_the_file(checkpoint):
    f = checkpoint / "trainer_state.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = r"trainer_state\.safetensors: cannot read the trainer state tensors"
    with pytest.raises(ValueError, match=msg) as e:
        SAETrainer.resume(checkpoint)
    assert str(f) in str(e.value) and "truncated" in str(e.value)
    f.write_bytes(b"\x07")  # shorter than a header
    with pytest.raises(ValueError, match=str(f)):
        SAETrainer.resume(checkpoint)


@pytest.mark.parametrize("content, match", [
    ('{"cfg": {"d_in": 8,', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ("[1, 2]", "not a sparsekern trainer state"),
])
def test_corrupted_trainer_json_names_the_file(checkpoint, content, match):
    f = checkpoint / "trainer_state.json"
    f.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=match) as e:
        SAETrainer.resume(checkpoint)
    assert str(f) in str(e.value)


def test_incomplete_or_mismatched_trainer_state_names_the_checkpoint(checkpoint):
    f = checkpoint / "trainer_state.json"
    meta = json.loads(f.read_text())
    del meta["n_training_steps"]
    f.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has no entry 'n_training_steps'") as e:
        SAETrainer.resume(checkpoint)
    assert str(checkpoint) in str(e.value)
    meta["n_training_steps"] = 1
    meta["cfg"]["d_sae"] = D_SAE * 2  # tensors of another width
    f.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit this trainer") as e:
        SAETrainer.resume(checkpoint)
    assert str(checkpoint) in str(e.value)
    meta["cfg"]["architecture"] = "mystery"
    f.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="architecture") as e:
        SAETrainer.resume(checkpoint)
    assert str(f) in str(e.value)


def test_missing_trainer_state_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sparsekern trainer checkpoint"):
        SAETrainer.resume(tmp_path)


def test_truncated_activation_shard_and_token_files_name_the_file(tmp_path):
    shard = tmp_path / "shard.safetensors"
    save_file({"h": torch.randn(64, 4)}, str(shard))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read the cached activations") as e:
        list(ActivationStore.from_cached(shard, "h", train_batch_size_tokens=8))
    assert str(shard) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ActivationStore.from_cached([tmp_path / "missing.safetensors"], "h")
    npy = tmp_path / "tokens.npy"
    np.save(npy, np.zeros((4, 8), dtype=np.int64))
    npy.write_bytes(npy.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the tokens") as e:
        ActivationStore(_FakeModel(), npy, "h", train_batch_size_tokens=8)
    assert str(npy) in str(e.value)
    st = tmp_path / "tokens.safetensors"
    st.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="cannot read the tokens") as e:
        ActivationStore(_FakeModel(), st, "h", train_batch_size_tokens=8)
    assert str(st) in str(e.value)


# ---- sequences longer than n_ctx ---------------------------------------------------------------------
class _FakeModel:
    """Just enough of a HookedTransformer to build a store; running it fails the test."""

    hook_dict = {"h": None}

    class cfg:
        n_ctx = 8
        model_name = "fake"

    def run_with_cache(self, *a, **k):
        raise AssertionError("the model must not run on sequences longer than n_ctx")


@pytest.mark.parametrize("kind", ["tensor", "npy", "safetensors", "iterable"])
def test_sequences_longer_than_n_ctx_are_refused_before_the_model_runs(kind, tmp_path):
    toks = torch.randint(0, 50, (6, 12))
    if kind == "npy":
        src = tmp_path / "t.npy"
        np.save(src, toks.numpy())
    elif kind == "safetensors":
        src = tmp_path / "t.safetensors"
        save_file({"tokens": toks}, str(src))
    else:
        src = toks if kind == "tensor" else [toks[:3], toks[3:]]
    match = r"sequences of 12 positions are longer than the model's n_ctx=8; cut them .*tokens\[:, :8\]"
    if kind != "iterable":  # known up front: refused when the store is built
        with pytest.raises(ValueError, match=match):
            ActivationStore(_FakeModel(), src, "h", train_batch_size_tokens=8)
    with pytest.raises(ValueError, match=match):  # an iterable: as its first batch arrives
        train_sae(_FakeModel(), src, "h", _cfg("topk"), progress=False)
    ok = ActivationStore(_FakeModel(), toks[:, :8], "h", train_batch_size_tokens=8)  # n_ctx itself is fine
    assert ok.batch_size == 8


def test_train_sae_refuses_long_sequences_on_a_real_model():
    tl = pytest.importorskip("transformer_lens")
    model = tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=8, d_head=4, n_heads=2, d_vocab=50, attn_only=True, seed=0))
    with pytest.raises(ValueError, match=r"longer than the model's n_ctx=8"):
        train_sae(model, torch.randint(0, 50, (4, 9)), "blocks.0.hook_resid_pre", _cfg("topk"),
                  progress=False)
    sae = train_sae(model, torch.randint(0, 50, (8, 8)), "blocks.0.hook_resid_pre",
                    _cfg("topk", training_tokens=N * 2), progress=False, store_batch_size_prompts=4)
    assert sae.cfg.metadata.context_size == 8
