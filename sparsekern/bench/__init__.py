"""Benchmark harness behind ``sparsekern bench`` and the pytest-benchmark suites in ``benchmarks/``.

One runner, five suites. Each suite module declares a :class:`~.runner.Suite` (``SUITE``: its cases, CSV
columns, table and jobs) and has no driver of its own; :mod:`.runner` runs any of them:

- :mod:`.runner`: metadata, the busy-machine check, per-case error capture, the result files, the summary;
- :mod:`.table`: the printed table (columns declared per suite);
- :mod:`.report`: machine info and the JSON / CSV / HTML files (:mod:`.html`: the plotly page);
- :mod:`.timing`: median timer (warm-up, device sync, interleaving) and peak-memory helpers.

Suites (``sparsekern bench SUITE``): :mod:`.suite` (``ops``, the default; its cases: :mod:`.workload`
the shapes, weights and ``Case``/``Peer``; :mod:`.cases` the builders and the plan; :mod:`.gpu_plan` the
cuda encoders, issue 10; :mod:`.sae_cases` the drop-in API), :mod:`.features`, :mod:`.training` (its two
trainers: :mod:`.trainers`), :mod:`.patching`, :mod:`.distributed`.

Tools on result files: :mod:`.targets` (the encoder target table), :mod:`.choose_strategy`.
"""

from .cases import GEMMA, GPT2, MEM, OPS, Case, Peer, Shape, Weights, build, make_weights
from .runner import Job, Options, Suite
from .suite import FIELDS, Settings, resolve_ours, run_case, run_suite

__all__ = [
    "FIELDS", "GEMMA", "GPT2", "MEM", "OPS", "Case", "Job", "Options", "Peer", "Settings", "Shape", "Suite",
    "Weights", "build", "make_weights", "resolve_ours", "run_case", "run_suite",
]
