"""sparsekern.distributed, data parallel: 2 gloo processes on localhost against one process over everything.

One spawned pair runs every capability and also computes the single-process result itself (same thread
count, same process), so the comparisons are bitwise where the design promises it: top-k states (values
and locations) and patching sweeps; FeatureStats integer fields exact and float sums to 1e-12; DDP
training weights to 1e-6. The failure tests check that a rank that raises makes the other one fail with a
clear error instead of hanging (the process group has a timeout; the parent joins with one too).
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsekern.distributed import merge_topk_states, sharded_range
from sparsekern.features import top_activating_examples
from sparsekern.ops.feature_topk import FeatureTopKState

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
WORLD = 2


# ---- launcher ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, pg_timeout, fn, q):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        q.put((rank, "ok", fn(rank)))
    except BaseException as e:  # reported to the parent, which asserts on it
        q.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, pg_timeout=30.0, join_timeout=120.0) -> dict:
    """Run ``fn(rank)`` on WORLD spawned processes; {rank: ("ok", result) | ("error", msg, tb)}.
    Processes still alive after ``join_timeout`` are killed and reported as ("hung",)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, port, pg_timeout, fn, q), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + join_timeout
    while len(out) < WORLD and time.monotonic() < deadline:
        try:
            rank, *rest = q.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            out[rank] = tuple(rest)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
        out.setdefault(r, ("hung",) if p.exitcode is None or p.exitcode < 0 else ("died", p.exitcode))
    return out


def ok(results: dict) -> list:
    for r in range(WORLD):
        assert results[r][0] == "ok", f"rank {r}: {results[r]}"
    return [results[r][1] for r in range(WORLD)]


# ---- fixtures built identically in every process -------------------------------------------------------
def tiny_sae(d_in=16, d_sae=48):
    import sparsekern as sk

    torch.manual_seed(0)
    sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae


def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=40, n_ctx=8,
                                  act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    return model


def tie_heavy_tokens(n_seq=11, ctx=6):
    """Only 3 distinct sequences, repeated: every activation value occurs on several sequences (ties)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 40, (3, ctx), generator=g)
    return base[torch.arange(n_seq) % 3]


# ---- the capabilities, one worker ----------------------------------------------------------------------
def _topk_and_stats(rank):
    from sparsekern.distributed import distributed_feature_stats, distributed_top_activating_examples
    from sparsekern.features import feature_stats

    model, sae = tiny_model(), tiny_sae()
    hook = "blocks.0.hook_resid_post"
    sae.cfg.metadata.hook_name = hook
    tokens = tie_heavy_tokens()
    one = top_activating_examples(sae, tokens.split(4), k=5, model=model, progress=False)
    mine = sharded_range(tokens.shape[0], rank, WORLD)
    shard = tokens[mine.start:mine.stop]
    dist_state = distributed_top_activating_examples(sae, shard.split(2), k=5, seq_offset=mine.start,
                                                     model=model, progress=False)
    n_ties = int((one.values[:, 1:] == one.values[:, :-1]).sum())
    # FeatureStats on activations (with co-occurrence): all sequences vs this rank's, merged
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(9, 5, 16, generator=g)
    kw = dict(cooccurrence=True, hist_range=(1e-2, 1e2), hist_bins=8, progress=False)
    full = feature_stats(sae, list(acts.split(2)), **kw)
    r = sharded_range(acts.shape[0], rank, WORLD)
    merged = distributed_feature_stats(sae, list(acts[r.start:r.stop].split(2)), **kw)
    exact = all(torch.equal(getattr(full, n), getattr(merged, n))
                for n in ("counts", "hist_counts", "act_max", "act_min", "cooccurrence"))
    rel = max(float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())
              for a, b in ((full.act_sum, merged.act_sum), (full.act_sq_sum, merged.act_sq_sum)))
    return dict(
        topk_values_equal=torch.equal(one.values, dist_state.values),
        topk_locations_equal=torch.equal(one.locations, dist_state.locations),
        n_ties=n_ties, filled=int(one.count().sum()),
        stats_exact=exact, stats_n_tokens=(full.n_tokens, merged.n_tokens), stats_rel=rel,
    )


def _sweeps(rank):
    import pandas as pd

    import sparsekern.patching as skp
    from sparsekern.distributed import distributed_patch

    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 40, (2, 6), generator=g)
    corr = torch.randint(0, 40, (2, 6), generator=g)
    corr[:, 0] = clean[:, 0]  # some no-op patches
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 3].mean()

    def odd_setter(act, index, clean_act):  # not a known setter: one forward per patch
        act[:, index[1]] = clean_act[:, index[1]]
        return act

    df = pd.DataFrame({"layer": [1, 0, 1, 0, 1], "pos": [4, 2, -1, 0, 3], "head": [3, 0, 1, 2, 0]})
    calls = [
        (skp.get_act_patch_resid_pre, {}),
        (skp.get_act_patch_resid_pre, {"max_batch": 3}),
        (skp.get_act_patch_attn_head_all_pos_every, {"max_batch": 4}),
        (skp.get_act_patch_attn_head_by_pos_every, {}),
        (skp.generic_activation_patch, dict(patch_setter=skp.layer_pos_head_vector_patch_setter,
                                            activation_name="z", index_df=df, return_index_df=True)),
        (skp.generic_activation_patch, dict(patch_setter=odd_setter, activation_name="resid_pre",
                                            index_axis_names=("layer", "pos"))),
    ]
    out = {}
    for i, (fn, kw) in enumerate(calls):
        kw = dict(kw, progress=False)
        # without max_batch the plan follows the memory budget; a tiny model is capped by rows, not bytes
        single = fn(model, corr, cache, metric, **kw)
        got = distributed_patch(fn, model, corr, cache, metric, **kw)
        if isinstance(single, tuple):
            assert single[1].equals(got[1])  # the index_df
            single, got = single[0], got[0]
        out[i] = (torch.equal(single, got), float((single - got).abs().max()), tuple(single.shape))
    return out


def _ablation(rank):
    """distributed_ablate_features (and distributed_patch(ablate_features)) against ablate_features."""
    import sparsekern.patching as skp
    from sparsekern.distributed import distributed_ablate_features, distributed_patch
    from sparsekern.patching.feature_ablation import ablate_features

    model, sae = tiny_model(), tiny_sae()
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 3].mean()

    active = ablate_features(model, tokens, sae, metric, progress=False).feature_ids.tolist()
    inactive = sorted(set(range(48)) - set(active))[:2]
    explicit = [active[3], inactive[0], active[0], active[3], inactive[1], active[-1]]  # order, dups, off
    cases = [
        ({}, False),
        (dict(features=explicit, return_delta=False), False),  # inactive entries = the baseline, not summed
        (dict(per_position=True), False),
        (dict(per_position=True, max_batch=2), True),  # through distributed_patch
        (dict(features=explicit, backend="reference"), False),
        (dict(per_position=True, backend="reference", use_error_term=False), True),
    ]
    out = {}
    for i, (kw, via_patch) in enumerate(cases):
        kw = dict(kw, progress=False)
        one = ablate_features(model, tokens, sae, metric, **kw)
        if via_patch:
            got = distributed_patch(skp.feature_ablation.ablate_features, model, tokens, sae, metric, **kw)
        else:
            got = distributed_ablate_features(model, tokens, sae, metric, **kw)
        out[i] = ({f: torch.equal(getattr(one, f), getattr(got, f)) for f in one._fields},
                  tuple(one.values.shape), int(one.active.sum()))
    try:  # different features per rank: every rank refuses (nothing summed)
        distributed_ablate_features(model, tokens, sae, metric, [active[rank]], progress=False)
    except RuntimeError as e:
        out["mismatch"] = str(e)
    return out


def _ddp(rank):
    from sparsekern.distributed import DistributedSAETrainer, shard_rows
    from sparsekern.training import SAETrainer, TrainingConfig

    cfg = TrainingConfig(architecture="topk", d_in=8, d_sae=32, k=3, lr=1e-2, dead_feature_window=2,
                         normalize_activations="expected_average_only_in", n_batches_for_norm_estimate=2,
                         b_dec_init_method="geometric_median", train_batch_size_tokens=24,
                         training_tokens=24 * 6, checkpoint_path=None)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(25, 8, generator=g) * 3 + 1 for _ in range(6)]
    one = SAETrainer(cfg)
    m_one = [one.step(b[:24]) for b in batches[:2]]  # a bare step estimates the scale from its batch
    one.fit([b[:24] for b in batches[2:]], progress=False)
    ddp = DistributedSAETrainer(cfg)
    m_ddp = [ddp.step(shard_rows(b[:24])) for b in batches[:2]]
    ddp.fit([shard_rows(b[:24]) for b in batches[2:]], progress=False)
    diff = max(float((a - b).abs().max()) for a, b in zip(one.sae.state_dict().values(),
                                                            ddp.sae.state_dict().values()))
    steps, scale = (one.n_training_steps, ddp.n_training_steps), (one.scaling_factor, ddp.scaling_factor)
    # what the ranks estimate the scale from (the first bare step's batch): each rank's float32 norms summed
    # in float32, the two sums then added in float64 (exact for two values, whatever the order)
    first = batches[0][:24]
    rank_sums = [first[r.start:r.stop].float().norm(dim=-1).sum().item() for r in (range(0, 12), range(12, 24))]
    scale_from_rank_sums = math.sqrt(8) / ((rank_sums[0] + rank_sums[1]) / 24)
    dead = (one.dead_neurons.sum().item(), ddp.dead_neurons.sum().item())
    tokens = ddp.n_training_tokens
    keys = ("loss", "mse", "l0", "explained_variance")
    mdiff = max(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for a, b in zip(m_one, m_ddp) for k in keys)
    # evaluate on the same weights: global sums over the ranks' rows (13 + 12) vs one process
    ddp.sae.load_state_dict(one.sae.state_dict())
    ddp.n_forward_passes_since_fired.copy_(one.n_forward_passes_since_fired)
    ddp.scaling_factor = one.scaling_factor
    held_out = [torch.randn(25, 8, generator=g) * 2 - 1 for _ in range(2)]
    ev_one, ev_ddp = one.evaluate(held_out), ddp.evaluate([shard_rows(b) for b in held_out])
    ev_local = one.evaluate([shard_rows(b) for b in held_out])  # what this rank alone would report
    for arch in ("standard", "jumprelu", "gated"):  # uneven shards (13 + 12 rows), the other losses
        c = TrainingConfig(architecture=arch, d_in=8, d_sae=32, lr=1e-2, b_dec_init_method="mean",
                           l1_coefficient=0.5, l0_coefficient=0.1, normalize_sae_decoder=arch == "standard",
                           checkpoint_path=None)
        one, ddp = SAETrainer(c), DistributedSAETrainer(c)
        for b in batches[:3]:
            one.step(b[:25]), ddp.step(shard_rows(b[:25]))
        diff = max(diff, *(float((a - b).abs().max()) for a, b in zip(one.sae.state_dict().values(),
                                                                      ddp.sae.state_dict().values())))
    return dict(param_diff=diff, metric_diff=mdiff, steps=steps, dead=dead, scale=scale, tokens=tokens,
                scale_from_rank_sums=scale_from_rank_sums,
                evaluate=(ev_one, ev_ddp, ev_local))


def _recon_metrics(rank):
    """distributed_reconstruction_metrics (and DistributedSAETrainer.evaluate's model_* metrics) over the
    ranks' batches against one process over all of them."""
    import dataclasses

    from sparsekern.distributed import DistributedSAETrainer, distributed_reconstruction_metrics
    from sparsekern.features.metrics import reconstruction_metrics
    from sparsekern.training import SAETrainer, TrainingConfig

    model, sae = tiny_model(), tiny_sae()
    hook = "blocks.0.hook_resid_post"
    sae.cfg.metadata.hook_name = hook
    g = torch.Generator().manual_seed(6)
    batches = [torch.randint(0, 40, (2, 6), generator=g) for _ in range(3)]
    mine = batches[sharded_range(3, rank, WORLD).start:sharded_range(3, rank, WORLD).stop]  # 2 + 1 batches

    def compare(a, b):
        da, db = dataclasses.asdict(a), dataclasses.asdict(b)
        exact = all(torch.equal(da[k], db[k]) for k in da if isinstance(da[k], torch.Tensor))
        rel = max(abs(da[k] - db[k]) / max(1.0, abs(da[k])) for k in da if isinstance(da[k], float))
        return exact and da["n_tokens"] == db["n_tokens"] and da["n_sequences"] == db["n_sequences"], rel

    out = {}
    for name, kw in (("plain", {}), ("ignore", dict(ignore_tokens=[int(batches[0][0, 0])]))):
        one = reconstruction_metrics(model, sae, batches, progress=False, **kw)
        out[name] = compare(one, distributed_reconstruction_metrics(model, sae, mine, progress=False, **kw))
    cfg = TrainingConfig(architecture="topk", d_in=16, d_sae=32, k=4, hook_name=hook, checkpoint_path=None)
    one, ddp = SAETrainer(cfg), DistributedSAETrainer(cfg)
    ddp.sae.load_state_dict(one.sae.state_dict())
    e1, e2 = one.evaluate(model=model, eval_tokens=batches), ddp.evaluate(model=model, eval_tokens=mine)
    out["trainer"] = (sorted(e1) == sorted(e2) and len(e1) > 10,
                      max(abs(e1[k] - e2[k]) / max(1.0, abs(e1[k])) for k in e1))
    return out


def _train_sae_ddp(rank):
    import hashlib

    from sparsekern.distributed import train_sae_ddp
    from sparsekern.training import TrainingConfig

    cfg = TrainingConfig(architecture="topk", d_in=16, d_sae=32, k=4, train_batch_size_tokens=16,
                         training_tokens=16 * 3, checkpoint_path=None)
    sae = train_sae_ddp(tiny_model(), tie_heavy_tokens(n_seq=12), "blocks.0.hook_resid_pre", cfg,
                        progress=False, store_batch_size_prompts=2, buffer_size_tokens=32)
    return hashlib.sha1(sae.W_enc.detach().numpy().tobytes()).hexdigest()


def _ddp_nonfinite(rank):
    """A NaN on one rank's rows: every rank refuses the step (no hang, no weight moved), or every rank
    skips it with skip_nonfinite; the int64-token hint comes before any collective."""
    import warnings

    from sparsekern.distributed import DistributedSAETrainer
    from sparsekern.training import NonFiniteError, TrainingConfig

    out = {}
    for skip in (False, True):
        cfg = TrainingConfig(architecture="topk", d_in=8, d_sae=32, k=3, lr=1e-2, skip_nonfinite=skip,
                             checkpoint_path=None)
        tr = DistributedSAETrainer(cfg)
        tr.step(torch.randn(12, 8, generator=torch.Generator().manual_seed(rank)))
        before = [p.detach().clone() for p in tr.sae.parameters()]
        x = torch.randn(12, 8)
        if rank == 1:
            x[3, 3] = float("nan")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                m = tr.step(x)
            res = {"metrics": m, "warned": any("skipped the batch of step 1" in str(w.message) for w in seen)}
        except NonFiniteError as e:
            res = {"error": str(e), "what": e.what, "step": e.step}
        res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, tr.sae.parameters()))
        res["steps"] = tr.n_training_steps
        tr.step(torch.randn(12, 8))  # the group is still in step
        out["skip" if skip else "raise"] = res
    try:
        tr.step(torch.zeros(12, 8, dtype=torch.int64))
    except TypeError as e:
        out["tokens"] = str(e)
    return out


def _failure_inside(rank):
    """Rank 1 raises inside a data-parallel call: both ranks must raise (and the group stays usable)."""
    try:
        _rank1_raises_inside(rank)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _all_capabilities(rank):
    return {"topk": _topk_and_stats(rank), "sweeps": _sweeps(rank), "ablation": _ablation(rank),
            "recon_metrics": _recon_metrics(rank),
            "ddp": _ddp(rank), "ddp_nonfinite": _ddp_nonfinite(rank),
            "train_sae_ddp": _train_sae_ddp(rank), "failure": _failure_inside(rank)}


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("transformer_lens")
    return ok(launch(_all_capabilities, join_timeout=240))


def test_topk_bitwise_equal_with_ties(results):
    for res in results:
        t = res["topk"]
        assert t["n_ties"] > 10 and t["filled"] > 0  # the stream really is tie-heavy
        assert t["topk_values_equal"] and t["topk_locations_equal"]


def test_feature_stats_merged(results):
    for res in results:
        t = res["topk"]
        assert t["stats_exact"]
        assert t["stats_n_tokens"][0] == t["stats_n_tokens"][1] == 45
        assert t["stats_rel"] <= 1e-12  # float64 sums, only the addition order differs


def test_sweeps_identical(results):
    for res in results:
        for i, (equal, diff, shape) in res["sweeps"].items():
            assert equal, f"sweep {i}: max |diff| {diff}"
    assert results[0]["sweeps"][2][2] == (5, 2, 4)


def test_feature_ablation_identical(results):
    for res in results:
        msg = res["ablation"].pop("mismatch")
        assert "distributed_ablate_features: the ranks disagree on" in msg and "features" in msg, msg
        for i, (equal, shape, n_active) in res["ablation"].items():
            assert all(equal.values()), f"case {i}: {equal}"
            assert n_active > 0
            if i in (1, 2, 4):  # some entries were not run (inactive): filled once, not summed
                assert n_active < math.prod(shape)
    shapes = [results[0]["ablation"][i][1] for i in range(6)]
    assert shapes[1] == shapes[4] == (6,) and len(shapes[2]) == len(shapes[5]) == 2 and shapes[2][1] == 6


def test_ddp_matches_full_batch(results):
    for res in results:
        d = res["ddp"]
        assert d["steps"] == (6, 6) and d["tokens"] == 6 * 24
        # one process sums its 24 float32 norms in float32, each rank its 12 (then float64 over the ranks).
        # Worst case, any summation order (Higham 3.1, u = 2^-24; norms > 0 so the bound is relative): 23u for
        # the 24-term sum + 11u for a 12-term one; a row's norm (8 squares summed, a sqrt) may differ by 5u per
        # side if the kernel splits rows otherwise; one division rounding per side. 46u ~ 2.7e-6.
        assert d["scale"][0] == pytest.approx(d["scale"][1], rel=(23 + 11 + 2 * 5 + 2) * 2.0**-24)
        assert d["scale"][1] == d["scale_from_rank_sums"]  # exactly the float32 per-rank sums
        assert d["dead"][0] == d["dead"][1]
        assert d["param_diff"] <= 1e-6, d
        assert d["metric_diff"] <= 1e-6, d  # step metrics: global sums, relative to max(1, |value|)
    assert results[0]["train_sae_ddp"] == results[1]["train_sae_ddp"]  # the ranks' weights are bitwise equal


def test_ddp_refuses_or_skips_a_nonfinite_batch_on_every_rank(results):
    for res in results:
        r = res["ddp_nonfinite"]
        bad = r["raise"]
        assert "step 1 refused: the input activations x hold 1 NaN / inf" in bad["error"], bad  # summed
        assert bad["what"] == ["x"] and bad["step"] == 1 and bad["unchanged"] and bad["steps"] == 1, bad
        skip = r["skip"]
        assert skip["metrics"] == {"skipped": 1.0, "skipped_batches": 1.0} and skip["warned"], skip
        assert skip["unchanged"] and skip["steps"] == 1, skip
        assert "did you pass tokens" in r["tokens"], r


def test_reconstruction_metrics_global(results):
    for res in results:
        for name, (exact, rel) in res["recon_metrics"].items():
            assert exact and rel <= 1e-9, (name, exact, rel)  # float64 sums over the same forward passes


def test_ddp_evaluate_is_global(results):
    for res in results:
        one, ddp, local = res["ddp"]["evaluate"]
        assert set(one) == set(ddp) == {"mse", "l0", "explained_variance", "dead_fraction"}
        assert all(abs(one[k] - ddp[k]) <= 1e-6 * max(1.0, abs(one[k])) for k in one), (one, ddp)
        assert abs(local["mse"] - one["mse"]) > 1e-3  # a rank's own rows would report something else
    assert results[0]["ddp"]["evaluate"][1] == results[1]["ddp"]["evaluate"][1]  # the same on every rank


# ---- failure paths -------------------------------------------------------------------------------------
def _rank1_raises_inside(rank):
    from sparsekern.distributed import distributed_top_activating_examples

    sae = tiny_sae()
    batches = [torch.randn(2, 3, 16)] if rank == 0 else ["not a tensor"]
    distributed_top_activating_examples(sae, batches, seq_offset=2 * rank, k=3, progress=False)


def _rank1_dies_before(rank, hang=0.0):
    """Rank 1 never reaches the collective: it raises (and exits) at once, or after ``hang`` seconds."""
    from sparsekern.distributed import all_gather_topk_state

    if rank == 1:
        time.sleep(hang)
        raise ValueError("rank 1 broke before the collective")
    t0 = time.monotonic()
    try:
        all_gather_topk_state(FeatureTopKState.empty(8, 2))
    except RuntimeError as e:
        raise RuntimeError(f"after {time.monotonic() - t0:.1f} s: {e}") from e


def _rank1_hangs(rank):
    return _rank1_dies_before(rank, hang=PG_TIMEOUT + 3)


def test_rank_that_raises_fails_the_others(results):
    assert results[1]["failure"].startswith("TypeError: batches must yield torch.Tensor")
    assert "top_activating_examples failed on another rank (rank 1: TypeError" in results[0]["failure"]


PG_TIMEOUT = 4.0


@pytest.mark.parametrize("worker", [_rank1_dies_before, _rank1_hangs], ids=["exits", "hangs"])
def test_rank_that_never_arrives_fails_the_others_within_timeout(worker):
    res = launch(worker, pg_timeout=PG_TIMEOUT, join_timeout=60)
    assert res[1][:2] == ("error", "ValueError: rank 1 broke before the collective")
    assert res[0][0] == "error", res[0]
    msg = res[0][1]
    expected = "sparsekern.distributed: top-k state layout (sizes) failed on rank 0: another rank failed"
    assert expected in msg, msg
    assert float(msg.split("after ")[1].split(" s")[0]) < PG_TIMEOUT + 2.5, msg  # the group's timeout


# ---- single process: helpers and argument checks ---------------------------------------------------------
def test_sharded_range_covers_in_order():
    for n in (0, 1, 5, 11):
        for w in (1, 2, 3, 4):
            parts = [sharded_range(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        sharded_range(4, 2, 2)
    with pytest.raises(ValueError, match="n must"):
        sharded_range(-1, 0, 1)


def test_merge_topk_states_equals_one_pass_with_ties():
    sae = tiny_sae()
    base = torch.randn(2, 4, 16)
    acts = base[torch.arange(7) % 2]  # ties everywhere
    one = top_activating_examples(sae, [acts], k=4, progress=False)
    parts = [top_activating_examples(sae, [acts[a:b]], k=4, seq_offset=a, progress=False)
             for a, b in ((0, 3), (3, 4), (4, 7))]
    merged = merge_topk_states(parts[::-1])  # any order: the tie rule is on locations
    assert torch.equal(merged.values, one.values) and torch.equal(merged.locations, one.locations)
    assert int((one.values[:, 1:] == one.values[:, :-1]).sum()) > 0 and math.isfinite(float(one.values[0, 0]))
    with pytest.raises(ValueError, match="states\\[1\\]"):
        merge_topk_states([parts[0], FeatureTopKState.empty(48, 5)])


def test_bad_input_without_a_process_group():
    import sparsekern.patching.feature_ablation as fa
    from sparsekern.distributed import DistributedSAETrainer, distributed_patch
    from sparsekern.training import TrainingConfig

    with pytest.raises(TypeError, match="fn must be sparsekern.patching"):
        distributed_patch(fa.measure_ablations)  # a step of a sweep, not a sweep
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_patch(fa.ablate_features, "model", "tokens", "sae", "metric")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sharded_range(4)
    with pytest.raises(ValueError, match="batchtopk"):
        DistributedSAETrainer(TrainingConfig(architecture="batchtopk", d_in=4, d_sae=8, k=2))


def test_feature_stats_rebuilt_from_tensors_merges_like_the_original():
    import copy

    from sparsekern import SparseActs
    from sparsekern.features.stats import FeatureStats

    g = torch.Generator().manual_seed(2)

    def part():
        st = FeatureStats(12, top_partners=2, conditioned_on=3, conditioned_sum=True, y_moments=True,
                          second_moment_features=[1, 5])
        idx = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(20)])
        st.update(SparseActs(torch.rand(20, 4, generator=g, dtype=torch.float64), idx),
                  torch.randn(20, 3, generator=g, dtype=torch.float64))
        return st

    a, b = part(), part()
    rebuilt = FeatureStats.from_state_dict(b.state_dict())  # what all_gather_feature_stats does per rank
    want = copy.deepcopy(a).merge(b)
    got = copy.deepcopy(a).merge(rebuilt)
    for k, v in want.state_dict()["tensors"].items():
        assert torch.equal(v, got.state_dict()["tensors"][k]), k
    assert got.n_tokens == 40
