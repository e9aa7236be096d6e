"""Pick each encoder's ``auto`` strategy from measured cuda bench results.

``python -m sparsekern.bench.choose_strategy benchmarks/results/ops-*-cuda-*.json [--write]``

For every (GPU model, dtype, op) in the files, the strategy whose time relative to the bare matmul
of the same run is lowest in geometric mean over the shapes it ran at (a strategy that errored at
any shape is out). ``--write`` merges the choices into ``sparsekern/triton/encode_strategy.json``,
which ``encode.strategy_for`` reads; without it the choices are only printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .targets import ENCODER_OPS, MATMUL_PEER, strategy_of

CANDIDATES = ("blocks", "fused", "tiles")  # "auto" rows are whatever was chosen before
TABLE = Path(__file__).resolve().parents[1] / "triton" / "encode_strategy.json"


def choose(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{gpu: {dtype: {op: {"strategy", "geomean_vs_matmul", "shapes", "all"}}}} from bench JSON docs."""
    ratios: dict[tuple[str, str, str, str], dict[str, Optional[float]]] = {}
    for doc in docs:
        gpu = (doc.get("machine") or {}).get("gpu")
        if not gpu:
            continue  # CPU runs say nothing about a GPU's choice
        for r in doc.get("rows", []):
            name = strategy_of(r)
            if r.get("op") not in ENCODER_OPS or name not in CANDIDATES:
                continue
            key = (gpu, str(r.get("dtype")), r["op"], name)
            if "sparsekern failed" in str(r.get("note") or ""):
                ratios.setdefault(key, {})[r["shape"]] = None
            elif r.get("peer") == MATMUL_PEER and r.get("status") == "ok" and r.get("peer_ms"):
                ratios.setdefault(key, {})[r["shape"]] = r["sparsekern_ms"] / r["peer_ms"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (gpu, dtype, op, name), by_shape in ratios.items():
        if not by_shape or any(v is None for v in by_shape.values()):
            continue
        gm = math.exp(sum(math.log(v) for v in by_shape.values()) / len(by_shape))
        slot = out.setdefault(gpu, {}).setdefault(dtype, {})
        slot.setdefault(op, {"all": {}})["all"][name] = round(gm, 4)
    for gpu in out.values():
        for ops in gpu.values():
            for op, entry in ops.items():
                best = min(entry["all"], key=entry["all"].get)
                entry.update(strategy=best, geomean_vs_matmul=entry["all"][best])
    return out


def write(choices: dict[str, dict[str, dict[str, Any]]], path: Path = TABLE) -> None:
    """Merge ``choices`` into the strategy table (other GPUs / dtypes are kept)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    devices = doc.setdefault("devices", {})
    for gpu, dtypes in choices.items():
        for dtype, ops in dtypes.items():
            slot = devices.setdefault(gpu, {}).setdefault(dtype, {})
            slot.update({op: e["strategy"] for op, e in ops.items()})
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsekern.bench.choose_strategy", description=__doc__)
    ap.add_argument("files", nargs="+", help="sparsekern bench JSON results (cuda runs)")
    ap.add_argument("--write", action="store_true", help=f"merge the choices into {TABLE}")
    args = ap.parse_args(argv)
    choices = choose([json.loads(Path(p).read_text()) for p in args.files])
    if not choices:
        print("no cuda encoder rows with matmul ratios in these files", file=sys.stderr)
        return 2
    for gpu, dtypes in choices.items():
        for dtype, ops in dtypes.items():
            for op, e in ops.items():
                alts = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(e["all"].items(), key=lambda kv: kv[1]))
                print(f"{gpu} {dtype} {op}: {e['strategy']} (geomean time vs matmul: {alts})")
    if args.write:
        write(choices)
        print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
