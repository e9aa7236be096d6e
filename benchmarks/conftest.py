"""Fixtures for the pytest-benchmark suites (outside ``testpaths``: ``pytest tests/`` never sees them).

Cases come from :mod:`sparsekern.bench.cases`, the same builders ``sparsekern bench`` uses.
Environment: ``SPARSEKERN_BENCH_QUICK=1`` swaps the GPT-2-small shape for a tiny one (smoke test);
``SPARSEKERN_BENCH_DEVICE=cpu|cuda|mps`` picks the device (default: cuda if available, else cpu).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

from sparsekern.bench import cases, suite
from sparsekern.bench import timing as T
from sparsekern.bench.report import cpu_cores

SHAPE = cases.QUICK_A if os.environ.get("SPARSEKERN_BENCH_QUICK") == "1" else cases.GPT2
_DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE = torch.device(os.environ.get("SPARSEKERN_BENCH_DEVICE") or _DEFAULT_DEVICE)


@pytest.fixture(scope="session")
def weights() -> cases.Weights:
    """Seeded SAE weights + inputs at the benchmark shape (built once per session)."""
    if DEVICE.type == "cpu":
        torch.set_num_threads(cpu_cores())
    return cases.make_weights(SHAPE, DEVICE)


@pytest.fixture
def run_impl(benchmark) -> Callable[[cases.Case, str], Any]:
    """``run_impl(case, key)``: benchmark sparsekern (``key='sparsekern'``) or the peer ``key``."""

    def run(case: cases.Case, key: str) -> Any:
        if key == "sparsekern":
            res = suite.resolve_ours(case, DEVICE)
            fn, res.out = res.fn, None
            benchmark.extra_info.update(backend=res.backend, note=res.note)
        else:
            peer = case.peer(key)
            if peer.skip:
                pytest.skip(peer.skip)
            fn = peer.fn
            benchmark.extra_info["peer"] = peer.name
        benchmark.extra_info.update(op=case.op + case.variant, shape=SHAPE.name, **SHAPE.dims())

        def call() -> Any:
            out = fn()
            T.sync(DEVICE)
            return out

        return benchmark(call)

    return run
