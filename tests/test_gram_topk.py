"""sparsekern.ops.gram_topk (C++ and reference) against a dense float64 Gram matrix + stable top-k.

Tie-heavy inputs use rows of +-1 / 0 entries drawn from a small pool (duplicates, negated duplicates,
zero rows): every Gram entry is a small integer, exact in float32 and float64, so tie-breaks (lower
index first) can be checked exactly.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekern import backends
from sparsekern.ops.gram_topk import gram_rounds, gram_topk, gram_topk_backend

from _bounds import acc, assert_topk_decided, gamma

BACKENDS = ["cpp", "ref"]


def dense_ref(W, k, absolute):
    G = W.double() @ W.double().T
    key = G.abs() if absolute else G.clone()
    key.fill_diagonal_(-float("inf"))
    idx = key.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return G.gather(1, idx), idx


def ties(n, d, pool, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-1, 2, (max(1, pool), d), generator=g).to(dtype)
    W = rows[torch.randint(len(rows), (n,), generator=g)]
    return W * (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1).to(dtype)


def gram_err(W):
    """Per-entry worst-case error of W @ W.T in W's dtype, any order: gamma(d) * |W| @ |W|.T. It bounds
    |G| too (||a| - |b|| <= |a - b|), so it serves absolute=True as well."""
    Wa = W.double().abs()
    return gamma(W.shape[1], acc(W.dtype)) * (Wa @ Wa.T)


def assert_decided(W, k, absolute):
    """Continuous data: the k+1 best keys of each row are further apart than twice the rounding bound,
    so the indices (and their order) are exact on any machine."""
    G = W.double() @ W.double().T
    key = G.abs() if absolute else G
    assert_topk_decided(key.fill_diagonal_(-float("inf")), gram_err(W), k)


def gaussian(n, d, seed, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def run(backend, W, k, **kw):
    with backends.use_backend(backend):
        return gram_topk(W, k, **kw)


def test_cpu_uses_the_native_kernel():
    assert gram_topk_backend(torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("block", [1, 5, 16, 64, 512])  # 1 block, odd and even block counts
def test_gaussian_float64_exact(backend, absolute, block):
    W = gaussian(90, 12, seed=block)
    assert_decided(W, 7, absolute)
    v, i = run(backend, W, 7, absolute=absolute, block=block)
    want_v, want_i = dense_ref(W, 7, absolute)
    assert torch.equal(i, want_i)
    # float64: gamma(12) * |w_i| . |w_j| <= 12 u ||w_i|| ||w_j|| ~ 4e-14 for these rows, inside 1e-12
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("absolute", [False, True])
def test_ties_exact(backend, dtype, absolute):
    W = ties(70, 6, pool=9, seed=1, dtype=dtype)
    W[[3, 40]] = 0
    for k in (1, 4, 30, 69):
        v, i = run(backend, W, k, absolute=absolute, block=8)
        want_v, want_i = dense_ref(W, k, absolute)
        assert v.dtype == dtype
        assert torch.equal(i, want_i)
        assert torch.equal(v.double(), want_v)


def test_float32_gaussian_close():
    W = gaussian(1500, 64, seed=3, dtype=torch.float32)
    W = W / W.norm(dim=1, keepdim=True)
    v, i = gram_topk(W, 16, block=128)
    want_v, _ = dense_ref(W, 16, False)
    # unit rows: every entry's fp32 error is <= gamma(64) * |w_i| . |w_j| <= ~3.8e-6 (Cauchy-Schwarz),
    # in any order. Sorted top-k values move by at most the largest entry error, so near-ties that swap
    # indices do not matter here; and each picked entry is within its own bound of the exact G.
    atol = float(gram_err(W).max())
    torch.testing.assert_close(v.double(), want_v, rtol=0, atol=atol)
    G = W.double() @ W.double().T
    torch.testing.assert_close(G.gather(1, i), v.double(), rtol=0, atol=atol)


def test_rounds_in_any_slices_give_the_same_state():
    """The public function advances the state in slices of rounds; one round at a time is the same."""
    from sparsekern.ops.gram_topk import _gram_topk_update_

    W = gaussian(50, 5, seed=4)
    k, cap, block = 3, 8, 4
    assert_decided(W, k, False)
    results = []
    for step in (1, 3, gram_rounds(50, block)):
        vals = torch.zeros(50, cap, dtype=W.dtype)
        idx = torch.full((50, cap), -1, dtype=torch.int64)
        for r0 in range(0, gram_rounds(50, block), step):
            _gram_topk_update_(W, vals, idx, k, False, block, r0, min(gram_rounds(50, block), r0 + step))
        key = torch.where(idx < 0, -float("inf"), vals)
        top = key.sort(dim=1, descending=True, stable=True).indices[:, :k]  # decided: asserted above
        results.append(idx.gather(1, top))
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(results[0], dense_ref(W, k, False)[1])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 45), d=st.integers(1, 8), pool=st.integers(1, 12), k_frac=st.floats(0, 1),
       block=st.integers(1, 20), absolute=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]), backend=st.sampled_from(BACKENDS))
def test_fuzz_exact(n, d, pool, k_frac, block, absolute, seed, dtype, backend):
    W = ties(n, d, pool, seed, dtype)
    k = 1 + int(k_frac * (n - 2))
    v, i = run(backend, W, k, absolute=absolute, block=block)
    want_v, want_i = dense_ref(W, k, absolute)
    assert torch.equal(i, want_i)
    assert torch.equal(v.double(), want_v)


@pytest.mark.parametrize("bad, match", [
    (dict(W=torch.zeros(5)), "2-D float32/float64"),
    (dict(W=torch.zeros(5, 3, dtype=torch.int64)), "2-D float32/float64"),
    (dict(W=torch.zeros(1, 3)), "at least 2"),
    (dict(k=0), "1 <= k <= 4"),
    (dict(k=5), "1 <= k <= 4"),
    (dict(block=0), "block"),
    (dict(W=torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]])), "NaN or inf"),
])
def test_bad_arguments(bad, match):
    args = dict(W=torch.randn(5, 3), k=2, block=4) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        gram_topk(args.pop("W"), args.pop("k"), **args)


def test_native_rejects_a_foreign_state():
    """The kernel re-checks shapes, rounds and index ranges before it reads anything."""
    native = backends.native()
    W = torch.randn(10, 3)
    vals, idx = torch.zeros(10, 4), torch.full((10, 4), -1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[-1, n\)"):
        native.gram_topk_update(W, vals, torch.full((10, 4), 10, dtype=torch.int64), 2, False, 4, 0, 1)
    with pytest.raises(RuntimeError, match="rounds"):
        native.gram_topk_update(W, vals, idx, 2, False, 4, 0, gram_rounds(10, 4) + 1)
    with pytest.raises(RuntimeError, match="cap > k"):
        native.gram_topk_update(W, vals, idx, 4, False, 4, 0, 1)
    with pytest.raises(RuntimeError, match=r"\[n, cap\]"):
        native.gram_topk_update(W, torch.zeros(9, 4), idx, 2, False, 4, 0, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.gram_topk_update(W.T.contiguous().T, vals, idx, 2, False, 4, 0, 1)


def test_opcheck():
    W = gaussian(20, 4, seed=5, dtype=torch.float32)
    vals, idx = torch.zeros(20, 6), torch.full((20, 6), -1, dtype=torch.int64)
    torch.library.opcheck(torch.ops.sparsekern.gram_topk_update_.default,
                          (W, vals, idx, 2, True, 8, 0, gram_rounds(20, 8)))
