"""topk_encode vs bare ``x @ W_enc`` and ``sae_lens.TopKSAE.encode`` (one group: compare them)."""

import pytest

from sparsekern.bench import cases


@pytest.fixture(scope="module")
def case(weights):
    return cases.topk_encode_case(weights)


@pytest.mark.benchmark(group="topk_encode")
@pytest.mark.parametrize("impl", ["sparsekern", "matmul", "sae_lens"])
def test_topk_encode(run_impl, case, impl):
    run_impl(case, impl)
