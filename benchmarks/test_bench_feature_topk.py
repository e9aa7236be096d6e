"""feature_topk_update (one streaming merge step) vs the reference and a dense torch.topk."""

import pytest

from sparsekern.bench import cases


@pytest.fixture(scope="module")
def topk_case(weights):
    return cases.feature_topk_case(weights)


@pytest.mark.benchmark(group="feature_topk_update")
@pytest.mark.parametrize("impl", ["sparsekern", "ref", "dense_topk"])
def test_feature_topk_update(run_impl, topk_case, impl):
    run_impl(topk_case, impl)
