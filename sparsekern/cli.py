"""``sparsekern`` command line: ``sparsekern bench [SUITE] [...]`` and ``sparsekern demo [...]`` (also
``python -m sparsekern.cli ...``).

``sparsekern bench`` runs one suite of :mod:`sparsekern.bench` (``ops`` when none is named) through
:func:`sparsekern.bench.runner.run`. The old suite flags (``--patching``, ``--features``, ``--training``,
``--distributed``) still pick a suite; two of them, or one with another suite's subcommand, are an error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import backends
from .bench import distributed as bench_distributed
from .bench import features, patching, runner, suite, training
from .bench.cases import OPS

DTYPES = ("float32", "bfloat16")
SUITES: dict[str, runner.Suite] = {
    s.name: s for s in (suite.SUITE, features.SUITE, training.SUITE, patching.SUITE, bench_distributed.SUITE)
}
DEFAULT_SUITE = "ops"
LEGACY_FLAGS = ("patching", "features", "training", "distributed")  # --features: `sparsekern bench features`
# options only some suites read (flag -> argparse dest); the others are common to every suite
SUITE_OPTIONS = {"--dtype": "dtype", "--repeats": "repeats", "--ops": "ops", "--no-peer": "no_peer",
                 "--backend": "backend"}


class UsageError(SystemExit):
    """A command line the bench cannot run: exit status 2, like argparse's own errors; ``str()`` is the
    message (already printed to stderr)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _usage_error(message: str) -> UsageError:
    print(message, file=sys.stderr)
    return UsageError(message)


def _ops_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in OPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown op name(s) {', '.join(map(repr, bad)) or '(none given)'}; choose from {', '.join(OPS)}"
        )
    return names


def _cases_arg(text: str) -> list[str]:
    """Comma-separated case ids (checked against the chosen suite once it is known)."""
    return [c.strip() for c in text.split(",") if c.strip()]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _bench_options(p: argparse.ArgumentParser, name: Optional[str] = None) -> None:
    """The bench options, on the ``bench`` parser itself (``name`` None) or on suite ``name``'s subcommand.

    A subcommand's options default to "not given" (argparse.SUPPRESS), so an option placed before the
    subcommand (``sparsekern bench --quick features``) is kept. Options the suite does not read are still
    parsed (hidden from its help) so that :func:`_options` can refuse them by name.
    """
    reads = SUITES[name].options if name else frozenset(SUITE_OPTIONS)

    def add(flag: str, default, help: str, **kw) -> None:
        if name is not None:
            default = argparse.SUPPRESS
            if (flag in SUITE_OPTIONS and flag not in reads) or flag[2:] in LEGACY_FLAGS:
                help = argparse.SUPPRESS
        p.add_argument(flag, default=default, help=help, **kw)

    add("--quick", False, "small shapes (seconds; for tests/CI)", action="store_true")
    add("--device", None, "default: cuda if available, else cpu", choices=("cpu", "cuda", "mps"))
    add("--dtype", None, "ops, training: the weights' and inputs' dtype (default float32)", choices=DTYPES)
    add("--repeats", None, "ops: timed rounds per case (default: adaptive, 3-20 within a per-case budget)",
        type=_positive)
    add("--ops", None, f"ops: comma-separated subset of {','.join(OPS)}", type=_ops_arg)
    add("--no-peer", False, "ops: time sparsekern only", action="store_true")
    add("--backend", None, "ops: force a sparsekern backend (default: SPARSEKERN_BACKEND, else auto)",
        choices=("auto", *backends.BACKEND_NAMES))
    add("--threads", None, "torch CPU threads (default: all cores)", type=_positive)
    add("--seed", 0, "seed of every generated input", type=int)
    add("--out", "benchmarks/results", "results folder (created if missing)")
    add("--no-progress", False, "hide the progress bar", action="store_true")
    cases = (f"comma-separated subset of {','.join(SUITES[name].cases)} (default: all)" if name else
             "comma-separated subset of the suite's cases (listed by `sparsekern bench SUITE --help`)")
    add("--cases", None, cases, type=_cases_arg)
    for legacy in LEGACY_FLAGS:
        add(f"--{legacy}", False, f"the {legacy} suite (old spelling of `sparsekern bench {legacy}`)",
            action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekern", description="sparsekern tools")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser(
        "bench", help="benchmark sparsekern against its peers (same process, interleaved)",
        description="Run one benchmark suite (default: ops): sparsekern vs embedding_bag / matmul / SAELens, "
        "TransformerLens, dense torch; print a table and write JSON + CSV results.",
    )
    _bench_options(b)
    suites = b.add_subparsers(dest="suite", metavar="SUITE", title="suites (default: ops)")
    for name, s in SUITES.items():
        _bench_options(suites.add_parser(name, help=s.description, description=f"sparsekern bench {name}: "
                                         f"{s.description}."), name)
    d = sub.add_parser(
        "demo", help="analyse the shipped toy model (IOI, patching vs TransformerLens, SAE features)",
        description="Run the demo on sparsekern.toy (offline): IOI logit difference, DLA and logit lens; "
        "exact activation patching timed beside transformer_lens.patching; attribution vs exact patching; "
        "SAE features. Writes an HTML report (plotly embedded), PNG figures (with Chromium) and demo.json.",
    )
    d.add_argument("--out", default="sparsekern-demo",
                   help="output folder (created; its parent must exist); default ./sparsekern-demo")
    d.add_argument("--quick", action="store_true", help="fewer prompts and texts, one timing repeat (~1 min)")
    d.add_argument("--no-png", action="store_true", help="skip the PNG figures (they need Chromium)")
    d.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu", help="where the model runs")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def demo(args: argparse.Namespace) -> int:
    from . import demo as _demo

    try:
        _demo.check_out_dir(args.out)
    except OSError as e:
        raise SystemExit(str(e)) from None
    device = _device(args.device, "demo")  # a clear exit when the device is not available
    res = _demo.run_demo(args.out, quick=args.quick, progress=not args.no_progress, png=not args.no_png,
                         device=str(device))
    print(_demo.summary(res))
    return 0


def _device(name: Optional[str], cmd: str = "bench") -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"sparsekern {cmd}: --device cuda requested but torch.cuda.is_available() is False")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit(f"sparsekern {cmd}: --device mps requested but MPS is not available")
    return torch.device(name)


def _check_out_dir(out: str) -> None:
    """Create ``--out`` and prove it writable now: the results are written only after the whole run."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sparsekern-write-test-"):
            pass
    except OSError as e:
        raise SystemExit(
            f"sparsekern bench: --out {out!r} must be a folder that exists or can be created and is "
            f"writable ({type(e).__name__}: {e.strerror or e}); nothing was run"
        ) from None


def _and(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _suite(args: argparse.Namespace) -> runner.Suite:
    """The suite the command line names: its subcommand or an old suite flag (default: ops)."""
    flags = [f"--{n}" for n in LEGACY_FLAGS if getattr(args, n, False)]
    if len(flags) > 1:
        raise _usage_error(f"sparsekern bench: {_and(flags)} pick different suites; run one at a time "
                           f"(sparsekern bench {flags[0][2:]}, then sparsekern bench {flags[1][2:]})")
    if flags and args.suite and flags[0][2:] != args.suite:
        raise _usage_error(f"sparsekern bench: {flags[0]} and the subcommand {args.suite!r} pick different "
                           f"suites; give one of them")
    return SUITES[args.suite or (flags[0][2:] if flags else DEFAULT_SUITE)]


def _cases(args: argparse.Namespace, s: runner.Suite) -> Optional[tuple[str, ...]]:
    """The suite's cases to run (None: all); refuses options the suite does not read, by name."""
    for flag, dest in SUITE_OPTIONS.items():
        if getattr(args, dest, None) not in (None, False) and flag not in s.options:
            readers = [n for n, other in SUITES.items() if flag in other.options]
            hint = f" (pick {s.name}'s cases with --cases {','.join(s.cases)})" if flag == "--ops" else ""
            raise _usage_error(f"sparsekern bench {s.name}: {flag} applies only to {_and(readers)}{hint}")
    if args.ops and args.cases:
        raise _usage_error("sparsekern bench ops: give the ops with --ops or with --cases, not both")
    cases = args.ops or args.cases
    try:
        runner.check_cases(s, cases)
    except runner.SuiteError as e:
        raise _usage_error(f"sparsekern bench {s.name}: {e}") from None
    return None if cases is None else tuple(cases)


def bench(args: argparse.Namespace) -> int:
    """Run the chosen suite; 0 on success, 1 if any row errored or mismatched."""
    s = _suite(args)
    cases = _cases(args, s)
    _check_out_dir(args.out)
    device = _device(args.device)
    opts = runner.Options(
        device=device, quick=args.quick, dtype=getattr(torch, args.dtype or "float32"), out=args.out,
        progress=not args.no_progress, seed=args.seed, cases=cases, repeats=args.repeats,
        peers=not args.no_peer, backend=args.backend, threads=args.threads,
    )
    try:
        runner.check(s, opts)
    except runner.SuiteError as e:
        raise _usage_error(f"sparsekern bench {s.name}: {e}") from None
    return runner.run(s, opts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args)
    if args.command == "demo":
        return demo(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
