"""The measured ``auto`` choice of encoder strategy (sparsekern/bench/choose_strategy.py)."""

import json

from sparsekern.bench import choose_strategy as CS
from sparsekern.bench.targets import MATMUL_PEER


def _rows(op, strategy, shape, sk_ms, mm_ms, failed=False):
    base = dict(op=op, variant=f"[{strategy}]", shape=shape, dtype="bfloat16", info={"strategy": strategy})
    if failed:
        return [dict(base, status="error", peer=None, note="sparsekern failed: RuntimeError: boom")]
    return [dict(base, status="ok", peer=MATMUL_PEER, sparsekern_ms=sk_ms, peer_ms=mm_ms),
            dict(base, status="ok", peer="sae_lens.TopKSAE.encode", sparsekern_ms=sk_ms, peer_ms=9.0)]


def _doc(rows, gpu="NVIDIA H200"):
    return {"machine": {"gpu": gpu} if gpu else {}, "rows": [r for rs in rows for r in rs]}


def test_lowest_geomean_vs_matmul_wins_and_errors_disqualify(tmp_path):
    doc = _doc([
        _rows("topk_encode", "blocks", "a", 1.2, 1.0), _rows("topk_encode", "blocks", "b", 1.2, 2.0),
        _rows("topk_encode", "fused", "a", 1.5, 1.0), _rows("topk_encode", "fused", "b", 1.0, 2.0),
        _rows("topk_encode", "tiles", "a", 0.5, 1.0), _rows("topk_encode", "tiles", "b", 0, 0, failed=True),
        _rows("topk_encode", "auto", "a", 0.1, 1.0),  # "auto" is never a candidate
        _rows("threshold_encode", "fused", "a", 1.1, 1.0),
    ])
    cpu = _doc([_rows("topk_encode", "tiles", "a", 0.1, 1.0)], gpu=None)  # CPU runs are ignored
    got = CS.choose([doc, cpu])
    topk = got["NVIDIA H200"]["bfloat16"]["topk_encode"]
    # blocks: sqrt(1.2 * 0.6) = 0.849; fused: sqrt(1.5 * 0.5) = 0.866; tiles failed at shape b
    assert topk["strategy"] == "blocks" and set(topk["all"]) == {"blocks", "fused"}
    assert got["NVIDIA H200"]["bfloat16"]["threshold_encode"]["strategy"] == "fused"
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"_comment": "x", "devices": {"Other GPU": {"float32": {"topk_encode": "tiles"}}}}))
    CS.write(got, table)
    devices = json.loads(table.read_text())["devices"]
    assert devices["Other GPU"] == {"float32": {"topk_encode": "tiles"}}  # kept
    assert devices["NVIDIA H200"]["bfloat16"] == {"topk_encode": "blocks", "threshold_encode": "fused"}


def test_cli_without_cuda_rows_says_so(tmp_path, capsys):
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps(_doc([_rows("topk_encode", "blocks", "a", 1.0, 1.0)], gpu=None)))
    assert CS.main([str(p)]) == 2
    assert "no cuda encoder rows" in capsys.readouterr().err
