"""Benchmark harness behind ``sparsekern bench`` and the pytest-benchmark suites in ``benchmarks/``.

- :mod:`.timing`: median timer (warm-up, device sync, interleaving) and peak-memory helpers;
- :mod:`.cases`: seeded SAE weights/inputs and the sparsekern-vs-peer cases;
- :mod:`.gpu_plan`: the cuda encoder shapes, targets and per-strategy variants (issue 10);
- :mod:`.targets`: the encoder target table printed from result files;
- :mod:`.suite`: runs cases into result rows;
- :mod:`.report`: machine info, printed table, JSON/CSV files.
"""

from .cases import GEMMA, GPT2, MEM, OPS, Case, Peer, Shape, Weights, build, make_weights
from .suite import FIELDS, Settings, resolve_ours, run_case, run_suite

__all__ = [
    "FIELDS", "GEMMA", "GPT2", "MEM", "OPS", "Case", "Peer", "Settings", "Shape", "Weights",
    "build", "make_weights", "resolve_ours", "run_case", "run_suite",
]
