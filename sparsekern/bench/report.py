"""Machine info, the printed table, and the JSON/CSV result files."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import __version__, backends
from . import timing as T


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages (other processes competing for the cores skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_warning(cores: int) -> Optional[str]:
    """A warning line when the 1-minute load already exceeds half the cores before we start."""
    load = load_average()
    if load and load[0] > 0.5 * cores:
        return (f"warning: load average {load[0]:.2f} on {cores} cores before the run: other processes "
                "compete for the CPU, so timings (multi-threaded ones especially) are unreliable")
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparsekern": __version__,
        "sparsekern_backends": backends.available(),
        "forced_backend": backends.forced_backend(),
        "device": str(device),
        "peak_memory_method": T.peak_method(device),
        "loadavg": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import sae_lens

        info["sae_lens"] = getattr(sae_lens, "__version__", "?")
    except Exception:
        info["sae_lens"] = None
    return info


def machine_tag(info: dict[str, Any]) -> str:
    """Short file-name-safe tag, e.g. ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    dev = info["device"].split(":")[0]
    name = info.get("gpu") if dev == "cuda" else f"{info['cpu_model']}-{info['cpu_cores']}c"
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*?ghz", "", str(name).lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    return f"{dev}-{slug or 'unknown'}"


# ---- files --------------------------------------------------------------------------------
def _csv_value(v: Any) -> Any:
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def wrote_line(paths: dict[str, Path]) -> str:
    """``wrote X.json (+ .csv, .html, latest-....json)`` for the end of a suite's output."""
    extra = ".csv, .html" if "html" in paths else ".csv"
    return f"wrote {paths['json']} (+ {extra}, {paths['latest'].name})"


def write_results(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path,
                  fields: Sequence[str], quick: bool, suite: str = "ops") -> dict[str, Path]:
    """Write ``<suite>[-quick]-<date>-<tag>.json/.csv/.html`` and ``latest-<suite>[-quick].json``.

    The ``.html`` page (plotly, see :mod:`sparsekern.bench.html`) is skipped with one printed line when
    plotly is missing or the page cannot be rendered; the bench never fails for it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = f"{suite}-quick" if quick else suite
    stem = f"{kind}-{stamp}-{machine_tag(meta['machine'])}"
    doc = {**meta, "rows": list(rows)}
    text = json.dumps(doc, indent=2, default=str) + "\n"
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "latest": out / f"latest-{kind}.json"}
    paths["json"].write_text(text)
    paths["latest"].write_text(text)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})
    from .html import write_page  # plotly page beside the JSON; prints one line and skips without plotly

    page = write_page(paths["json"])
    if page is not None:
        paths["html"] = page
    return paths


# ---- table --------------------------------------------------------------------------------
def _num(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def _spans(nums: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts: list[str] = []
    for n in nums:
        if parts and parts[-1].split("-")[-1] == str(n - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ", ".join(parts)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table: one line per (case, peer), notes listed underneath."""
    head = ("op", "shape", "backend", "peer", "sk ms", "peer ms", "peer/sk", "sk MiB", "peer MiB",
            "target", "met")
    lines: list[tuple[str, ...]] = []
    notes: dict[str, list[int]] = {}
    for r in rows:
        op = r["op"] + (f" {r['variant']}" if r.get("variant") else "")
        met = {True: "yes", False: "NO", None: "-"}[r.get("target_met")]
        if r.get("status") != "ok":
            met = r.get("status", "?").upper()
        extra = r.get("info") or {}
        if "mean_l0" in extra:
            op += f" (L0 {extra['mean_l0']:g})"
        lines.append((op, r["shape"], str(r.get("backend") or "-"), str(r.get("peer") or "-"),
                      _num(r.get("sparsekern_ms"), ".3f"), _num(r.get("peer_ms"), ".3f"),
                      _ratio(r.get("ratio")), _num(r.get("sparsekern_peak_mib"), ".1f"),
                      _num(r.get("peer_peak_mib"), ".1f"), r.get("target") or "-", met))
        if r.get("note"):
            notes.setdefault(r["note"], []).append(len(lines))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    right = {4, 5, 6, 7, 8}

    def fmt(cells: Sequence[str], n: str = "") -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        body = "  ".join(padded)
        return f"{n:>3} {body}".rstrip()

    out = [fmt(head, "#"), fmt(["-" * w for w in widths], "---")]
    out += [fmt(cells, str(i + 1)) for i, cells in enumerate(lines)]
    if notes:
        out.append("notes:")
        out += [f"  rows {_spans(nums)}: {note}" for note, nums in notes.items()]
    return "\n".join(out)
