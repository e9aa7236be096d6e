"""Timing and peak-memory primitives for the benchmark harness.

Timing: wall clock (``time.perf_counter``) around one call, with a device sync before and after
(CUDA/MPS kernels are asynchronous). Calls of several functions are interleaved round-robin in
one process, after warm-up, and each function's median is reported.

Peak extra memory of one call (MiB above what was in use just before it):

- CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() -
  memory_allocated()`` (baseline taken right before the call) — the caching allocator's view.
- CPU (Linux): release free heap pages (``malloc_trim(0)``), reset the process peak RSS by
  writing ``5`` to ``/proc/self/clear_refs``, read ``VmRSS`` from ``/proc/self/status``, run the
  call, then read ``VmHWM`` (the peak RSS since the reset). Extra = ``VmHWM - VmRSS``. This counts
  every page the call touched (temporaries and output, all threads), at page granularity.
- Elsewhere (no writable ``/proc/self/clear_refs``, or MPS): not measured (``None``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

MIB = 1024.0 * 1024.0
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; return (result, milliseconds), synchronizing around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


# ---- peak memory --------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:  123456 kB"
    raise KeyError(field)


def process_peak_rss_mib() -> Optional[float]:
    """This process's peak resident memory so far (``VmHWM``) in MiB; None where /proc is not readable."""
    try:
        return _status_kib("VmHWM") / 1024.0
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def _malloc_trim() -> None:
    """Return free heap pages to the OS so freed-but-resident memory cannot hide a peak."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def peak_method(device: torch.device) -> Optional[str]:
    """How peak memory is measured on ``device`` here, or None when it cannot be."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated - memory_allocated (reset_peak_memory_stats)"
    if device.type == "cpu" and _reset_peak_rss():
        try:
            _status_kib("VmHWM")
            return "VmHWM - VmRSS from /proc/self/status after writing 5 to /proc/self/clear_refs"
        except (OSError, KeyError):
            return None
    return None


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Optional[float]]:
    """Run ``fn`` once (untimed); return (result, peak extra MiB or None if unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - base) / MIB
    if device.type == "cpu":
        _malloc_trim()
        if _reset_peak_rss():
            try:
                base = _status_kib("VmRSS")
                out = fn()
                return out, max(0, _status_kib("VmHWM") - base) / 1024.0
            except (OSError, KeyError):
                pass
    out = fn()
    sync(device)
    return out, None


# ---- interleaved medians ------------------------------------------------------------------
def choose_repeats(est_ms: Sequence[float], budget_s: float, lo: int, hi: int) -> int:
    """Rounds that fit ``budget_s`` given one round costs ``sum(est_ms)``, clamped to [lo, hi]."""
    round_ms = max(sum(est_ms), 1e-3)
    return max(lo, min(hi, int(budget_s * 1e3 / round_ms)))


def interleaved_ms(
    fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int
) -> list[list[float]]:
    """Time ``repeats`` rounds; each round calls every fn once, rotating the order per round.

    Returns per-fn lists of milliseconds. Results are dropped right away (no accumulation).
    The cyclic garbage collector is paused meanwhile, as ``timeit`` does.
    """
    samples: list[list[float]] = [[] for _ in fns]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for j in range(len(fns)):
                i = (j + r) % len(fns)
                out, ms = time_call(fns[i], device)
                del out
                samples[i].append(ms)
    finally:
        if was_enabled:
            gc.enable()
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))
