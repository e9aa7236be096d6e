"""sparse_decode vs ``F.embedding_bag``; with b_dec vs SAELens dense decode; fwd+bwd vs dense autograd."""

import pytest

from sparsekern.bench import cases


@pytest.fixture(scope="module")
def decode_cases(weights):
    plain, biased = cases.sparse_decode_cases(weights)
    return {"plain": plain, "b_dec": biased}


@pytest.fixture(scope="module")
def backward_case(weights):
    return cases.sparse_backward_case(weights)


@pytest.mark.benchmark(group="sparse_decode")
@pytest.mark.parametrize("impl", ["sparsekern", "embedding_bag"])
def test_sparse_decode(run_impl, decode_cases, impl):
    run_impl(decode_cases["plain"], impl)


@pytest.mark.benchmark(group="sparse_decode+b_dec")
@pytest.mark.parametrize("impl", ["sparsekern", "sae_lens"])
def test_sparse_decode_vs_sae_lens(run_impl, decode_cases, impl):
    run_impl(decode_cases["b_dec"], impl)


@pytest.mark.benchmark(group="sparse_decode_backward")
@pytest.mark.parametrize("impl", ["sparsekern", "dense_autograd"])
def test_sparse_decode_backward(run_impl, backward_case, impl):
    run_impl(backward_case, impl)
