"""The public seams of sparsekern.patching: the shared argument checks, ``shard=``, the engine's extension
points and feature ablation's plan / measure / assemble steps (what sparsekern.distributed builds on).

Every comparison here is bitwise: a share of a sweep runs exactly the chunks it runs in the whole sweep.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens")
from test_feature_ablation import make_sae, model_for
from test_feature_ablation import tokens as ablation_tokens
from test_patching import Setup, logit_diff, mean_logprob

import sparsekern.patching as skp
from sparsekern.patching import Engine, Shard, attribution
from sparsekern.patching.feature_ablation import (
    AblationValues,
    ablate_features,
    assemble_ablations,
    measure_ablations,
    plan_ablations,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s():
    return Setup("gpt2")


# ---- one token check for every sweep -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0,)])
def test_empty_tokens_are_refused_alike_by_every_sweep(s, shape):
    empty = torch.zeros(shape, dtype=torch.long)
    msg = r"must hold at least one prompt of at least one token, got shape \["
    with pytest.raises(ValueError, match="corrupted_tokens " + msg):
        skp.get_act_patch_resid_pre(s.model, empty, s.cache, logit_diff, progress=False)
    with pytest.raises(ValueError, match="corrupted_tokens " + msg):
        attribution.get_act_patch_resid_pre(s.model, empty, s.cache, logit_diff)
    sae = make_sae("topk", "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="tokens " + msg):
        ablate_features(s.model, empty, sae, logit_diff, progress=False)


def test_token_shape_and_dtype_errors_name_the_argument(s):
    sae = make_sae("topk", "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match=r"corrupted_tokens must have shape \[batch, pos\] \(or \[pos\]\)"):
        skp.get_act_patch_resid_pre(s.model, s.corr[None], s.cache, logit_diff, progress=False)
    with pytest.raises(TypeError, match="corrupted_tokens must be an integer tensor"):
        skp.get_act_patch_resid_pre(s.model, s.corr.tolist(), s.cache, logit_diff, progress=False)
    with pytest.raises(TypeError, match="tokens must be an integer tensor .* got dtype torch.bool"):
        ablate_features(s.model, s.corr.bool(), sae, logit_diff, progress=False)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):  # bool is no batch size
        skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, logit_diff, progress=False, max_batch=True)


# ---- shard= ------------------------------------------------------------------------------------------
def _shares(fn, world, *args, **kw):
    shards = [Shard(r, world) for r in range(world)]
    outs = [fn(*args, shard=sh, **kw) for sh in shards]
    return outs, shards


@pytest.mark.parametrize(
    "fn,kw",
    [
        (skp.get_act_patch_resid_pre, {"max_batch": 3}),
        (skp.get_act_patch_attn_head_all_pos_every, {"max_batch": 4}),
        (skp.get_act_patch_attn_head_out_by_pos, {"backend": "reference"}),
    ],
    ids=["engine", "every", "reference"],
)
def test_shares_of_a_sweep_sum_to_the_sweep_bitwise(s, fn, kw):
    full = fn(s.model, s.corr, s.cache, mean_logprob, progress=False, **kw)
    outs, shards = _shares(fn, 3, s.model, s.corr, s.cache, mean_logprob, progress=False, **kw)
    total = outs[0] + outs[1] + outs[2]
    assert torch.equal(total, full)
    ran = [o != 0 for o in outs]
    assert all(r.any() for r in ran)  # each share ran something ...
    assert not (ran[0] & ran[1]).any() and not (ran[1] & ran[2]).any()  # ... and no slot twice
    assert shards[0].plans == shards[1].plans == shards[2].plans and shards[0].plans  # one plan


def test_noop_patches_are_written_by_one_share(s):
    # position 0 is a no-op (shared first token): its value is the corrupted metric, on rank 0 only
    outs, _ = _shares(skp.get_act_patch_resid_pre, 2, s.model, s.corr, s.cache, logit_diff, progress=False)
    with torch.no_grad():
        base = logit_diff(s.model(s.corr))
    assert torch.equal(outs[0][:, 0], torch.full((2,), float(base))) and bool((outs[1][:, 0] == 0).all())


def test_bad_shard():
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world=2\)"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="world must be a positive int"):
        Shard(0, 0)
    s = Setup("gpt2")
    with pytest.raises(TypeError, match="shard must be None or a sparsekern.patching.Shard"):
        skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, logit_diff, progress=False, shard=(0, 2))


# ---- the engine's extension points --------------------------------------------------------------------
def test_engine_calls_its_extension_points_as_documented(s):
    """A subclass declares the patches of layer 0 no-ops and records what ``patch_hooks`` is asked to apply:
    every other patch, once; the no-ops get the corrupted run's metric."""
    from sparsekern.patching import Patch

    class Spy(Engine):
        def noop_patches(self, patches, clean):
            return [p for p in patches if p.layer == 0]

        def patch_hooks(self, items, n_rep, start, clean, length):
            assert all(0 <= j < n_rep[p.layer] for j, p in items)  # slice j exists at the patch's block
            self.seen += [id(p) for _, p in items]
            return super().patch_hooks(items, n_rep, start, clean, length)

    hook = "blocks.{}.hook_resid_pre"
    patches = [Patch(0, 2 * layer + pos, layer, pos, hook.format(layer), "pos", (pos,))
               for layer in (0, 1) for pos in (1, 3)]  # fmt: skip
    clean = {hook.format(i): s.cache[hook.format(i)] for i in (0, 1)}
    eng = Spy(s.model, s.corr)
    eng.seen = []
    vals = eng.run(patches, clean, logit_diff, "metric", 1, None, False)  # one patch per forward
    assert sorted(eng.seen) == sorted(id(p) for p in patches if p.layer == 1)
    with torch.no_grad():
        base = logit_diff(s.model(s.corr))
    assert torch.equal(vals[:2], torch.full((2,), float(base)))
    plain = Engine(s.model, s.corr).run(patches, clean, logit_diff, "metric", 1, None, False)
    assert torch.equal(vals[2:], plain[2:])  # the patches it did run are the plain engine's
    assert not torch.equal(vals[:2], plain[:2])  # (which does run layer 0's)


# ---- feature ablation: plan / measure / assemble -----------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ablation_steps_rebuild_ablate_features_and_shard_exactly(backend):
    model, toks = model_for("gpt2"), ablation_tokens()
    sae = make_sae("topk", "blocks.0.hook_mlp_out")
    kw = dict(max_batch=2, backend=backend, progress=False)
    want = ablate_features(model, toks, sae, mean_logprob, per_position=True, return_delta=False, **kw)
    plan = plan_ablations(model, toks, sae, per_position=True)
    assert plan.n_ablations == int(plan.active.sum()) and plan.positions.shape == (plan.n_ablations,)
    whole = measure_ablations(plan, mean_logprob, **kw)
    got = assemble_ablations(plan, whole, return_delta=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    shares = [measure_ablations(plan, mean_logprob, shard=Shard(r, 2), **kw) for r in range(2)]
    assert all(torch.equal(sh.baseline, whole.baseline) for sh in shares)  # every share measures it
    assert torch.equal(shares[0].values + shares[1].values, whole.values)
    assert (shares[0].values != 0).any() and (shares[1].values != 0).any()
    with pytest.raises(ValueError, match=r"measured.values must have shape \[n_ablations="):
        assemble_ablations(plan, AblationValues(whole.values[1:], whole.baseline))
