"""``sparsekern bench distributed``: the feature-sharded TopK SAE on 2 CPU processes (gloo, localhost).

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

Weights are drawn block by block from seeded generators (:mod:`sparsekern.distributed.synthetic`), so
the baseline and the shards hold the same numbers without either building the other. Each rank uses
1 thread (2 ranks on 2 cores); the baseline uses every core. Times are wall clock on a machine that may
be shared: approximate.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import report, runner
from . import table as tb
from .timing import process_peak_rss_mib

FIELDS = ("case", "shape", "sparsekern", "peer", "sk_s", "peer_s", "ratio", "target", "target_met",
          "status", "note")
WORLD = 2
NAME = "distributed"
CASES = ("memory", "peak_rss", "merge", "exact")
COLUMNS = FIELDS


def shard_weights(d_in: int, start: int, stop: int, seed: int) -> dict[str, torch.Tensor]:
    """Deprecated name of :func:`sparsekern.distributed.synthetic.synthetic_shard_weights`."""
    from ..distributed.synthetic import synthetic_shard_weights  # sparsekern.distributed imports saes: lazy

    return synthetic_shard_weights(d_in, start, stop, seed)


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(d_in=64, d_sae=1 << 14, n=256, k=16, check_rows=64, merge_repeats=5)
    return dict(d_in=256, d_sae=1 << 20, n=4096, k=64, check_rows=64, merge_repeats=10)


def _inputs(sz: dict[str, int], seed: int) -> torch.Tensor:
    return torch.randn(sz["n"], sz["d_in"], generator=torch.Generator().manual_seed(seed + 7))


def _cfg(sz: dict[str, int]) -> dict[str, Any]:
    return {"architecture": "topk", "d_in": sz["d_in"], "d_sae": sz["d_sae"], "k": sz["k"],
            "dtype": "float32"}


def _baseline(sz: dict[str, int], seed: int, tmp: str) -> None:
    """The single process: the whole SAE, one encode, indices of the first rows for the exact check."""
    from safetensors.torch import save_file

    from .. import SAE
    from ..distributed.synthetic import synthetic_shard_weights

    torch.set_num_threads(report.cpu_cores())
    sae = SAE.from_cfg_and_state_dict(_cfg(sz), synthetic_shard_weights(sz["d_in"], 0, sz["d_sae"], seed))
    x = _inputs(sz, seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        acts = sae.encode_sparse(x)
    enc_s = time.perf_counter() - t0
    head = acts.indices[: sz["check_rows"]].contiguous()
    save_file({"indices": head}, str(Path(tmp) / "baseline.safetensors"))
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in sae.parameters()),
           "peak_rss_mib": process_peak_rss_mib(), "encode_s": enc_s, "threads": torch.get_num_threads()}
    (Path(tmp) / "baseline.json").write_text(json.dumps(out))


def _rank(rank: int, port: int, sz: dict[str, int], seed: int, tmp: str) -> None:
    """One rank: its shard only; local encode, merge (repeated), full sharded encode."""
    from safetensors.torch import load_file

    from ..distributed import ShardedSAE, init_process_group, merge_topk, shard_range
    from ..distributed.synthetic import synthetic_shard_weights
    from ..ops import topk_encode

    torch.set_num_threads(1)
    init_process_group(rank, WORLD, port, timeout_s=600)
    start, stop = shard_range(sz["d_sae"], rank, WORLD)
    sh = ShardedSAE.from_local_state_dict(_cfg(sz), synthetic_shard_weights(sz["d_in"], start, stop, seed))
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
           "peak_rss_mib": process_peak_rss_mib(), "local_encode_s": enc_s,
           "merge_s": sorted(merge)[len(merge) // 2],
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


# ---- the suite, as the runner sees it -------------------------------------------------------
def jobs(opts: runner.Options) -> list[runner.Job]:
    """One job: the three processes; it returns the rows of the selected cases."""
    def rows() -> list[dict[str, Any]]:
        picked = SUITE.selected(opts)
        return [r for r in run(opts.quick, opts.seed) if r["case"] in picked]

    return [runner.Job(f"1 process, then {WORLD} gloo ranks", rows, {"case": "distributed"})]


TABLE = (
    tb.text("case", "case"), tb.num("ratio", "ratio", ".3f"), tb.text("target", "target"), tb.MET,
    tb.num("sk s", "sk_s", ".4f"), tb.num("peer s", "peer_s", ".3f"),
)

SUITE = runner.Suite(
    name=NAME, cases=CASES, columns=COLUMNS, table=TABLE, jobs=jobs, count=lambda opts: 1,
    settings=lambda opts: {"seed": opts.seed, "world": WORLD, "backend": "gloo", **_sizes(opts.quick)},
    description="the feature-sharded SAE on 2 CPU processes (gloo, localhost): weight memory per rank vs "
    "one process at d_sae 2^20, exact top-k merge time vs the local encode at N 4096, k 64",
    cpu_only="it runs on CPU processes (gloo); on GPUs launch `python -m sparsekern.distributed.demo` with "
    "torchrun (docs/distributed.md)",
    footer=lambda opts, meta: ["times are wall clock on a possibly shared machine: approximate"],
    quick_note="quick shapes: targets are informational (they are set for d_sae 2^20, N 4096, k 64)",
)
