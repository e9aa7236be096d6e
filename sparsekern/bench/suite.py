"""The ops suite (``sparsekern bench ops``, the default): each case of :mod:`.cases` run with sparsekern
and its peers interleaved in one process, one result row per (case, peer).

:func:`run_case` times one case; :data:`SUITE` declares the suite to :mod:`.runner` (cases are the op
names, built per shape of :func:`.cases.plan`, weights once per shape); :func:`run_suite` runs the
selected cases without writing files.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .. import backends
from . import cases as C
from . import gpu_plan, runner
from . import table as tb
from . import timing as T

_BACKEND_ERRORS = (RuntimeError, NotImplementedError)


@dataclass
class Settings:
    """How to run: device/dtype, repeat policy and what to include."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    ops: Sequence[str] = C.OPS
    quick: bool = False
    repeats: Optional[int] = None  # exact timed rounds; None = adaptive within budget_s
    min_repeats: int = 3
    max_repeats: int = 20
    budget_s: float = 4.0  # time budget for the timed rounds of one case
    peers: bool = True
    seed: int = 0


def _in_backend(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
    @functools.wraps(fn)
    def run() -> Any:
        with backends.use_backend(name):
            return fn()

    return run


def backend_of(case: C.Case, device: torch.device, forced: Optional[str] = None) -> str:
    """Backend(s) the registry picks for ``case``'s ops: 'cpp', or e.g. 'cpp/ref/ref' if mixed."""
    with backends.use_backend(forced or backends.forced_backend()):
        names = [backends.select(op, device)[0] for op in case.backend_ops]
    return names[0] if len(set(names)) == 1 else "/".join(names)


@dataclass
class Resolved:
    """sparsekern's callable after its warm-up call, and what that call told us."""

    fn: Callable[[], Any]
    backend: str
    out: Any  # the warm-up call's output
    ms: float  # the warm-up call's time
    note: str = ""


def resolve_ours(case: C.Case, device: torch.device) -> Resolved:
    """Warm sparsekern's callable up with the active backend; fall back to 'ref' if it fails.

    The fallback happens only when no backend is forced (``SPARSEKERN_BACKEND``/``use_backend``)
    and is recorded in ``note``; a forced backend's error propagates.
    """
    backend = backend_of(case, device)
    try:
        return Resolved(case.ours, backend, *T.time_call(case.ours, device))
    except _BACKEND_ERRORS as e:
        if backends.forced_backend() != "auto" or backend == "ref":
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fn = _in_backend(case.ours, "ref")
        note = f"{backend} backend failed ({msg}); ran ref instead"
        return Resolved(fn, backend_of(case, device, "ref"), *T.time_call(fn, device), note)


def _warm_peers(
    peers: Sequence[C.Peer], dev: torch.device
) -> tuple[list[C.Peer], list[float], dict[str, str]]:
    """One warm-up call per runnable peer: (peers that ran, their ms, errors by key)."""
    live, est, errors = [], [], {}
    for p in peers:
        if p.skip is not None:
            continue
        try:
            est.append(T.time_call(p.fn, dev)[1])
            live.append(p)
        except Exception as e:
            errors[p.key] = f"{type(e).__name__}: {e}"
    return live, est, errors


def _check(p: C.Peer, ours_out: Any, peer_out: Any) -> Optional[float]:
    if p.check is None:
        return None
    try:
        return p.check(ours_out, peer_out)
    except Exception:  # a comparison problem must not abort the benchmark
        return None


FIELDS = (
    "op", "variant", "shape", "dims", "dtype", "device", "backend", "peer", "status",
    "sparsekern_ms", "peer_ms", "ratio", "sparsekern_peak_mib", "peer_peak_mib",
    "target", "target_met", "repeats", "max_abs_diff", "info", "note",
)


def _peak_call(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, Optional[float], float]:
    """(output, peak extra MiB, wall ms) of one untimed call; the ms only refines the repeat count."""
    t0 = time.perf_counter()
    out, peak = T.measure_peak(fn, dev)
    return out, peak, (time.perf_counter() - t0) * 1e3


def _finite_pos(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) and x > 0 else None


def _base(case: C.Case, st: Settings) -> dict[str, Any]:
    """Every field of a row of ``case``, the identifying ones filled in."""
    base = dict.fromkeys(FIELDS)
    base.update(op=case.op, variant=case.variant, shape=case.shape.name, dims=case.shape.dims(),
                dtype=str(st.dtype).removeprefix("torch."), device=str(st.device), info=dict(case.info))
    return base


def run_case(case: C.Case, st: Settings) -> list[dict[str, Any]]:
    """Benchmark one case; one row per peer (a single peer-less row with ``peers=False``)."""
    dev = st.device
    base = _base(case, st)
    try:
        res = resolve_ours(case, dev)  # warm-up call of sparsekern
    except Exception as e:  # forced backend failed, or a bug: report, keep going
        msg = f"sparsekern failed: {type(e).__name__}: {e}"
        return [{**base, "status": "error", "backend": backend_of(case, dev), "note": msg}]
    ours, backend, note = res.fn, res.backend, res.note
    info = dict(case.info)
    if case.info_fn is not None:
        info.update(case.info_fn(res.out))
    res.out = None
    peers = list(case.peers) if st.peers else []
    live, est, errors = _warm_peers(peers, dev)
    # one untimed call each for peak memory (after warm-up), its outputs reused for the check
    ours_out, ours_peak, ours_ms2 = _peak_call(ours, dev)
    peaks: dict[str, Optional[float]] = {}
    diffs: dict[str, Optional[float]] = {}
    for j, p in enumerate(live):
        p_out, peaks[p.key], ms2 = _peak_call(p.fn, dev)
        if dev.type != "cpu":  # a GPU warm-up call may include JIT compiles / autotuning
            est[j] = min(est[j], ms2)
        diffs[p.key] = _check(p, ours_out, p_out)
        del p_out
    del ours_out
    fns = [ours] + [p.fn for p in live]
    ours_est = res.ms if dev.type == "cpu" else min(res.ms, ours_ms2)
    n = st.repeats or T.choose_repeats([ours_est] + est, st.budget_s, st.min_repeats, st.max_repeats)
    samples = T.interleaved_ms(fns, dev, n)
    ours_ms = T.median(samples[0])
    common = {**base, "backend": backend, "sparsekern_ms": ours_ms, "sparsekern_peak_mib": ours_peak,
              "repeats": n, "info": info}
    peak_ok = None
    if case.peak_target_mib is not None and ours_peak is not None:
        peak_ok = ours_peak <= case.peak_target_mib
    rows = []
    for p in peers if peers else [None]:
        row = {**common, "status": "ok", "peer": p.name if p else None, "note": note}
        targets, met = [], []
        if case.peak_target_mib is not None:
            targets.append(f"peak <= {case.peak_target_mib:g} MiB")
            met.append(peak_ok)
        if p is not None and p.skip:
            row.update(status="skipped", note="; ".join(filter(None, [note, p.skip])))
        elif p is not None and p.key in errors:
            row.update(status="error", note="; ".join(filter(None, [note, f"peer failed: {errors[p.key]}"])))
        elif p is not None:
            peer_ms = T.median(samples[1 + live.index(p)])
            ratio = _finite_pos(peer_ms / ours_ms) if ours_ms > 0 else None
            row.update(peer_ms=peer_ms, ratio=ratio, peer_peak_mib=peaks[p.key], max_abs_diff=diffs[p.key])
            if p.min_ratio is not None:
                targets.append(p.target or f"ratio >= {p.min_ratio:g}")
                met.append(ratio is not None and ratio >= p.min_ratio)
        if targets:
            row["target"] = "; ".join(targets)
            row["target_met"] = None if any(m is None for m in met) else all(met)
        rows.append(row)
    return rows


def iter_cases(st: Settings) -> Iterable[tuple[C.Shape, str, Optional[float]]]:
    """Selected (shape, op, encoder peak target) in plan order (grouped by shape)."""
    for shape, ops_here, peak in C.plan(st.quick, st.device):
        for op in ops_here:
            if op in st.ops:
                yield shape, op, peak


def cases_per_op(op: str, device: torch.device) -> int:
    if device.type == "cuda" and op in gpu_plan.ENCODER_OPS:
        return len(gpu_plan.ENCODE_STRATEGIES)
    return C.CASES_PER_OP.get(op, 1)


def count_cases(st: Settings) -> int:
    return sum(cases_per_op(op, st.device) for _, op, _ in iter_cases(st))


def _jobs(st: Settings) -> Iterator[runner.Job]:
    """One job per case, in plan order; the weights are built once per shape, when its first case is due."""
    weights: Optional[C.Weights] = None
    for shape, op, peak in iter_cases(st):
        if weights is None or weights.shape != shape:
            weights = None
            gc.collect()
            if st.device.type == "cuda":  # hand the last shape's blocks back before the next (2^20) one
                torch.cuda.empty_cache()
            weights = C.make_weights(shape, st.device, st.dtype, st.seed)
        for case in C.build(op, weights, peak_target_mib=peak):
            yield runner.Job(f"{case.op}{case.variant} @ {shape.name}",
                             functools.partial(run_case, case, st), _base(case, st))
            del case


def run_suite(st: Settings, progress: bool = True) -> tuple[list[dict[str, Any]], float]:
    """Run every selected case (no files written); returns (rows, elapsed seconds)."""
    t0 = time.perf_counter()
    rows = runner.collect(SUITE, _jobs(st), count_cases(st), progress)
    return rows, time.perf_counter() - t0


# ---- the suite, as the runner sees it -------------------------------------------------------
def settings_for(opts: runner.Options) -> Settings:
    """The ops suite's :class:`Settings` for the CLI's options (``--quick``: a 0.2 s budget per case)."""
    return Settings(device=opts.device, dtype=opts.dtype, ops=opts.cases or C.OPS, quick=opts.quick,
                    repeats=opts.repeats, peers=opts.peers, seed=opts.seed,
                    budget_s=0.2 if opts.quick else 4.0, max_repeats=10 if opts.quick else 20)


def _settings(opts: runner.Options) -> dict[str, Any]:
    return {"dtype": opts.dtype_name, "ops": list(opts.cases or C.OPS), "repeats": opts.repeats,
            "peers": opts.peers, "seed": opts.seed, "backend": backends.forced_backend()}


def _op_cell(r: dict[str, Any]) -> str:
    op = str(r.get("op")) + (f" {r['variant']}" if r.get("variant") else "")
    info = r.get("info") or {}
    return op + (f" (L0 {info['mean_l0']:g})" if "mean_l0" in info else "")


TABLE = (
    tb.Column("op", _op_cell), tb.text("shape", "shape"), tb.text("backend", "backend"),
    tb.text("peer", "peer"), tb.num("sk ms", "sparsekern_ms", ".3f"), tb.num("peer ms", "peer_ms", ".3f"),
    tb.ratio("peer/sk", "ratio"),
    tb.num("sk MiB", "sparsekern_peak_mib", ".1f"), tb.num("peer MiB", "peer_peak_mib", ".1f"),
    tb.text("target", "target"), tb.MET,
)


def _peak_line(opts: runner.Options, meta: dict[str, Any]) -> list[str]:
    method = meta["machine"]["peak_memory_method"] or "not measured on this device"
    return [f"peak MiB = extra memory of one call ({method})"]


NAME = "ops"
CASES = C.OPS
COLUMNS = FIELDS
SUITE = runner.Suite(
    name=NAME, cases=CASES, columns=COLUMNS, table=TABLE, key="op",
    description="sparsekern ops vs embedding_bag / matmul / SAELens (same process, interleaved)",
    jobs=lambda opts: _jobs(settings_for(opts)), count=lambda opts: count_cases(settings_for(opts)),
    settings=_settings, options=frozenset({"--dtype", "--repeats", "--ops", "--no-peer", "--backend"}),
    labels=("default", "quick"),
    header=lambda opts, meta: (f"{opts.dtype_name}; "
                               f"backends available {meta['machine']['sparsekern_backends']}"),
    footer=_peak_line,
)
