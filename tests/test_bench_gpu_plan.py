"""The cuda encoder plan of ``sparsekern bench`` (issue 10), checked on the CPU: shapes, limits, peer
skips, per-feature JumpReLU calibration, strategy variants and the target table printer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparsekern.bench import cases as C
from sparsekern.bench import gpu_plan as G
from sparsekern.bench import suite, targets

CUDA = torch.device("cuda")  # a device object needs no GPU; nothing here allocates on it
SMALL = C.Shape("small", d_in=32, d_sae=4096, n=2048, k=16)


def test_cuda_plan_runs_the_encoders_at_the_target_shapes():
    enc = G.gpu_encoder_plan()
    assert [(s.d_in, s.d_sae, s.n, s.k, peak) for s, peak in enc] == [
        (768, 24576, 2048, 32, 512), (768, 24576, 16384, 32, 512),
        (2304, 65536, 4096, 64, 512), (2304, 2**20, 4096, 64, 1024)]
    st = suite.Settings(device=CUDA, ops=G.ENCODER_OPS)
    got = [(shape, op, peak) for shape, op, peak in suite.iter_cases(st)]
    assert got == [(s, op, peak) for s, peak in enc for op in G.ENCODER_OPS]
    assert suite.count_cases(st) == len(enc) * 2 * len(G.ENCODE_STRATEGIES)
    # the other ops keep their shapes; cpu and --quick keep today's plan
    other = {(s.name, op) for s, ops_, _ in C.plan(False, CUDA) for op in ops_ if op not in G.ENCODER_OPS}
    cpu = {(s.name, op) for s, ops_, _ in C.plan(False, "cpu") for op in ops_ if op not in G.ENCODER_OPS}
    assert other == cpu
    assert C.plan(False) == C.plan(False, "cpu") == [
        (C.GPT2, C.OPS, None), (C.GEMMA, ("topk_encode", "threshold_encode", "sparse_decode"), None),
        (C.MEM, ("topk_encode",), C.TOPK_PEAK_MIB)]
    assert C.plan(True, CUDA) == C.plan(True, "cpu")
    assert suite.cases_per_op("topk_encode", torch.device("cpu")) == 1


@pytest.mark.parametrize("n, dtype, limit", [
    (2048, torch.bfloat16, 2.0), (2048, torch.float32, 2.0), (4096, torch.bfloat16, 1.3),
    (16384, torch.bfloat16, 1.3), (4096, torch.float32, 1.15), (16384, torch.float32, 1.15)])
def test_matmul_limits(n, dtype, limit):
    assert G.matmul_limit(n, dtype) == limit


def test_sae_lens_target_only_at_gemma_bf16():
    assert G.sae_lens_min_ratio(G.GEMMA_N4K, torch.bfloat16) == 2.5
    assert G.sae_lens_min_ratio(G.GEMMA_N4K, torch.float32) is None
    assert all(G.sae_lens_min_ratio(s, torch.bfloat16) is None for s in G.ENCODER_SHAPES if s != G.GEMMA_N4K)


def test_dense_peer_skip_at_2_20_features_unless_memory_allows():
    gib = 2**30
    reason = G.dense_peer_skip(G.WIDE_1M, torch.bfloat16, 40 * gib)
    assert reason and "[4096, 1048576]" in reason and "8.0 GiB each" in reason
    assert G.dense_peer_skip(G.WIDE_1M, torch.bfloat16, 100 * gib) is None
    assert G.dense_peer_skip(G.WIDE_1M, torch.float32, 80 * gib)  # 16 GiB per dense copy
    assert G.dense_peer_skip(G.GEMMA_N4K, torch.float32, 40 * gib) is None


def test_cpu_weights_unchanged():
    """CPU weights are the same numbers as before the cuda generator came in."""
    g = torch.Generator().manual_seed(3)
    x, W_enc = torch.randn(64, 32, generator=g), torch.randn(32, 512, generator=g) * (1 / 32**0.5)
    w = C.make_weights(C.Shape("s", d_in=32, d_sae=512, n=64, k=16), seed=3)
    assert torch.equal(w.x, x) and torch.equal(w.W_enc, W_enc)
    assert C.rng_device("cpu").type == "cpu" and C.rng_device("cuda:1") == torch.device("cuda:1")


def test_feature_chunk_bounds_the_block():
    assert G.feature_chunk(1024, 2**20) == 2**14 and 1024 * 2**14 <= G.CALIBRATION_ELEMS
    assert G.feature_chunk(512, 24576) == 24576  # small problems: one step
    assert G.feature_chunk(10**9, 100) == 1


class _Largest(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_per_feature_thresholds_hit_l0_and_stay_chunked():
    w = C.make_weights(SMALL)
    rows, l0 = 512, 64
    with _Largest() as big:
        thr = G.per_feature_thresholds(w, l0, rows=rows, max_elems=2**16)
    assert rows * G.feature_chunk(rows, SMALL.d_sae, 2**16) < rows * SMALL.d_sae
    assert big.numel <= max(2**16, 2 * (l0 * rows + 1), rows * SMALL.d_in)  # never [rows, d_sae]
    assert thr.shape == (SMALL.d_sae,) and thr.dtype == torch.float32 and thr.std() > 0  # per feature
    whole = G.per_feature_thresholds(w, l0, rows=rows)  # chunking does not change the result
    torch.testing.assert_close(thr, whole, rtol=1e-4, atol=1e-4)
    fires = ((w.x - w.b_dec) @ w.W_enc + w.b_enc) > thr
    assert fires[:rows].sum(1).float().mean() == pytest.approx(l0, abs=0.5)  # calibration rows
    assert fires[rows:].sum(1).float().mean() == pytest.approx(l0, rel=0.2)  # unseen rows


def test_strategy_wrapper_sets_and_restores_the_env(monkeypatch):
    monkeypatch.delenv(G.STRATEGY_ENV, raising=False)
    seen = G.with_strategy(lambda: os.environ.get(G.STRATEGY_ENV), "tiles")()
    assert seen == "tiles" and G.STRATEGY_ENV not in os.environ
    monkeypatch.setenv(G.STRATEGY_ENV, "fused")
    assert G.with_strategy(lambda: os.environ[G.STRATEGY_ENV], "blocks")() == "blocks"
    assert os.environ[G.STRATEGY_ENV] == "fused"


def test_encoder_cases_per_strategy_with_targets():
    w = C.make_weights(C.QUICK_A)
    topk = G.topk_encode_cases(w, free_bytes=0)
    thr = G.threshold_encode_cases(w, 64, strategies=("auto", "tiles"), free_bytes=0)
    assert [c.variant for c in topk] == [f"[{s}]" for s in G.ENCODE_STRATEGIES]
    assert [c.variant for c in thr] == ["[auto]", "[tiles]"]
    for c in topk + thr:
        assert c.peak_target_mib == 512
        mm, sl = c.peer("matmul"), c.peer("sae_lens")
        assert mm.min_ratio == pytest.approx(1 / 2.0) and mm.target == "time <= 2.00x matmul"
        assert sl.skip and sl.fn is None
    assert thr[0].info["thresholds"] == "per-feature"
    # run one case end to end on the CPU: the skipped peer becomes a 'skipped' row, L0 is reported
    st = suite.Settings(device=torch.device("cpu"), repeats=2)
    rows = suite.run_case(thr[1], st)
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[0]["info"]["strategy"] == "tiles" and rows[0]["variant"] == "[tiles]"
    assert rows[0]["info"]["mean_l0"] == pytest.approx(64, rel=0.2)
    assert "peak <= 512 MiB" in rows[0]["target"] and "time <= 2.00x matmul" in rows[0]["target"]
    assert "sae_lens skipped" in rows[1]["note"]


def test_encoder_targets_on_big_shapes_need_no_weights():
    assert G.MATMUL_TARGET.format(G.matmul_limit(4096, torch.bfloat16)) == "time <= 1.30x matmul"
    assert G.peak_target_mib(G.WIDE_1M) == 1024 and G.peak_target_mib(G.GEMMA_N4K) == 512


def _row(op, variant, dtype, peer, **kw):
    base = {"op": op, "variant": variant, "shape": "gemma-2-2b-n4096", "dtype": dtype, "peer": peer,
            "status": "ok", "sparsekern_ms": 2.0, "sparsekern_peak_mib": 100.0, "info": {}}
    return {**base, **kw}


def test_targets_table(tmp_path, capsys):
    rows = [
        _row("topk_encode", "[auto]", "bfloat16", "x @ W_enc (bare matmul)", peer_ms=1.6, ratio=0.8,
             target="peak <= 512 MiB; time <= 1.30x matmul", info={"strategy": "auto"}),
        _row("topk_encode", "[auto]", "bfloat16", "sae_lens.TopKSAE.encode", peer_ms=6.0, ratio=3.0,
             target="peak <= 512 MiB; >= 2.5x faster", info={"strategy": "auto"}),
        _row("threshold_encode", "[tiles]", "bfloat16", "x @ W_enc (bare matmul)", peer_ms=1.0, ratio=0.5,
             target="peak <= 512 MiB; time <= 1.30x matmul", sparsekern_peak_mib=600.0,
             info={"strategy": "tiles", "mean_l0": 63.5}),
        _row("threshold_encode", "[tiles]", "bfloat16", "sae_lens.JumpReLUSAE.encode", status="skipped",
             target="peak <= 512 MiB", sparsekern_peak_mib=600.0,
             info={"strategy": "tiles", "mean_l0": 63.5}),
    ]
    path = tmp_path / "ops-x.json"
    path.write_text(json.dumps({"machine": {"gpu": "NVIDIA H200", "torch": "2.11"}, "rows": rows}))
    assert targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| op | shape | dtype | strategy |")
    assert lines[1] == ("| topk_encode | gemma-2-2b-n4096 | bfloat16 | auto | - | 2.000 | 1.600 | 1.25x "
                        "| 1.30x | 3.00x | 2.5x | 100.0 | 512 | yes |")
    assert lines[2] == ("| threshold_encode | gemma-2-2b-n4096 | bfloat16 | tiles | 63.5 | 2.000 | 1.000 "
                        "| 2.00x | 1.30x | skipped | - | 600.0 | 512 | NO: time, peak |")
    assert "targets met in 1 of 2" in out
    assert targets.main([str(tmp_path / "missing.json")]) == 2
