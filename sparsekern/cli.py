"""``sparsekern`` command line: ``sparsekern bench [...]`` and ``sparsekern demo [...]`` (also
``python -m sparsekern.cli ...``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import backends
from .bench import report, suite
from .bench.cases import OPS

DTYPES = ("float32", "bfloat16")


def _ops_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in OPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown op name(s) {', '.join(map(repr, bad)) or '(none given)'}; choose from {', '.join(OPS)}"
        )
    return names


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekern", description="sparsekern tools")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser(
        "bench", help="benchmark sparsekern ops against their peers (same process, interleaved)",
        description="Run the embedded benchmark suite: sparsekern vs embedding_bag / matmul / SAELens, "
        "print a table and write JSON + CSV results.",
    )
    b.add_argument("--quick", action="store_true", help="small shapes (seconds; for tests/CI)")
    b.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None,
                   help="default: cuda if available, else cpu")
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument("--repeats", type=_positive, default=None,
                   help="timed rounds per case (default: adaptive, 3-20 within a per-case budget)")
    b.add_argument("--ops", type=_ops_arg, default=None,
                   help=f"comma-separated subset of: {','.join(OPS)}")
    b.add_argument("--no-peer", action="store_true", help="time sparsekern only")
    b.add_argument("--backend", default=None, choices=("auto", *backends.BACKEND_NAMES),
                   help="force a sparsekern backend (default: SPARSEKERN_BACKEND, else auto)")
    b.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: all cores)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="benchmarks/results", help="results folder (created if missing)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.add_argument("--patching", action="store_true",
                   help="benchmark sparsekern.patching against transformer_lens.patching instead of the ops")
    b.add_argument("--features", action="store_true",
                   help="benchmark feature analysis (FeatureStats, co-occurrence, conditioned sums, decoder "
                   "neighbours, feature ablation) against the dense torch way instead of the ops")
    b.add_argument("--training", action="store_true",
                   help="benchmark sparsekern.training's SAE trainer against SAELens's trainer (throughput, "
                   "quality, d_sae 2^20 scale) instead of the ops; --dtype applies")
    b.add_argument("--distributed", action="store_true",
                   help="benchmark the feature-sharded SAE on 2 CPU processes (gloo, localhost): weight "
                   "memory per rank vs one process at d_sae 2^20, exact top-k merge time vs the local encode "
                   "at N 4096, k 64 (CPU only; see README 'Scale out')")
    b.add_argument("--cases", type=_cases_arg, default=None,
                   help="with --features: comma-separated subset of "
                   "stats,stats_dense,conditioned,neighbours,ablation; with --training: of "
                   "throughput,quality_topk,quality_jumprelu,scale (default: all)")
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


def _cases_arg(text: str) -> list[str]:
    from .bench.features import CASES
    from .bench.training import CASES as TRAINING_CASES

    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES + TRAINING_CASES]
    if bad or not cases:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {bad or text!r}; choose from {','.join(CASES + TRAINING_CASES)}")
    return cases


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


def bench(args: argparse.Namespace) -> int:
    """Run the suite (or the patching benchmark); 0 on success, 1 if any row errored or mismatched."""
    _check_out_dir(args.out)
    device = _device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or report.cpu_cores())
    try:
        if args.patching:
            from .bench import patching

            return patching.main(args.quick, device, args.out, progress=not args.no_progress, seed=args.seed)
        if args.distributed:
            from .bench import distributed

            if device.type != "cpu":
                raise SystemExit("sparsekern bench --distributed runs on CPU processes (gloo); on GPUs "
                                 "launch with torchrun (README 'Scale out')")
            return distributed.main(args.quick, args.out, progress=not args.no_progress, seed=args.seed)
        if args.features:
            from .bench import features

            if args.cases and (bad := [c for c in args.cases if c not in features.CASES]):
                raise SystemExit(f"sparsekern bench --features: unknown case(s) {bad}; "
                                 f"choose from {','.join(features.CASES)}")
            return features.main(args.quick, device, args.out, progress=not args.no_progress, seed=args.seed,
                                 cases=args.cases)
        if args.training:
            from .bench import training

            cases = args.cases
            if cases and (bad := [c for c in cases if c not in training.CASES]):
                raise SystemExit(f"sparsekern bench --training: unknown case(s) {bad}; "
                                 f"choose from {','.join(training.CASES)}")
            return training.main(args.quick, device, args.out, progress=not args.no_progress, seed=args.seed,
                                 dtype=getattr(torch, args.dtype), cases=cases)
        ctx = backends.use_backend(args.backend) if args.backend else contextlib.nullcontext()
        with ctx:
            return _bench(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests)


def _bench(args: argparse.Namespace, device: torch.device) -> int:
    st = suite.Settings(
        device=device, dtype=getattr(torch, args.dtype), ops=args.ops or OPS, quick=args.quick,
        repeats=args.repeats, peers=not args.no_peer, seed=args.seed,
        budget_s=0.2 if args.quick else 4.0, max_repeats=10 if args.quick else 20,
    )
    meta = {
        "schema": 1, "suite": "quick" if args.quick else "default",
        "machine": report.machine_info(device),
        "settings": {"dtype": args.dtype, "ops": list(st.ops), "repeats": args.repeats,
                     "peers": st.peers, "seed": args.seed, "backend": backends.forced_backend()},
    }
    busy = report.busy_warning(report.cpu_cores()) if device.type == "cpu" else None
    if busy:
        meta["warning"] = busy
        print(busy, file=sys.stderr)
    rows, elapsed = suite.run_suite(st, progress=not args.no_progress)
    meta["elapsed_s"] = round(elapsed, 2)
    paths = report.write_results(rows, meta, args.out, suite.FIELDS, args.quick)
    m = meta["machine"]
    print(f"sparsekern bench ({meta['suite']}) on {m['device']}: {m['cpu_model']}, {m['cpu_cores']} cores, "
          f"{torch.get_num_threads()} threads, torch {m['torch']}, {args.dtype}; "
          f"backends available {m['sparsekern_backends']}")
    print(report.format_table(rows))
    if busy:
        print(busy)
    if args.quick:
        print("quick shapes: targets are informational (they are set for the full-size shapes)")
    print(f"peak MiB = extra memory of one call ({m['peak_memory_method'] or 'not measured on this device'})")
    print(f"total {elapsed:.1f} s; {report.wrote_line(paths)}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


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
