"""Feature-sharded SAE on 2 gloo processes (localhost) against the single-process SAE.

One spawn for the whole module (importing sparsekern takes seconds per process): each rank runs every
scenario below in order, builds the single-process reference itself, and writes its measurements to
``rank<r>.json``; the tests assert on them. Bitwise for top-k indices, 1e-6 for values / outputs /
gradients (float64 where sums are reordered). The failure scenarios run last (the last one kills rank 1).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD, TIMEOUT_S = 2, 30.0


# ---- helpers run inside the ranks ------------------------------------------------------------------
def _sae(arch, d_in=16, d_sae=101, seed=0, dtype=torch.float64, **cfg):
    import sparsekern as sk

    sae = sk.SAE.from_dict({"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": str(dtype)[6:],
                            **({"k": 8} if "topk" in arch else {}), **cfg})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() == 2 else 0.2))
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return sae


def _slice(name, t, sh):
    from sparsekern.distributed.sharded_sae import _slice as s

    return s(name, t, sh.feature_offset, sh.feature_offset + sh.d_sae_local)


def _diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _codes(sae, sh, x) -> dict:
    a, b = sae.encode_sparse(x), sh.encode_sparse(x)
    same_shape = a.indices.shape == b.indices.shape
    return {"indices_equal": same_shape and torch.equal(a.indices, b.indices),
            "values_diff": _diff(a.values, b.values) if same_shape else float("inf")}


def _grads(sae, sh, x) -> dict:
    """forward output + every gradient (x, sharded params sliced, replicated params) vs the SAE."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = sae(x1), sh(x2)
    w = torch.linspace(-1, 1, y1.numel(), dtype=y1.dtype).view_as(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    out = {"out_diff": _diff(y1, y2), "dx_diff": _diff(x1.grad, x2.grad)}
    for name, p in sh.named_parameters():
        ref = getattr(sae, name).grad
        out[f"d{name}_diff"] = _diff(_slice(name, ref, sh), p.grad) if p.grad is not None else (
            0.0 if ref is None else float("inf"))
    return out


def s_topk(rank, tmp):
    from sparsekern.distributed import ShardedSAE

    res = {}
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    sae32 = _sae("topk", dtype=torch.float32)
    res["f32"] = _codes(sae32, ShardedSAE.from_sae(sae32), x)
    for label, kw in {"f64": {}, "rescale": {"rescale_acts_by_decoder_norm": True},
                      "k_gt_local": {"d_sae": 11, "k": 8}, "norelu": {"apply_relu": False}}.items():
        sae = _sae("topk", **kw)
        sh = ShardedSAE.from_sae(sae)
        res[label] = {**_codes(sae, sh, x.double()), **_grads(sae, sh, x.double()),
                      "local_cols": sh.W_enc.shape[1], "offset": sh.feature_offset}
    # tie-heavy: integer weights and inputs, many equal pre-activations; ties -> lower global index
    sae = _sae("topk", dtype=torch.float32, d_sae=64, k=12)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-1, 2, sae.W_enc.shape, generator=g).float())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    xt = torch.randint(-1, 2, (64, 16), generator=g).float()
    res["ties"] = _codes(sae, ShardedSAE.from_sae(sae), xt)
    pre = xt @ sae.W_enc
    res["ties"]["tied_rows"] = int(sum(len(r.unique()) < 64 for r in pre))
    return res


def s_threshold(rank, tmp):
    from sparsekern.distributed import ShardedSAE

    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = {}
    for arch in ("jumprelu", "standard", "gated", "jumprelu_transcoder", "topk_skip_transcoder"):
        sae = _sae(arch, **({"d_out": 12} if "transcoder" in arch else {}))
        sh = ShardedSAE.from_sae(sae)
        res[arch] = {**_codes(sae, sh, x), **_grads(sae, sh, x), "isinstance": isinstance(sh, type(sae))}
    return res


def s_io(rank, tmp):
    import torch.distributed as dist

    import sparsekern as sk
    from sparsekern.distributed import ShardedSAE

    sae = _sae("jumprelu", dtype=torch.float32)
    path = Path(tmp) / "sae"
    if rank == 0:
        sae.save_model(path)
    dist.barrier()
    loaded = sk.SAE.load_from_disk(path, shard=True)
    ref = ShardedSAE.from_sae(sae)
    same = all(torch.equal(p, getattr(ref, n)) for n, p in loaded.named_parameters())
    full = loaded.to_sae()
    back = all(torch.equal(p, getattr(sae, n)) for n, p in full.named_parameters())
    loaded.save_model(Path(tmp) / "again")
    again = sk.SAE.load_from_disk(Path(tmp) / "again")
    round_trip = all(torch.equal(p, getattr(sae, n)) for n, p in again.named_parameters())
    return {"shard_equal": same, "to_sae_equal": back, "save_round_trip": round_trip,
            "local_rows": loaded.W_dec.shape[0], "class": type(loaded).__name__}


def s_hooked(rank, tmp):
    from transformer_lens import HookedTransformerConfig

    import sparsekern as sk
    from sparsekern.distributed import ShardedSAE

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
                                  act_fn="gelu_new", normalization_type="LN", seed=0)
    torch.manual_seed(0)
    model = sk.HookedSAETransformer(cfg).eval()
    sae = _sae("topk", dtype=torch.float32, d_sae=64, hook_name="blocks.1.hook_resid_pre")
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sh = ShardedSAE.from_sae(sae)
    toks = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = model.run_with_saes(toks, saes=[sae])
        b = model.run_with_saes(toks, saes=[sh])
        _, ca = model.run_with_cache_with_saes(toks, saes=[sae])
        _, cb = model.run_with_cache_with_saes(toks, saes=[sh])
    key = "blocks.1.hook_resid_pre.hook_sae_acts_post"
    return {"logits_diff": _diff(a, b), "acts_post_diff": _diff(ca[key], cb[key]), "has_key": key in cb}


def _train_cfg(**kw):
    from sparsekern.training import TrainingConfig

    base = dict(architecture="topk", d_in=16, d_sae=64, k=2, dtype="float64", lr=1e-2, dead_feature_window=1,
                seed=5, train_batch_size_tokens=32, training_tokens=32 * 4, checkpoint_path=None)
    return TrainingConfig(**{**base, **kw})


def _train_diff(tr_full, tr_sh, steps_full, steps_sh) -> dict:
    init = {n: p.detach().clone() for n, p in tr_full.sae.named_parameters()}
    m_full = [tr_full.step(*b) for b in steps_full]
    m_sh = [tr_sh.step(*b) for b in steps_sh]
    inf_full, inf_sh = tr_full.to_inference(), tr_sh.to_inference()
    out = {"loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(m_full, m_sh)),
           "aux_seen": max(a.get("auxiliary_reconstruction_loss", 0.0) for a in m_full),
           "l0_diff": max(abs(a["l0"] - b["l0"]) for a, b in zip(m_full, m_sh)),
           "l1_seen": max(a.get("l1_loss", 0.0) for a in m_full),
           # the least any parameter moved (W_skip aside: zero init, moves only for skip transcoders)
           "min_moved": min(_diff(p, init[n]) for n, p in tr_full.sae.named_parameters() if n != "W_skip"),
           "dead_fraction_diff": max(abs(a["dead_fraction"] - b["dead_fraction"])
                                     for a, b in zip(m_full, m_sh))}
    for name, p in inf_sh.named_parameters():
        out[f"{name}_diff"] = _diff(_slice(name, getattr(inf_full, name), inf_sh), p)
    if hasattr(inf_full, "threshold"):  # the straight-through threshold gradient really acted
        moved = inf_full.threshold.detach() - tr_full.cfg.jumprelu_init_threshold
        out["threshold_moved"] = float(moved.abs().max())
    return out


def s_train(rank, tmp):
    from sparsekern.distributed import ShardedTrainer
    from sparsekern.training import SAETrainer

    g = torch.Generator().manual_seed(10)
    batches = [(torch.randn(32, 16, generator=g, dtype=torch.float64),) for _ in range(4)]
    cfg = _train_cfg()
    feature = _train_diff(SAETrainer(cfg), ShardedTrainer(cfg), batches, batches)
    jcfg = _train_cfg(architecture="jumprelu", l0_coefficient=0.5, jumprelu_bandwidth=0.5)
    jumprelu = _train_diff(SAETrainer(jcfg), ShardedTrainer(jcfg), batches, batches)
    tcfg = _train_cfg(transcoder=True, skip_transcoder=True, d_out=12)
    pairs = [(b[0], torch.randn(32, 12, generator=g, dtype=torch.float64)) for b in batches]
    transcoder = _train_diff(SAETrainer(tcfg), ShardedTrainer(tcfg), pairs, pairs)
    # data x feature: feature groups of one rank each, one data group of both; rank r takes half r
    import torch.distributed as dist

    solo = [dist.new_group([r]) for r in range(WORLD)][rank]
    halves = [(b[0][rank * 16:(rank + 1) * 16],) for b in batches]
    dp = ShardedTrainer(cfg, group=solo, data_group=dist.group.WORLD)
    data = _train_diff(SAETrainer(cfg), dp, batches, halves)
    # standard (L1 on decoder-norm-weighted activations) and gated (L1 + gate-path auxiliary loss); a
    # standard skip transcoder with lp_norm=2 and a warm-up; gated data x feature parallel
    out = {"feature": feature, "data": data, "jumprelu": jumprelu, "transcoder": transcoder}
    for kind, kw, full_b, sh_b, groups in (
            ("standard", dict(architecture="standard", l1_coefficient=0.3), batches, batches, {}),
            ("standard_lp2", dict(architecture="standard", l1_coefficient=0.3, lp_norm=2.0,
                                  l1_warm_up_steps=2, skip_transcoder=True, d_out=12), pairs, pairs, {}),
            ("gated", dict(architecture="gated", l1_coefficient=0.3), batches, batches, {}),
            ("gated_data", dict(architecture="gated", l1_coefficient=0.3), batches, halves,
             dict(group=solo, data_group=dist.group.WORLD)),
            # b_dec from the first batch's mean: of every replica's rows
            ("init_data", dict(b_dec_init_method="mean"), batches, halves,
             dict(group=solo, data_group=dist.group.WORLD))):
        c = _train_cfg(**kw)
        out[kind] = _train_diff(SAETrainer(c), ShardedTrainer(c, **groups), full_b, sh_b)
    # the activation scale estimated from the norms of every replica's rows
    c = _train_cfg(normalize_activations="expected_average_only_in")
    one = SAETrainer(c).estimate_scaling_factor([batches[0][0]])
    out["scale_rel_diff"] = abs(ShardedTrainer(c, group=solo, data_group=dist.group.WORLD)
                                .estimate_scaling_factor([halves[0][0]]) / one - 1)
    out["nonfinite"] = _nonfinite(rank, solo)
    return out


def _nonfinite(rank, solo):
    """NaN in one data replica's rows: every rank of both groups refuses the step (or skips it)."""
    import warnings

    import torch.distributed as dist
    from sparsekern.distributed import ShardedTrainer
    from sparsekern.training import NonFiniteError

    res = {}
    for skip in (False, True):
        tr = ShardedTrainer(_train_cfg(skip_nonfinite=skip), group=solo, data_group=dist.group.WORLD)
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        tr.step(x)
        before = [p.detach().clone() for p in tr.sae.parameters()]
        if rank == 0:
            x[0, 0] = float("inf")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                r = {"metrics": tr.step(x)}
        except NonFiniteError as e:
            r = {"what": e.what}
        r["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, tr.sae.parameters()))
        tr.step(torch.randn(16, 16, dtype=torch.float64))  # still in step with the other rank
        res["skip" if skip else "raise"] = r
    return res


def s_checkpoint(rank, tmp):
    """save_checkpoint after 2 steps, resume, 2 more steps == 4 uninterrupted steps (bitwise)."""
    from sparsekern.distributed import ShardedTrainer

    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(20 + i), dtype=torch.float64)
               for i in range(4)]
    cfg = _train_cfg()
    straight = ShardedTrainer(cfg)
    for b in batches:
        straight.step(b)
    first = ShardedTrainer(cfg)
    for b in batches[:2]:
        first.step(b)
    first.save_checkpoint(Path(tmp) / "ck")
    again = ShardedTrainer.resume(Path(tmp) / "ck")
    for b in batches[2:]:
        again.step(b)
    same = all(torch.equal(p, q) for p, q in zip(straight.sae.parameters(), again.sae.parameters()))
    return {"same": same, "steps": again.n_training_steps,
            "files": sorted(p.name for p in (Path(tmp) / "ck").iterdir())}


def s_mismatch(rank, tmp):
    from sparsekern.distributed import ShardedSAE

    out = {}
    try:
        ShardedSAE.from_sae(_sae("topk", seed=rank))  # each rank its own weights
        out["weights"] = "no error"
    except ValueError as e:
        out["weights"] = str(e)
    try:
        ShardedSAE.from_sae(_sae("topk", d_sae=100 + rank))
        out["config"] = "no error"
    except ValueError as e:
        out["config"] = str(e)
    sae = _sae("topk")
    local = {k: v for k, v in ShardedSAE.from_sae(sae).state_dict().items()}
    local["W_dec"] = local["W_dec"][:-1]  # one feature row short
    try:
        ShardedSAE.from_local_state_dict(sae.cfg.to_dict(), local)
        out["shape"] = "no error"
    except ValueError as e:
        out["shape"] = str(e)
    return out


def s_timeout(rank, tmp):
    """Rank 1 never joins a collective on a group with a 3 s timeout: rank 0 must fail, not hang."""
    import torch.distributed as dist

    from sparsekern.distributed import ShardedSAE

    group = dist.new_group(timeout=timedelta(seconds=3))
    sh = ShardedSAE.from_sae(_sae("topk"), group)
    dist.barrier()
    if rank == 1:
        time.sleep(4)
        return {"skipped": True}
    t0 = time.perf_counter()
    try:
        sh.encode_sparse(torch.randn(2, 16, dtype=torch.float64))
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}


def s_crash(rank, tmp):
    """Rank 1 raises (and its process exits); rank 0's next collective must fail with a clear error."""
    from sparsekern.distributed import ShardedSAE

    sh = ShardedSAE.from_sae(_sae("topk"))
    if rank == 1:
        raise RuntimeError("injected failure on rank 1")
    time.sleep(1.0)
    t0 = time.perf_counter()
    try:
        sh.encode_sparse(torch.randn(2, 16, dtype=torch.float64))
        return {"error": None}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}


SCENARIOS = [s_topk, s_threshold, s_io, s_hooked, s_train, s_checkpoint, s_mismatch, s_timeout, s_crash]


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    from sparsekern.distributed import init_process_group

    init_process_group(rank, WORLD, port, timeout_s=TIMEOUT_S)
    results: dict = {}
    path = Path(tmp) / f"rank{rank}.json"
    for fn in SCENARIOS:
        t0 = time.perf_counter()
        try:
            results[fn.__name__] = fn(rank, tmp)
        except Exception as e:
            results[fn.__name__] = {"exception": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
            if fn is s_crash:
                path.write_text(json.dumps(results, default=str))
                os._exit(1)  # a rank that raises: its process dies
        results[fn.__name__ + "_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(results, default=str))
    os._exit(0)  # skip destroy_process_group: the peer is gone after s_crash


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from sparsekern.distributed import free_port

    tmp = str(tmp_path_factory.mktemp("sharded"))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, tmp)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    for p in procs:
        p.join(max(1, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
    out = []
    for r in range(WORLD):
        f = Path(tmp) / f"rank{r}.json"
        out.append(json.loads(f.read_text()) if f.exists() else {})
        print(f"rank {r}:", {k: round(v, 2) for k, v in out[-1].items() if k.endswith("_s")})
    return out


def _ok(res: dict, name: str) -> dict:
    r = res.get(name)
    assert r is not None, f"scenario {name} did not run (rank hung or died earlier)"
    assert "exception" not in r, r.get("tb") or r
    return r


TOL = 1e-6


def test_topk_encode_is_the_single_process_op(runs):
    for res in runs:
        r = _ok(res, "s_topk")
        for label in ("f32", "f64", "rescale", "k_gt_local", "norelu", "ties"):
            assert r[label]["indices_equal"], (label, r[label])
            assert r[label]["values_diff"] <= TOL, (label, r[label])
        assert r["ties"]["tied_rows"] > 30  # the tie rule is really exercised
        assert r["k_gt_local"]["local_cols"] < 8  # a rank holds fewer than k features


def test_topk_decode_and_gradients(runs):
    offsets = set()
    for res in runs:
        r = _ok(res, "s_topk")
        for label in ("f64", "rescale", "k_gt_local", "norelu"):
            bad = {k: v for k, v in r[label].items() if k.endswith("_diff") and v > TOL}
            assert not bad, (label, bad)
        offsets.add(r["f64"]["offset"])
        assert r["f64"]["local_cols"] in (50, 51)
    assert offsets == {0, 51}


def test_threshold_codes_and_transcoders(runs):
    for res in runs:
        r = _ok(res, "s_threshold")
        for arch, m in r.items():
            assert m["indices_equal"] and m["isinstance"], (arch, m)
            bad = {k: v for k, v in m.items() if k.endswith("_diff") and v > TOL}
            assert not bad, (arch, bad)


def test_load_from_disk_shard_and_save(runs):
    for res in runs:
        r = _ok(res, "s_io")
        assert r["shard_equal"] and r["to_sae_equal"] and r["save_round_trip"], r
        assert r["local_rows"] in (50, 51) and r["class"] == "ShardedJumpReLUSAE"


def test_hooked_sae_transformer(runs):
    for res in runs:
        r = _ok(res, "s_hooked")
        assert r["has_key"] and r["logits_diff"] <= 1e-5 and r["acts_post_diff"] <= TOL, r


def test_training_feature_and_data_parallel(runs):  # TopK, JumpReLU, TopK skip transcoder
    for res in runs:
        r = _ok(res, "s_train")
        for kind in ("feature", "data", "jumprelu", "transcoder"):
            if kind != "jumprelu":
                assert r[kind]["aux_seen"] > 0, ("AuxK never ran: the dead-feature path is untested", kind, r)
            bad = {k: v for k, v in r[kind].items() if k.endswith("_diff") and v > TOL}
            assert not bad, (kind, bad)
        assert r["jumprelu"]["threshold_moved"] > 1e-4


def test_sharded_training_initialises_from_every_data_replica(runs):
    for res in runs:
        r = _ok(res, "s_train")
        bad = {k: v for k, v in r["init_data"].items() if k.endswith("_diff") and v > TOL}
        assert not bad, bad
        # the norms are float32 (as SAELens): one process sums 32 of them in float32, the replicas 16 each
        # and then add in float64; each sum is within gamma_31 = 31 * 2^-24 = 1.8e-6 of the exact one
        assert r["scale_rel_diff"] <= 2 * 31 * 2.0**-24, r["scale_rel_diff"]


def test_sharded_training_refuses_or_skips_nonfinite_on_every_rank(runs):
    for res in runs:
        r = _ok(res, "s_train")["nonfinite"]
        assert r["raise"]["what"] == ["x"] and r["raise"]["unchanged"], r
        assert r["skip"]["metrics"] == {"skipped": 1.0, "skipped_batches": 1.0} and r["skip"]["unchanged"], r


def test_training_standard_and_gated(runs):  # equal to single process after 4 steps, losses all active
    for res in runs:
        r = _ok(res, "s_train")
        for kind in ("standard", "standard_lp2", "gated", "gated_data"):
            bad = {k: v for k, v in r[kind].items() if k.endswith("_diff") and v > TOL}
            assert not bad, (kind, bad)
            assert r[kind]["min_moved"] > 1e-4, (kind, r[kind])  # every parameter trained
            assert r[kind]["l1_seen"] > 0, (kind, r[kind])  # the sparsity penalty really acted
        for kind in ("gated", "gated_data"):
            assert r[kind]["aux_seen"] > 0, (kind, r[kind])


def test_sharded_trainer_checkpoint_resume(runs):
    for res in runs:
        r = _ok(res, "s_checkpoint")
        assert r["same"] and r["steps"] == 4 and r["files"] == ["rank0-of-2", "rank1-of-2"], r


def test_mismatched_shards_raise(runs):
    for res in runs:
        r = _ok(res, "s_mismatch")
        assert "ranks disagree" in r["weights"] and "checksums" in r["weights"], r
        assert "ranks disagree" in r["config"] and "d_sae" in r["config"], r
    assert "W_dec" in runs[0]["s_mismatch"]["shape"] and "expected" in runs[0]["s_mismatch"]["shape"]


def test_timeout_fails_instead_of_hanging(runs):
    r = _ok(runs[0], "s_timeout")
    assert r["error"] and "sparsekern.distributed" in r["error"] and "timeout" in r["error"], r
    assert r["seconds"] < 20


def test_a_failing_rank_fails_the_others(runs):
    assert "injected failure" in runs[1]["s_crash"]["exception"]
    r = _ok(runs[0], "s_crash")
    assert r["error"] and "sparsekern.distributed" in r["error"] and "rank 0" in r["error"], r
    assert r["seconds"] < TIMEOUT_S + 5


# ---- single-process checks (no process group needed) -------------------------------------------------
def test_shard_range_is_contiguous_and_balanced():
    from sparsekern.distributed import shard_range

    for d_sae, world in ((101, 2), (7, 7), (2**20, 8), (10, 3)):
        ranges = [shard_range(d_sae, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == d_sae
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="d_sae=3 features over 4 ranks"):
        shard_range(3, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 2, 2)


def test_sharded_trainer_refuses_batchtopk():
    from sparsekern.distributed import ShardedTrainer
    from sparsekern.training import TrainingConfig

    with pytest.raises(NotImplementedError, match="'batchtopk'.*whole batch x all features"):
        ShardedTrainer(TrainingConfig(architecture="batchtopk", d_in=4, d_sae=8, k=2, checkpoint_path=None))


def test_bad_inputs_and_no_process_group_fail_clearly():
    import sparsekern as sk
    from sparsekern.distributed import ShardedSAE, merge_topk

    v = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="indices must be int64"):
        merge_topk(v, torch.zeros(4, 3, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="values must be a float tensor"):
        merge_topk(torch.zeros(4, 3, 2), torch.zeros(4, 3, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="k must be an int"):
        merge_topk(v, torch.zeros(4, 3, dtype=torch.int64), 2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ShardedSAE.from_sae(_sae("topk"))
    with pytest.raises(TypeError, match="sparsekern SAE"):
        ShardedSAE.from_sae(torch.nn.Linear(2, 2))
    assert sk  # imported for the SAE registry
