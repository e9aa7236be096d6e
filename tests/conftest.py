"""Shared fixtures: backends to test and tolerance helpers pinned to the float64 reference."""

import os

import pytest
import torch

os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")

import sparsekern  # noqa: E402
from sparsekern import _backend  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

torch.set_num_threads(min(2, os.cpu_count() or 1))

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_backends(op: str) -> list[str]:
    """Every backend that can run ``op`` on CPU tensors in this process."""
    return _backend.implementations(op, "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(|e|, tiny): one number per comparison."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def tol_for(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"sparsekern backends: {sparsekern.backends()}  torch {torch.__version__}"
