"""Encoder target table (issue 10) from ``sparsekern bench`` JSON files, as markdown.

``python -m sparsekern.bench.targets benchmarks/results/ops-*.json``: one line per (op, shape, dtype,
strategy) with sparsekern's time against the bare matmul and sae_lens, peak memory, and which targets
were missed. Limits are read back from the rows' ``target`` strings, so CPU results print too.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ENCODER_OPS = ("topk_encode", "threshold_encode")
MATMUL_PEER = "x @ W_enc (bare matmul)"
_LIMIT = re.compile(r"time <= ([0-9.]+)x matmul")
_FASTER = re.compile(r">= ([0-9.]+)x faster")
_PEAK = re.compile(r"peak <= ([0-9.]+) MiB")
HEAD = ("op", "shape", "dtype", "strategy", "L0", "sk ms", "matmul ms", "sk/matmul", "limit",
        "sae_lens/sk", "sae_lens min", "peak MiB", "peak max", "met")


def strategy_of(row: dict[str, Any]) -> str:
    """The encoder strategy a bench row timed ("" for rows without one)."""
    return (row.get("info") or {}).get("strategy") or (row.get("variant") or "").strip("[] ")


def _find(pattern: re.Pattern[str], target: Optional[str]) -> Optional[float]:
    m = pattern.search(target or "")
    return float(m.group(1)) if m else None


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def _line(rows: Sequence[dict[str, Any]]) -> tuple[list[str], Optional[bool]]:
    """One table line for the rows (one per peer) of a case, and whether all its targets were met."""
    r0 = rows[0]
    mm = next((r for r in rows if r.get("peer") == MATMUL_PEER), None)
    sl = next((r for r in rows if str(r.get("peer") or "").startswith("sae_lens")), None)
    sk_ms, peak = r0.get("sparsekern_ms"), r0.get("sparsekern_peak_mib")
    info = r0.get("info") or {}
    strategy = strategy_of(r0) or "-"
    mm_ms = mm.get("peer_ms") if mm else None
    time_x = sk_ms / mm_ms if sk_ms and mm_ms else None
    limit = _find(_LIMIT, mm.get("target")) if mm else None
    peak_max = next((v for r in rows if (v := _find(_PEAK, r.get("target"))) is not None), None)
    sl_min: Optional[float] = None
    if sl is not None:
        target = sl.get("target") or ""
        sl_min = _find(_FASTER, target) or (1.0 if "no slower" in target else None)
    missed, known = [], 0
    for name, ok in (("time", None if time_x is None or limit is None else time_x <= limit * (1 + 1e-9)),
                     ("sae_lens", None if sl_min is None or not sl or sl.get("ratio") is None
                      else sl["ratio"] >= sl_min),
                     ("peak", None if peak is None or peak_max is None else peak <= peak_max)):
        known += ok is not None
        if ok is False:
            missed.append(name)
    if sl is None:
        sl_cell = "-"
    elif sl.get("status") != "ok":
        sl_cell = str(sl.get("status"))
    else:
        sl_cell = _fmt(sl.get("ratio"), ".2f", "x")
    errors = [r for r in rows if r.get("status") == "error"]
    met = "ERROR" if errors else ("NO: " + ", ".join(missed) if missed else ("yes" if known else "-"))
    cells = [r0["op"], r0["shape"], str(r0.get("dtype")), strategy, _fmt(info.get("mean_l0"), "g"),
             _fmt(sk_ms, ".3f"), _fmt(mm_ms, ".3f"), _fmt(time_x, ".2f", "x"), _fmt(limit, ".2f", "x"),
             sl_cell, _fmt(sl_min, "g", "x"), _fmt(peak, ".1f"), _fmt(peak_max, "g"), met]
    return cells, (None if errors or not known else not missed)


def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    where = m.get("gpu") or f"{m.get('cpu_model', '?')} ({m.get('cpu_cores', '?')} cores)"
    return (f"{where}, torch {m.get('torch', '?')}, sae_lens {m.get('sae_lens') or 'missing'}, "
            f"{m.get('date', '?')}, {doc.get('elapsed_s', '?')} s")


def table(docs: Sequence[tuple[str, dict[str, Any]]], ops: Sequence[str] = ENCODER_OPS) -> str:
    """Markdown: the source files, then one line per encoder case (grouped by op, then shape)."""
    out = [f"- `{path}`: {_machine(doc)}" for path, doc in docs]
    cases: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for i, (_, doc) in enumerate(docs):
        for r in doc.get("rows", []):
            if r.get("op") in ops:
                cases.setdefault((i, r["op"], r.get("variant"), r["shape"], r.get("dtype")), []).append(r)
    shape_order = {s: j for j, s in enumerate(dict.fromkeys(k[3] for k in cases))}
    keys = sorted(cases, key=lambda k: (ops.index(k[1]), shape_order[k[3]]))  # stable: file, then row order
    lines = [_line(cases[k]) for k in keys]
    out += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(cells) + " |" for cells, _ in lines]
    met = [ok for _, ok in lines if ok is not None]
    out += ["", f"targets met in {sum(met)} of {len(met)} cases with targets ({len(lines)} cases); "
            "sk/matmul = sparsekern time / bare matmul time (<= limit), sae_lens/sk = how many times "
            "slower sae_lens is (>= sae_lens min), peak = sparsekern's extra memory of one call"]
    return "\n".join(out)


def main(paths: Optional[Sequence[str]] = None) -> int:
    """Print the table for the given bench JSON files; 2 if none could be read, else 0."""
    paths = list(sys.argv[1:] if paths is None else paths)
    docs = []
    for p in paths:
        try:
            docs.append((p, json.loads(Path(p).read_text())))
        except (OSError, ValueError) as e:
            print(f"skipping {p}: {e}", file=sys.stderr)
    if not docs:
        print("usage: python -m sparsekern.bench.targets RESULTS.json [...]", file=sys.stderr)
        return 2
    print(table(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
