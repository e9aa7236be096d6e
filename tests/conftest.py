"""Shared fixtures: backends to test and tolerance helpers pinned to the float64 reference."""

import os

import pytest
import torch

os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")

import sparsekern  # noqa: E402
from sparsekern import backends  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

torch.set_num_threads(min(2, os.cpu_count() or 1))

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_backends(op: str) -> list[str]:
    """Every backend that can run ``op`` on CPU tensors in this process."""
    return backends.implementations(op, "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(|e|, tiny): one number per comparison."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def tol_for(dtype: torch.dtype) -> float:
    """A fixed rel_err tolerance for sums of n products. Its derivation: the worst case in any order is
    gamma(n) * R, R = max sum |terms| / max |result| (tests/_bounds.py), so 1e-5 holds in fp32
    (u = 2^-24) while n * R <= 167, and 1e-10 in float64 (u = 2^-53) while n * R <= 9e5. Prefer the
    data-derived bounds of tests/_bounds.py, which need no such condition."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"sparsekern backends: {sparsekern.backends()}  torch {torch.__version__}"
