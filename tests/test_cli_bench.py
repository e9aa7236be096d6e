"""`sparsekern bench [SUITE]`: the quick suites write complete JSON/CSV rows; one suite per run; bad flags
fail clearly."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch

import sparsekern
from sparsekern import cli
from sparsekern.bench import FIELDS, runner

HAVE_SAE_LENS = importlib.util.find_spec("sae_lens") is not None

# (op + variant, peer) rows the quick plan must produce at its first shape
EXPECTED = {
    ("topk_encode", "x @ W_enc (bare matmul)"),
    ("topk_encode", "sae_lens.TopKSAE.encode"),
    ("threshold_encode", "sae_lens.JumpReLUSAE.encode"),
    ("sparse_decode", "F.embedding_bag(mode='sum')"),
    ("sparse_decode+b_dec", "sae_lens.TopKSAE.decode (dense code)"),
    ("sparse_decode_backward", "dense_code @ W_dec (autograd)"),
    ("sae_forwardtopk", "sae_lens TopKSAE.forward"),
    ("sae_forwardjumprelu", "sae_lens JumpReLUSAE.forward"),
    ("sae_cachetopk", "sae_lens HookedSAETransformer.run_with_cache_with_saes (dense)"),
    ("sae_cachejumprelu", "sae_lens HookedSAETransformer.run_with_cache_with_saes (dense)"),
    ("sae_cachetopk acts_post only", "sae_lens HookedSAETransformer.run_with_cache_with_saes (dense)"),
    ("feature_topk_update", "sparsekern reference (torch sort)"),
    ("feature_topk_update", "dense torch.topk over [d_sae, k + n]"),
}


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--quick", "--no-progress", "--out", str(out)])
    return rc, out


@pytest.mark.slow
def test_quick_bench_writes_complete_rows(quick_run):
    rc, out = quick_run
    assert rc == 0
    doc = json.loads((out / "latest-ops-quick.json").read_text())
    (stamped,) = [p for p in out.glob("ops-quick-*.json")]
    assert json.loads(stamped.read_text()) == doc
    assert doc["suite"] == "quick" and doc["elapsed_s"] > 0
    m = doc["machine"]
    for key in ("cpu_model", "cpu_cores", "torch", "sparsekern_backends", "date", "device"):
        assert m[key], key
    assert m["sparsekern_backends"] == sparsekern.backends()

    rows = doc["rows"]
    assert {(r["op"] + r["variant"], r["peer"]) for r in rows if r["shape"] == "quick-a"} == EXPECTED
    assert {r["shape"] for r in rows} == {"quick-a", "quick-b", "quick-mem"}
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        assert set(r["dims"]) == {"n", "d_in", "d_sae", "k"}
        if r["status"] == "skipped":
            assert not HAVE_SAE_LENS and "sae_lens" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["backend"] in sparsekern.backends()
        assert _pos(r["sparsekern_ms"]) and _pos(r["peer_ms"]) and _pos(r["ratio"]), r
        assert r["ratio"] == pytest.approx(r["peer_ms"] / r["sparsekern_ms"])
        assert r["repeats"] >= 3
        for key in ("sparsekern_peak_mib", "peer_peak_mib"):
            assert r[key] is None or (math.isfinite(r[key]) and r[key] >= 0)
        if r["target"] is not None:
            assert r["target_met"] in (True, False)
        if r["max_abs_diff"] is not None:  # sparsekern agrees with the peer it is timed against
            assert r["max_abs_diff"] < 1e-3, r
    cache = [r for r in rows if r["op"] == "sae_cache" and r["status"] == "ok"]
    assert all(r["info"]["acts_post_mem_ratio"] > 1 for r in cache)
    thr = [r for r in rows if r["op"] == "threshold_encode"]
    assert thr and all(r["info"]["mean_l0"] > 0 for r in thr)
    mem = [r for r in rows if r["shape"] == "quick-mem"]
    assert mem and all("peak <=" in r["target"] for r in mem)

    with open(stamped.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(FIELDS)


def test_ops_selection_without_peers(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--no-peer", "--no-progress", "--ops", "sparse_decode",
                   "--repeats", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latest-ops-quick.json").read_text())["rows"]
    assert rows and {r["op"] for r in rows} == {"sparse_decode"}
    assert all(r["peer"] is None and r["ratio"] is None and _pos(r["sparsekern_ms"]) for r in rows)
    assert all(r["repeats"] == 3 for r in rows)
    assert "sparse_decode" in capsys.readouterr().out


def test_patching_bench_quick(tmp_path, capsys):
    rc = cli.main(["bench", "--patching", "--quick", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "latest-patching-quick.json").read_text())
    rows = doc["rows"]
    assert {r["case"] for r in rows} == {"resid_pre", "attn_head_out_by_pos", "resid_pre, all-position metric"}
    assert all(r["status"] == "ok" and r["max_abs_diff"] <= 1e-4 * r["metric_scale"] for r in rows)
    assert all(_pos(r["sk_s"]) and _pos(r["tl_full_s_est"]) and r["ratio"] > 0 for r in rows)
    assert list(tmp_path.glob("patching-quick-*.csv"))
    assert "attn_head_out_by_pos" in capsys.readouterr().out


def test_features_bench_quick(tmp_path, capsys):
    rc = cli.main(["bench", "--features", "--quick", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latest-features-quick.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["stats", "stats vs dense", "conditioned", "neighbours", "ablation"]
    assert all(r["status"] == "ok" and _pos(r["sk_s"]) and _pos(r["peer_s"]) for r in rows)
    # every comparison checks its result against the peer's: counts exact, values to float rounding
    diffs = {r["case"]: r["max_abs_diff"] for r in rows if r.get("max_abs_diff") is not None}
    assert diffs["stats vs dense"] == 0 and diffs["neighbours"] < 1e-5 and diffs["ablation"] < 1e-4
    assert diffs["conditioned"] < 1e-5
    assert "decoder_neighbours" not in capsys.readouterr().err


def test_features_bench_cases_subset(tmp_path, capsys):
    rc = cli.main(["bench", "--features", "--quick", "--no-progress", "--cases", "neighbours",
                   "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latest-features-quick.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["neighbours"] and rows[0]["info"]["same_indices"] > 0.99
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--features", "--quick", "--cases", "neighbours,nope"])
    assert e.value.code != 0 and "nope" in capsys.readouterr().err


def test_unknown_op_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", "--ops", "topk_encode,not_an_op"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "unknown op" in err and "not_an_op" in err and "topk_encode" in err


HAVE_TRAINER = importlib.util.find_spec("sparsekern.training") is not None


@pytest.mark.skipif(not (HAVE_SAE_LENS and HAVE_TRAINER), reason="needs sae_lens and sparsekern.training")
def test_training_bench_quick(tmp_path):
    rc = cli.main(["bench", "--training", "--quick", "--no-progress", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "latest-training-quick.json").read_text())
    rows = {r["case"]: r for r in doc["rows"]}
    assert rc == 0, [(r["case"], r.get("note"), r.get("info")) for r in doc["rows"]]
    assert list(rows) == ["step", "throughput", "quality topk", "quality jumprelu", "scale"]
    assert list(tmp_path.glob("training-quick-*.csv"))
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["target_met"] in ((True, False) if r["case"] != "step" else (None,))
    t = rows["throughput"]
    assert _pos(t["sk_tok_s"]) and _pos(t["peer_tok_s"]) and t["speedup"] == pytest.approx(
        t["sk_tok_s"] / t["peer_tok_s"])
    assert t["info"]["dense_ops"] == "none" and t["info"]["peer_dense_ops"] != "none"
    for case in ("quality topk", "quality jumprelu"):
        q = rows[case]
        for key in ("sk_mse", "peer_mse", "mse_rel_diff", "sk_ev", "peer_ev", "ev_rel_diff"):
            assert isinstance(q[key], float) and math.isfinite(q[key]), (case, key, q[key])
        assert q["sk_mse"] > 0 and q["peer_mse"] > 0
    s = rows["scale"]
    assert s["info"]["dense_ops"] == "none" and s["target_met"] is True
    assert s["sk_peak_mib"] is None or s["info"]["peak_over_params"] > 0


def test_training_bench_unknown_case(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--training", "--quick", "--cases", "throughput,nope"])
    assert e.value.code != 0 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--training", "--quick", "--cases", "stats"])
    assert e.value.code != 0


def test_training_bench_step_needs_no_trainer(tmp_path):
    """The bare encode + decode training step against the dense torch step (no trainer, no SAELens)."""
    rc = cli.main(["bench", "--training", "--quick", "--no-progress", "--cases", "step", "--out", str(tmp_path)])
    assert rc == 0
    (r,) = json.loads((tmp_path / "latest-training-quick.json").read_text())["rows"]
    assert r["case"] == "step" and r["status"] == "ok" and _pos(r["sk_ms"]) and _pos(r["peer_ms"])
    assert r["speedup"] == pytest.approx(r["peer_ms"] / r["sk_ms"])
    assert r["info"]["grad_rel_diff"] < 1e-4  # the same gradients as the dense step
    assert r["info"]["encoder_backward"] == "cpp"


# ---- one suite per run: subcommands, the old flags as aliases, options per suite -------------------
@pytest.fixture
def ran(monkeypatch):
    """Replaces the runner: records (suite name, options) of each run instead of running it."""
    calls = []

    def record(suite, opts):
        calls.append((suite.name, opts))
        return 0

    monkeypatch.setattr(runner, "run", record)
    return calls


@pytest.mark.parametrize("argv, name", [
    ([], "ops"), (["ops"], "ops"), (["features"], "features"), (["--features"], "features"),
    (["training"], "training"), (["--training"], "training"), (["patching"], "patching"),
    (["--patching"], "patching"), (["distributed"], "distributed"), (["--distributed"], "distributed"),
    (["features", "--features"], "features"),  # the same suite twice is no conflict
])
def test_subcommands_and_old_flags_pick_the_suite(ran, tmp_path, argv, name):
    assert cli.main(["bench", *argv, "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert [n for n, _ in ran] == [name] and ran[0][1].quick


@pytest.mark.parametrize("argv, named", [
    (["--patching", "--features"], ("--patching", "--features")),
    (["--features", "--training"], ("--features", "--training")),
    (["--training", "--distributed"], ("--training", "--distributed")),
    (["features", "--patching"], ("--patching", "'features'")),
    (["--training", "patching"], ("--training", "'patching'")),
    (["ops", "--distributed"], ("--distributed", "'ops'")),
])
def test_two_suites_at_once_are_an_error_naming_both(ran, tmp_path, capsys, argv, named):
    out = tmp_path / "never-created"
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv, "--quick", "--out", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert all(n in err for n in named) and "pick different suites" in err, err
    assert ran == [] and not out.exists()  # refused before anything ran or was written


def test_options_reach_the_runner(ran, tmp_path):
    assert cli.main(["bench", "--quick", "training", "--dtype", "bfloat16", "--cases", "step,scale",
                     "--seed", "3", "--threads", "1", "--no-progress", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "--ops", "sparse_decode,sae_cache", "--repeats", "3", "--no-peer", "--backend",
                     "ref", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "ops", "--cases", "topk_encode", "--out", str(tmp_path)]) == 0
    (_, t), (_, o), (_, c) = ran
    assert t.quick and t.dtype == torch.bfloat16 and t.cases == ("step", "scale") and t.seed == 3
    assert t.threads == 1 and not t.progress and t.device.type == "cpu" and t.out == str(tmp_path)
    assert o.cases == ("sparse_decode", "sae_cache") and o.repeats == 3 and not o.peers and o.backend == "ref"
    assert o.dtype == torch.float32 and not o.quick and o.progress
    assert c.cases == ("topk_encode",)


@pytest.mark.parametrize("argv, named", [
    (["features", "--dtype", "bfloat16"], ("features", "--dtype", "ops and training")),
    (["patching", "--repeats", "3"], ("patching", "--repeats", "ops")),
    (["training", "--no-peer"], ("training", "--no-peer", "ops")),
    (["--ops", "sparse_decode", "distributed"], ("distributed", "--ops", "--cases memory")),
    (["--features", "--backend", "ref"], ("features", "--backend", "ops")),
    (["--ops", "sparse_decode", "--cases", "topk_encode"], ("--ops", "--cases")),
])
def test_options_a_suite_does_not_read_are_refused(ran, capsys, argv, named):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv, "--quick"])
    assert e.value.code != 0 and ran == []
    err = capsys.readouterr().err
    assert all(n in err for n in named), err


@pytest.mark.parametrize("name", ["ops", "features", "training", "patching", "distributed"])
def test_cases_are_the_suites_own(ran, tmp_path, capsys, name):
    suite = cli.SUITES[name]
    argv = ["bench", name, "--cases", suite.cases[-1], "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert ran[0][1].cases == (suite.cases[-1],)
    other = next(s for n, s in cli.SUITES.items() if n != name).cases[0]
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", name, "--cases", f"{suite.cases[0]},{other}"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and repr(other) in err and ",".join(suite.cases) in err


@pytest.mark.parametrize("argv", [[], ["--patching"], ["features"], ["--training"], ["distributed"]])
def test_bench_out_checked_before_running_every_suite(tmp_path, monkeypatch, argv):
    """(moved from tests/test_issue11_fixes.py, now for every suite) --out is checked before anything runs."""
    def must_not_run(*a, **kw):
        raise AssertionError("benchmark started")

    monkeypatch.setattr(runner, "run", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=f"--out '{out}' must be a folder.*writable.*nothing was run"):
            cli.main(["bench", "--quick", "--no-progress", *argv, "--out", str(out)])
    # a missing folder is created up front (and then the run starts)
    new = tmp_path / "new" / "results"
    with pytest.raises(AssertionError, match="benchmark started"):
        cli.main(["bench", "--quick", "--no-progress", "--device", "cpu", *argv, "--out", str(new)])
    assert new.is_dir() and list(new.iterdir()) == []


def test_patching_subcommand_runs_one_case(tmp_path):
    rc = cli.main(["bench", "patching", "--quick", "--no-progress", "--cases", "resid_pre_all",
                   "--out", str(tmp_path)])
    assert rc == 0
    (r,) = json.loads((tmp_path / "latest-patching-quick.json").read_text())["rows"]
    assert r["case"] == "resid_pre, all-position metric" and r["status"] == "ok" and r["target"] == "-"
    assert r["max_abs_diff"] <= 1e-4 * r["metric_scale"] and _pos(r["sk_s"]) and _pos(r["flop_ratio"])
