"""ActivationStore: bounded buffer, each position once per epoch, token files, cached shards, hooks."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sparsekern.training import ActivationStore, TrainingConfig, cache_activations, train_sae, train_saes

tl = pytest.importorskip("transformer_lens")

N_SEQ, CTX = 40, 8


@pytest.fixture(scope="module")
def model():
    cfg = tl.HookedTransformerConfig(
        n_layers=2,
        d_model=8,
        n_ctx=CTX,
        d_head=4,
        n_heads=2,
        d_vocab=N_SEQ * CTX,
        act_fn="relu",
        attn_only=True,
        seed=0,
    )
    m = tl.HookedTransformer(cfg)
    with torch.no_grad():
        m.W_E[:, 0] = torch.arange(N_SEQ * CTX, dtype=torch.float32)  # hook_embed row 0 = token id
    return m


def _tokens():
    return torch.arange(N_SEQ * CTX).reshape(N_SEQ, CTX)  # token id = unique position id


def _ids(store):
    out = []
    for b in store:
        x = b[0] if isinstance(b, tuple) else b
        assert x.shape[0] <= store.batch_size
        out.append(x[:, 0].round().long())
    return torch.cat(out)


def test_each_position_once_per_epoch_and_buffer_bounded(model):
    s = ActivationStore(
        model,
        _tokens(),
        ["hook_embed", "hook_pos_embed"],
        train_batch_size_tokens=16,
        store_batch_size_prompts=3,
        buffer_size_tokens=40,
    )
    for epoch in range(2):
        seen = []
        for x, pos in s:
            seen.append(x[:, 0].round().long())
            torch.testing.assert_close(pos, model.W_pos[seen[-1] % CTX])  # both hooks: same rows
        ids = torch.cat(seen)
        assert torch.equal(ids.sort().values, torch.arange(N_SEQ * CTX))
        assert not torch.equal(ids, torch.arange(N_SEQ * CTX))  # shuffled
    assert s.max_rows_held <= 40 < N_SEQ * CTX


def test_token_files_and_iterables(model, tmp_path):
    toks = _tokens()
    np.save(tmp_path / "t.npy", toks.numpy().astype(np.int32))
    save_file({"tokens": toks.contiguous()}, str(tmp_path / "t.safetensors"))
    for src in (
        tmp_path / "t.npy",
        str(tmp_path / "t.safetensors"),
        [toks[i : i + 5] for i in range(0, N_SEQ, 5)],
    ):
        s = ActivationStore(model, src, "hook_embed", train_batch_size_tokens=32, buffer_size_tokens=64)
        assert torch.equal(_ids(s).sort().values, torch.arange(N_SEQ * CTX))


def test_exclude_special_tokens(model):
    s = ActivationStore(
        model, _tokens(), "hook_embed", train_batch_size_tokens=32, exclude_special_tokens=[0, 8, 17]
    )
    ids = _ids(s)
    assert len(ids) == N_SEQ * CTX - 3 and not torch.isin(ids, torch.tensor([0, 8, 17])).any()


def test_cached_shards_read_correctly(model, tmp_path):
    hooks = ["hook_embed", "blocks.0.hook_resid_post"]
    paths = cache_activations(model, _tokens(), hooks, tmp_path / "cache", shard_size_tokens=48)
    assert len(paths) == -(-N_SEQ * CTX // 48)
    _, cache = model.run_with_cache(_tokens(), names_filter=hooks)
    direct = [cache[h].reshape(N_SEQ * CTX, -1) for h in hooks]
    unshuffled = ActivationStore.from_cached(
        tmp_path / "cache", hooks, train_batch_size_tokens=100, shuffle=False, read_rows=7
    )
    got = [torch.cat(p) for p in zip(*unshuffled)]
    for a, b in zip(got, direct):
        torch.testing.assert_close(a, b)
    shuffled = ActivationStore.from_cached(
        tmp_path / "cache", hooks, train_batch_size_tokens=16, buffer_size_tokens=50, read_rows=10
    )
    assert torch.equal(_ids(shuffled).sort().values, torch.arange(N_SEQ * CTX))
    assert shuffled.max_rows_held <= 50
    with pytest.raises(ValueError, match="hook_nope"):
        ActivationStore.from_cached(tmp_path / "cache", ["hook_nope"])


def test_wrong_hook_raises_before_any_forward(model, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="blocks.0.hook_resid_prex"):
        ActivationStore(model, _tokens(), "blocks.0.hook_resid_prex")
    cfg = TrainingConfig(
        architecture="topk", d_in=8, d_sae=16, k=2, train_batch_size_tokens=16, training_tokens=64
    )
    with pytest.raises(ValueError, match="not a hook"):
        train_sae(model, _tokens(), "blocks.9.hook_resid_pre", cfg)
    tc = TrainingConfig(
        architecture="topk", d_in=8, d_sae=16, k=2, transcoder=True, hook_name_out="blocks.0.nope"
    )
    with pytest.raises(ValueError, match="blocks.0.nope"):
        train_sae(model, _tokens(), "blocks.0.hook_resid_pre", tc)
    assert not calls


def test_train_sae_and_transcoder_end_to_end(model):
    cfg = TrainingConfig(
        architecture="topk", d_in=8, d_sae=16, k=2, train_batch_size_tokens=32, training_tokens=32 * 6
    )
    sae = train_sae(
        model, _tokens(), "blocks.1.hook_resid_pre", cfg, progress=False, store_batch_size_prompts=4
    )
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    assert sae.cfg.metadata.context_size == CTX
    tc = TrainingConfig(
        architecture="jumprelu",
        d_in=8,
        d_sae=16,
        transcoder=True,
        d_out=8,
        hook_name_out="blocks.0.hook_attn_out",
        train_batch_size_tokens=32,
        training_tokens=32 * 4,
    )
    t = train_sae(model, _tokens(), "blocks.0.hook_resid_pre", tc, progress=False)
    assert (
        type(t).__name__ == "JumpReLUTranscoder" and t.cfg.metadata.hook_name_out == "blocks.0.hook_attn_out"
    )


def test_train_saes_share_one_forward_per_token_batch(model, monkeypatch):
    calls = []
    real = model.run_with_cache

    def counted(*a, **k):
        calls.append(k.get("names_filter"))
        return real(*a, **k)

    monkeypatch.setattr(model, "run_with_cache", counted)
    base = dict(d_in=8, train_batch_size_tokens=32, training_tokens=32 * 5, k=2)
    cfgs = [
        TrainingConfig(architecture="topk", d_sae=16, hook_name="blocks.0.hook_resid_post", **base),
        TrainingConfig(architecture="batchtopk", d_sae=24, hook_name="blocks.1.hook_resid_post", **base),
        TrainingConfig(architecture="standard", d_sae=16, hook_name="blocks.0.hook_resid_post", **base),
    ]
    saes = train_saes(
        model, _tokens(), cfgs, progress=False, store_batch_size_prompts=10, buffer_size_tokens=64
    )
    assert [type(s).__name__ for s in saes] == ["TopKSAE", "JumpReLUSAE", "StandardSAE"]
    assert all(c == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] for c in calls)
    assert len(calls) <= 4  # 5 batches of 32 rows come from at most 4 forwards of 10 x 8 tokens


def test_periodic_eval_with_model_and_checkpoints(model, tmp_path):
    from sparsekern.training import SAETrainer

    cfg = TrainingConfig(architecture="topk", d_in=8, d_sae=16, k=2, train_batch_size_tokens=32,
                         training_tokens=32 * 6, eval_every_n_steps=3, n_eval_batches=2, n_checkpoints=1,
                         checkpoint_path=str(tmp_path / "ck"), hook_name="blocks.0.hook_resid_post")
    store = ActivationStore(model, _tokens(), cfg.hook_name, train_batch_size_tokens=32)
    tr = SAETrainer(cfg)
    tr.fit(store.batches(6), progress=False, eval_batches=list(store.batches(2)), model=model,
           eval_tokens=[_tokens()[:4]])
    m = tr.last_eval
    for key in ("mse", "explained_variance", "l0", "dead_fraction", "model_ce_loss_score"):
        assert key in m, key
    assert m["l0"] <= 2
    assert (tmp_path / "ck" / "step_3" / "cfg.json").is_file()
