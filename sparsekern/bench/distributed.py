"""``sparsekern bench --distributed``: the feature-sharded TopK SAE on 2 CPU processes (gloo, localhost).

Three spawned processes, one after the other phase: first ONE process holds the whole SAE (the
single-process baseline: its weight bytes, peak RSS, and the top-k indices of the first rows), then
TWO ranks each build only their shard (``ShardedSAE.from_local_state_dict``: never the full weights)
and report:

- ``memory``: weight bytes per rank against one process. Target: half (plus the replicated ``b_dec``)
  at d_sae = 2^20 (d_in 256, float32: 2 GiB of weights in one process, 1 GiB per rank).
- ``peak RSS``: process peak resident memory (``VmHWM``) per rank against one process (informational:
  it includes the interpreter, torch and the encode's buffers).
- ``merge``: the exact global top-k merge (two all-gathers of ``[N, k]`` + a sort) against the local
  ``topk_encode`` it follows, at N = 4096, k = 64. Target: merge <= 10% of the local encode.
- ``exact``: the merged indices of the first rows equal the single-process ``topk_encode`` bitwise.

Weights are drawn block by block from seeded generators, so the baseline and the shards hold the same
numbers without either building the other. Each rank uses 1 thread (2 ranks on 2 cores); the baseline
uses every core. Times are wall clock on a machine that may be shared: approximate.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import report

FIELDS = ("case", "shape", "sparsekern", "peer", "sk_s", "peer_s", "ratio", "target", "target_met",
          "status", "note")
WORLD, BLOCK = 2, 1 << 16
CASES = ("memory", "peak_rss", "merge", "exact")


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(d_in=64, d_sae=1 << 14, n=256, k=16, check_rows=64, merge_repeats=5)
    return dict(d_in=256, d_sae=1 << 20, n=4096, k=64, check_rows=64, merge_repeats=10)


def _block(j: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + j)
    w = torch.randn(d_in, BLOCK, generator=g) / math.sqrt(d_in)
    return w, torch.randn(BLOCK, generator=g) * 0.1


def shard_weights(d_in: int, start: int, stop: int, seed: int) -> dict[str, torch.Tensor]:
    """``W_enc [d_in, stop-start]``, ``b_enc``, ``W_dec = W_enc.T``, ``b_dec`` of features [start, stop)."""
    W_enc = torch.empty(d_in, stop - start)
    b_enc = torch.empty(stop - start)
    for j in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        w, b = _block(j, d_in, seed)
        a, e = max(start, j * BLOCK), min(stop, (j + 1) * BLOCK)
        W_enc[:, a - start: e - start] = w[:, a - j * BLOCK: e - j * BLOCK]
        b_enc[a - start: e - start] = b[a - j * BLOCK: e - j * BLOCK]
    b_dec = torch.randn(d_in, generator=torch.Generator().manual_seed(seed)) * 0.1
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_enc.T.contiguous(), "b_dec": b_dec}


def _inputs(sz: dict[str, int], seed: int) -> torch.Tensor:
    return torch.randn(sz["n"], sz["d_in"], generator=torch.Generator().manual_seed(seed + 7))


def _rss_mib() -> Optional[float]:
    from .timing import _status_kib

    try:
        return _status_kib("VmHWM") / 1024.0
    except (OSError, KeyError):
        return None


def _cfg(sz: dict[str, int]) -> dict[str, Any]:
    return {"architecture": "topk", "d_in": sz["d_in"], "d_sae": sz["d_sae"], "k": sz["k"],
            "dtype": "float32"}


def _baseline(sz: dict[str, int], seed: int, tmp: str) -> None:
    """The single process: the whole SAE, one encode, indices of the first rows for the exact check."""
    from safetensors.torch import save_file

    from .. import SAE

    torch.set_num_threads(report.cpu_cores())
    sae = SAE.from_cfg_and_state_dict(_cfg(sz), shard_weights(sz["d_in"], 0, sz["d_sae"], seed))
    x = _inputs(sz, seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        acts = sae.encode_sparse(x)
    enc_s = time.perf_counter() - t0
    head = acts.indices[: sz["check_rows"]].contiguous()
    save_file({"indices": head}, str(Path(tmp) / "baseline.safetensors"))
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in sae.parameters()),
           "peak_rss_mib": _rss_mib(), "encode_s": enc_s, "threads": torch.get_num_threads()}
    (Path(tmp) / "baseline.json").write_text(json.dumps(out))


def _rank(rank: int, port: int, sz: dict[str, int], seed: int, tmp: str) -> None:
    """One rank: its shard only; local encode, merge (repeated), full sharded encode."""
    from safetensors.torch import load_file

    from ..distributed import ShardedSAE, init_process_group, merge_topk, shard_range
    from ..ops import topk_encode

    torch.set_num_threads(1)
    init_process_group(rank, WORLD, port, timeout_s=600)
    start, stop = shard_range(sz["d_sae"], rank, WORLD)
    sh = ShardedSAE.from_local_state_dict(_cfg(sz), shard_weights(sz["d_in"], start, stop, seed))
    x = _inputs(sz, seed)
    k = sz["k"]
    dist = torch.distributed
    with torch.no_grad():
        dist.barrier()
        t0 = time.perf_counter()
        loc = topk_encode(x, sh.W_enc, sh.b_enc, min(k, sh.d_sae_local), b_dec=sh.b_dec, relu=False)
        enc_s = time.perf_counter() - t0
        merge = []
        for _ in range(sz["merge_repeats"]):
            dist.barrier()  # time the merge, not the wait for a slower rank's encode
            t0 = time.perf_counter()
            merge_topk(loc.values, loc.indices + sh.feature_offset, k)
            merge.append(time.perf_counter() - t0)
        dist.barrier()
        acts = sh.encode_sparse(x[: sz["check_rows"]])
    ref = load_file(str(Path(tmp) / "baseline.safetensors"))["indices"]
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in sh.parameters()),
           "replicated_bytes": sh.b_dec.numel() * sh.b_dec.element_size(),
           "peak_rss_mib": _rss_mib(), "local_encode_s": enc_s, "merge_s": sorted(merge)[len(merge) // 2],
           "exact": bool(torch.equal(acts.indices, ref)), "d_sae_local": sh.d_sae_local}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _spawn(target, args_per_proc: list[tuple], timeout_s: float) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args_per_proc]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    bad = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"process(es) {bad} of {target.__name__} failed (exit codes "
                           f"{[procs[i].exitcode for i in bad]}); see their output above")


def run(quick: bool, seed: int = 0, timeout_s: float = 3600) -> list[dict[str, Any]]:
    """Run the three processes and return the result rows."""
    from ..distributed import free_port

    sz = _sizes(quick)
    shape = f"d_in {sz['d_in']}, d_sae 2^{int(math.log2(sz['d_sae']))}, N {sz['n']}, k {sz['k']}, fp32"
    with tempfile.TemporaryDirectory(prefix="sparsekern-bench-dist-") as tmp:
        _spawn(_baseline, [(sz, seed, tmp)], timeout_s)
        port = free_port()
        _spawn(_rank, [(r, port, sz, seed, tmp) for r in range(WORLD)], timeout_s)
        base = json.loads((Path(tmp) / "baseline.json").read_text())
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    per_rank = max(r["weight_bytes"] for r in ranks)
    rep = ranks[0]["replicated_bytes"]
    half = math.ceil(sz["d_sae"] / WORLD) / sz["d_sae"] * (base["weight_bytes"] - rep)
    mib = 1024.0 ** 2
    rows = [dict(case="memory", shape=shape, sparsekern=f"per-rank weights ({WORLD} ranks)",
                 peer="one process",
                 sk_s=None, peer_s=None, ratio=base["weight_bytes"] / per_rank,
                 target="per-rank weights = 1/2 of one process (+ replicated b_dec)",
                 target_met=per_rank <= half + ranks[0]["replicated_bytes"], status="ok",
                 note=f"{per_rank / mib:.1f} MiB per rank vs {base['weight_bytes'] / mib:.1f} MiB")]
    rss = [r["peak_rss_mib"] for r in ranks]
    if base["peak_rss_mib"] and all(rss):
        rows.append(dict(case="peak_rss", shape=shape, sparsekern="peak RSS per rank", peer="one process",
                         sk_s=None, peer_s=None, ratio=base["peak_rss_mib"] / max(rss),
                         target="informational", target_met=None, status="ok",
                         note=f"ranks {', '.join(f'{v:.0f}' for v in rss)} MiB vs "
                         f"{base['peak_rss_mib']:.0f} MiB (interpreter + torch included)"))
    enc = max(r["local_encode_s"] for r in ranks)
    merge = max(r["merge_s"] for r in ranks)
    rows.append(dict(case="merge", shape=shape, sparsekern="exact top-k merge (2 all_gathers + sort)",
                     peer="local topk_encode", sk_s=merge, peer_s=enc,
                     ratio=enc / merge if merge > 0 else None,
                     target="merge <= 10% of local encode (>= 10x)", target_met=merge <= 0.1 * enc,
                     status="ok", note=f"merge = {100 * merge / enc:.3f}% of the local encode; "
                     f"single-process encode {base['encode_s']:.2f} s on {base['threads']} threads, "
                     "ranks 1 thread each"))
    exact = all(r["exact"] for r in ranks)
    rows.append(dict(case="exact", shape=shape, sparsekern="sharded encode indices", peer="topk_encode",
                     sk_s=None, peer_s=None, ratio=None, target="bitwise equal", target_met=exact,
                     status="ok" if exact else "mismatch", note=f"first {sz['check_rows']} rows"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "ratio", "target", "met", "sk s", "peer s", "note")

    def f(r: dict[str, Any], key: str, spec: str) -> str:
        return "-" if r.get(key) is None else format(r[key], spec)

    lines = [(r["case"], f(r, "ratio", ".3f"), r.get("target", ""),
              {True: "yes", False: "NO", None: "-"}[r.get("target_met")] if r["status"] == "ok" else "ERROR",
              f(r, "sk_s", ".4f"), f(r, "peer_s", ".3f"), r.get("note", "")) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *lines])


def main(quick: bool, out_dir: str, progress: bool = True, seed: int = 0) -> int:
    """Run the distributed benchmark, print a table, write JSON/CSV/HTML; 0 ok, 1 on an error."""
    t0 = time.perf_counter()
    device = torch.device("cpu")
    meta: dict[str, Any] = {"schema": 1, "suite": "distributed-quick" if quick else "distributed",
                            "machine": report.machine_info(device),
                            "settings": {"seed": seed, "world": WORLD, "backend": "gloo", **_sizes(quick)}}
    busy = report.busy_warning(report.cpu_cores())
    if busy:
        meta["warning"] = busy
        print(busy)
    if progress:
        print(f"sparsekern bench --distributed: 1 process, then {WORLD} gloo ranks ({_sizes(quick)})",
              flush=True)
    try:
        rows = run(quick, seed)
    except Exception as e:  # report, as the other suites do
        rows = [dict(case="distributed", status="error", note=f"{type(e).__name__}: {e}")]
    meta["elapsed_s"] = round(time.perf_counter() - t0, 2)
    meta["loadavg_after"] = report.load_average()
    paths = report.write_results(rows, meta, out_dir, FIELDS, quick, suite="distributed")
    print(format_table(rows))
    print("times are wall clock on a possibly shared machine: approximate")
    if quick:
        print("quick shapes: targets are informational (they are set for d_sae 2^20, N 4096, k 64)")
    print(f"total {meta['elapsed_s']:.1f} s; {report.wrote_line(paths)}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
