"""Machine info and the JSON / CSV / HTML result files of every suite (the table is :mod:`.table`'s)."""

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
from .html import write_page


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
    page = write_page(paths["json"])  # plotly page beside the JSON; prints one line and skips without plotly
    if page is not None:
        paths["html"] = page
    return paths

