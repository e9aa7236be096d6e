"""threshold_encode (JumpReLU, L0≈64) vs ``sae_lens.JumpReLUSAE.encode`` (one group)."""

import pytest

from sparsekern.bench import cases


@pytest.fixture(scope="module")
def case(weights):
    return cases.threshold_encode_case(weights)


@pytest.mark.benchmark(group="threshold_encode")
@pytest.mark.parametrize("impl", ["sparsekern", "sae_lens"])
def test_threshold_encode(run_impl, case, impl):
    run_impl(case, impl)
