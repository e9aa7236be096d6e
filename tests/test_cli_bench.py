"""`sparsekern bench`: the quick suite writes complete JSON/CSV rows; bad flags fail clearly."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest

import sparsekern
from sparsekern import cli
from sparsekern.bench import FIELDS

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
