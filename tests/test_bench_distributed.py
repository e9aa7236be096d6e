"""`sparsekern bench --distributed --quick`: 1 + 2 spawned gloo processes write complete rows."""

import json

import pytest

from sparsekern import cli


@pytest.mark.slow
def test_quick_distributed_bench(tmp_path):
    rc = cli.main(["bench", "--distributed", "--quick", "--no-progress", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "latest-distributed-quick.json").read_text())
    rows = {r["case"]: r for r in doc["rows"]}
    assert rc == 0 and set(rows) >= {"memory", "merge", "exact"}, doc["rows"]
    assert rows["memory"]["target_met"] and 1.99 < rows["memory"]["ratio"] <= 2.0
    assert rows["exact"]["target_met"] and rows["exact"]["status"] == "ok"
    assert rows["merge"]["sk_s"] > 0 and rows["merge"]["peer_s"] > 0 and rows["merge"]["ratio"] > 0
    assert doc["suite"] == "distributed-quick" and doc["settings"]["world"] == 2


def test_distributed_bench_refuses_gpu_devices(monkeypatch):
    monkeypatch.setattr(cli, "_device", lambda name: __import__("torch").device("cuda"))
    with pytest.raises(SystemExit, match="torchrun"):
        cli.main(["bench", "--distributed", "--device", "cuda", "--out", "/tmp"])
