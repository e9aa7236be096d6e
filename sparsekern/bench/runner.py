"""One runner for every ``sparsekern bench`` suite: metadata, the busy-machine check, per-case error capture,
the JSON / CSV / ``latest-*.json`` files, the table and the summary.

A suite is a module that declares a :class:`Suite`: its name, the case ids ``--cases`` selects from, its
CSV columns, its table, and :attr:`Suite.jobs`, which turns :class:`Options` into :class:`Job` objects (one
per case, built lazily, so a suite may build shared inputs between them). The runner runs each job; a job
that raises becomes an ``error`` row (its :attr:`Job.base` fields, the exception and where it came from)
and the run goes on. :func:`run` returns the exit status: 1 when a row is neither ``ok`` nor ``skipped``.

    from sparsekern.bench import features, runner
    runner.run(features.SUITE, runner.Options(device=torch.device("cpu"), quick=True, out="/tmp/r"))
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from .. import backends
from . import report
from .table import Column, format_table, row_lines

Row = dict[str, Any]
QUICK_NOTE = "quick shapes: targets are informational (they are set for the full-size shapes)"
PASSING = ("ok", "skipped")  # row statuses that do not fail the run


class SuiteError(ValueError):
    """Options a suite cannot run with (an unknown case, a device it does not support)."""


@dataclass(frozen=True)
class Options:
    """One run of a suite, as the CLI's flags give it (defaults: the CLI's defaults).

    ``cases``: a subset of the suite's :attr:`Suite.cases` (None: all). ``dtype``, ``repeats``, ``peers``
    and ``backend`` are read only by the suites that list them in :attr:`Suite.options`. ``threads``:
    torch CPU threads during the run (None: every core this process may use); restored afterwards.
    """

    device: torch.device
    quick: bool = False
    dtype: torch.dtype = torch.float32
    out: str = "benchmarks/results"
    progress: bool = True
    seed: int = 0
    cases: Optional[tuple[str, ...]] = None
    repeats: Optional[int] = None
    peers: bool = True
    backend: Optional[str] = None
    threads: Optional[int] = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass
class Job:
    """One case: ``run()`` returns its result rows. ``base`` names them (e.g. ``{"case": "stats"}``): an
    error row keeps those fields. ``label`` is what the progress bar shows while it runs."""

    label: str
    run: Callable[[], list[Row]]
    base: Row = field(default_factory=dict)


def _no_lines(opts: Options, meta: dict[str, Any]) -> list[str]:
    return []


def _no_text(opts: Options, meta: dict[str, Any]) -> str:
    return ""


@dataclass(frozen=True)
class Suite:
    """What a suite module declares (see :mod:`sparsekern.bench.features` for one).

    - ``name``: the subcommand (``sparsekern bench features``) and the file prefix
      (``features-quick-<date>-<machine>.json``, ``latest-features.json``).
    - ``cases``: the ids ``--cases`` selects from; ``columns``: the CSV columns, in order.
    - ``table``: the printed table; ``jobs(opts)``: the selected cases as :class:`Job` objects.
    - ``settings(opts)``: ``meta["settings"]`` of the JSON file; ``meta``: extra top-level fields.
    - ``options``: the CLI options beyond the common ones it reads (``"--dtype"``, ...).
    - ``count(opts)``: how many jobs ``jobs`` yields (the progress bar; default: one per selected case).
    - ``labels``: ``meta["suite"]`` for (full, quick) runs (default: ``name`` and ``name-quick``).
    - ``header(opts, meta)``: text appended to the first printed line; ``footer(opts, meta)``: lines
      after the table; ``quick_note``: the line a ``--quick`` run adds.
    - ``cpu_only``: why the suite refuses another device (None: any device).
    """

    name: str
    cases: tuple[str, ...]
    columns: tuple[str, ...]
    table: tuple[Column, ...]
    jobs: Callable[[Options], Iterable[Job]]
    settings: Callable[[Options], dict[str, Any]]
    description: str = ""
    options: frozenset[str] = frozenset()
    meta: dict[str, Any] = field(default_factory=dict)
    count: Optional[Callable[[Options], int]] = None
    labels: Optional[tuple[str, str]] = None
    header: Callable[[Options, dict[str, Any]], str] = _no_text
    footer: Callable[[Options, dict[str, Any]], list[str]] = _no_lines
    quick_note: str = QUICK_NOTE
    cpu_only: Optional[str] = None
    key: str = "case"  # the column that names a row (the ops suite's is "op")

    def label(self, quick: bool) -> str:
        if self.labels is not None:
            return self.labels[quick]
        return f"{self.name}-quick" if quick else self.name

    def selected(self, opts: Options) -> tuple[str, ...]:
        """The case ids to run, in the order given (all of :attr:`cases` by default)."""
        return tuple(opts.cases) if opts.cases else self.cases


def check_cases(suite: Suite, cases: Optional[Sequence[str]]) -> None:
    """Raise :class:`SuiteError` unless ``cases`` (None: all) are ids of ``suite``'s cases."""
    if cases is None:
        return
    bad = [c for c in cases if c not in suite.cases]
    if bad or not cases:
        raise SuiteError(f"unknown case(s) {bad or list(cases)}; choose from {','.join(suite.cases)}")


def check(suite: Suite, opts: Options) -> None:
    """Raise :class:`SuiteError` when ``suite`` cannot run with ``opts`` (checked before anything runs)."""
    check_cases(suite, opts.cases)
    if suite.cpu_only and opts.device.type != "cpu":
        raise SuiteError(suite.cpu_only)


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"


def error_row(suite: Suite, base: Row, e: BaseException) -> Row:
    """The row of a case that raised: its ``base`` fields, ``status="error"``, the exception as the note
    (and, where the suite has an ``info`` column, the file and line it came from)."""
    row = {**base, "status": "error", "note": f"{type(e).__name__}: {e}"}
    if "info" in suite.columns:
        row["info"] = {**(base.get("info") or {}), "at": _where(e)}
    return row


def _jobs_guarded(suite: Suite, jobs: Iterable[Job], errors: list[Row]) -> Iterator[Job]:
    """``jobs``, with a failure while building the next one recorded as a ``setup`` error row."""
    it = iter(jobs)
    while True:
        try:
            job = next(it)
        except StopIteration:
            return
        except Exception as e:  # e.g. the shared model of the remaining cases could not be built
            errors.append(error_row(suite, {suite.key: "setup"}, e))
            return
        yield job


def collect(suite: Suite, jobs: Iterable[Job], total: int, progress: bool) -> list[Row]:
    """Run ``jobs`` under a progress bar (and, with ``progress``, print each case's rows as it ends);
    every exception of a job becomes its error row."""
    rows: list[Row] = []
    bar = tqdm(total=total, desc=f"sparsekern bench {suite.name}", unit="case", disable=not progress)
    try:
        for job in _jobs_guarded(suite, jobs, rows):
            bar.set_postfix_str(job.label)
            try:
                new = list(job.run())
            except Exception as e:  # report it, keep going
                new = [error_row(suite, job.base, e)]
            del job  # its closures may hold large inputs
            if progress and new:
                for line in row_lines(new, suite.table, first=len(rows) + 1):
                    bar.write(line)
            rows.extend(new)
            bar.update(1)
    finally:
        bar.close()
    return rows


def _header(suite: Suite, opts: Options, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    extra = suite.header(opts, meta)
    return (f"sparsekern bench {suite.name} ({meta['suite']}) on {m['device']}: "
            f"{m.get('gpu') or m['cpu_model']}, {m['cpu_cores']} cores, {torch.get_num_threads()} threads, "
            f"torch {m['torch']}{'; ' + extra if extra else ''}; load average before {m['loadavg']}, "
            f"after {meta['loadavg_after']}")


def run(suite: Suite, opts: Options) -> int:
    """Run ``suite``: write its results to ``opts.out``, print the table and a summary; returns 0, or 1
    when a row errored or mismatched (a missed target is reported, not an error)."""
    check(suite, opts)
    threads = torch.get_num_threads()
    if opts.device.type == "cpu":
        torch.set_num_threads(opts.threads or report.cpu_cores())
    ctx = backends.use_backend(opts.backend) if opts.backend else contextlib.nullcontext()
    try:
        with ctx:
            return _run(suite, opts)
    finally:
        torch.set_num_threads(threads)  # run() may be called inside another program (tests)


def _run(suite: Suite, opts: Options) -> int:
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"schema": 1, "suite": suite.label(opts.quick),
                            "machine": report.machine_info(opts.device), "settings": suite.settings(opts),
                            **suite.meta}
    busy = report.busy_warning(report.cpu_cores()) if opts.device.type == "cpu" else None
    if busy:
        meta["warning"] = busy
        print(busy, file=sys.stderr)
    total = suite.count(opts) if suite.count else len(suite.selected(opts))
    rows = collect(suite, suite.jobs(opts), total, opts.progress)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 2)
    meta["loadavg_after"] = report.load_average()
    paths = report.write_results(rows, meta, opts.out, suite.columns, opts.quick, suite=suite.name)
    print(_header(suite, opts, meta))
    print(format_table(rows, suite.table))
    notes = ([busy] if busy else []) + suite.footer(opts, meta) + ([suite.quick_note] if opts.quick else [])
    for line in notes:
        print(line)
    print(f"total {meta['elapsed_s']:.1f} s; {report.wrote_line(paths)}")
    return 0 if all(r.get("status") in PASSING for r in rows) else 1

