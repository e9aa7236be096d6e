"""feature_topk_update on every backend vs a brute-force dense top-k over the whole stream."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern import backends
from sparsekern.ops import FeatureTopKState, SparseActs, feature_topk_update

from conftest import cpu_backends

BACKENDS = cpu_backends("feature_topk_update")


def stream(n_rows, kc, d_sae, seed=0, dtype=torch.float32, ties=False):
    """Rows of a sparse code with distinct features per row; some entries <= 0 (never candidates)."""
    g = torch.Generator().manual_seed(seed)
    kc = min(kc, d_sae)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:kc] for _ in range(n_rows)]) if n_rows else (
        torch.zeros(0, kc, dtype=torch.int64))
    if ties:
        vals = torch.randint(-1, 4, (n_rows, kc), generator=g).to(dtype) * 0.5
    else:
        vals = torch.rand(n_rows, kc, generator=g, dtype=torch.float64) * 2 - 0.3
    locs = torch.stack([torch.randint(0, 50, (n_rows,), generator=g),
                        torch.randint(0, 64, (n_rows,), generator=g)], 1)
    return vals.to(dtype), idx, locs


def brute_force(vals, idx, locs, d_sae, k):
    """Dense [rows, d_sae] code, then per feature the k best rows (tie-free data only)."""
    n = vals.shape[0]
    dense = torch.zeros(n, d_sae, dtype=torch.float64)
    dense.scatter_(1, idx, vals.double())
    dense[dense <= 0] = -math.inf
    kk = min(k, n)
    top_v, top_r = dense.t().topk(kk, dim=1) if kk else (torch.empty(d_sae, 0), torch.empty(d_sae, 0, dtype=torch.int64))
    out_v = torch.full((d_sae, k), -math.inf, dtype=torch.float64)
    out_l = torch.full((d_sae, k, 2), -1, dtype=torch.int64)
    out_v[:, :kk] = top_v
    out_l[:, :kk] = locs[top_r]
    out_l[out_v == -math.inf] = -1
    return out_v, out_l


def run(backend, state, batches, **kw):
    with sk.use_backend(backend):
        for v, i, l in batches:
            state = feature_topk_update(state, SparseActs(v, i), l, **kw)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_brute_force(backend, dtype):
    d_sae, k = 300, 7
    v, i, l = stream(500, 12, d_sae, dtype=dtype)
    state = run(backend, FeatureTopKState.empty(d_sae, k, dtype=dtype),
                [(v[a:a + 128], i[a:a + 128], l[a:a + 128]) for a in range(0, 500, 128)])
    ev, el = brute_force(v, i, l, d_sae, k)
    assert state.values.dtype == dtype
    assert torch.equal(state.values.double(), ev.to(dtype).double())
    assert torch.equal(state.locations, el)
    assert torch.equal(state.count(), (ev > -math.inf).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(0, 60), kc=st.integers(0, 9), d_sae=st.integers(1, 40), k=st.integers(1, 12),
       n_batches=st.integers(1, 4))
def test_fuzz(backend, n, kc, d_sae, k, n_batches):
    v, i, l = stream(n, kc, d_sae, seed=n * 7 + kc + d_sae)
    cuts = torch.linspace(0, n, n_batches + 1).long().tolist()
    state = run(backend, FeatureTopKState.empty(d_sae, k),
                [(v[a:b], i[a:b], l[a:b]) for a, b in zip(cuts, cuts[1:])])
    ev, el = brute_force(v, i, l, d_sae, k)
    assert torch.equal(state.values.double(), ev.float().double())
    assert torch.equal(state.locations, el)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_split_invariant_and_equal_to_ref(backend):
    """Tie-heavy values: the (value desc, seq asc, pos asc) order makes any split and any batch
    order give the same state, on every backend."""
    d_sae, k = 20, 5
    v, i, l = stream(300, 6, d_sae, seed=3, ties=True)
    one = run(backend, FeatureTopKState.empty(d_sae, k), [(v, i, l)])
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    pv, pi, pl = v[perm], i[perm], l[perm]
    many = run(backend, FeatureTopKState.empty(d_sae, k),
               [(pv[a:a + 37], pi[a:a + 37], pl[a:a + 37]) for a in range(0, 300, 37)])
    ref = run("ref", FeatureTopKState.empty(d_sae, k), [(v, i, l)])
    for s in (many, ref):
        assert torch.equal(one.values, s.values) and torch.equal(one.locations, s.locations)
    # rows sorted by value desc, then (seq, pos) asc. An exact lexicographic key in float64: values
    # differ by >= 0.5 (5e5 > 50 seqs * 100 + 64 pos * 1e-3), seqs by >= 1 (100 > 0.064), positions by
    # 1e-3, far above the ~1e-10 rounding of a key of magnitude <= 1.5e6 (no tolerance involved)
    key = one.values.double() * 1e6 - one.locations[..., 0] * 100 - one.locations[..., 1] * 1e-3
    filled = one.locations[..., 0] >= 0
    assert bool(((key[:, :-1] >= key[:, 1:]) | ~filled[:, 1:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_offset_locations_and_inplace(backend):
    d_sae, k = 64, 4
    v, i, _ = stream(2 * 3 * 5, 8, d_sae, seed=5)
    v3, i3 = v.reshape(6, 5, 8), i.reshape(6, 5, 8)
    state = FeatureTopKState.empty(d_sae, k)
    with sk.use_backend(backend):
        s1 = feature_topk_update(state, SparseActs(v3[:2], i3[:2]))
        s1 = feature_topk_update(s1, SparseActs(v3[2:], i3[2:]), seq_offset=2)
        same = feature_topk_update(state, SparseActs(v3[2:], i3[2:]), seq_offset=2, inplace=True)
    assert same is state and bool((state.values > -math.inf).any())
    seq = torch.arange(6).repeat_interleave(5)
    pos = torch.arange(5).repeat(6)
    ev, el = brute_force(v, i, torch.stack([seq, pos], 1), d_sae, k)
    assert torch.equal(s1.values.double(), ev.float().double()) and torch.equal(s1.locations, el)
    # [*lead, 2] locations are accepted too
    with sk.use_backend(backend):
        s2 = feature_topk_update(FeatureTopKState.empty(d_sae, k), SparseActs(v3, i3),
                                 torch.stack([seq, pos], 1).reshape(6, 5, 2))
    assert torch.equal(s2.locations, el)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_acts_compare_in_state_dtype(backend):
    d_sae, k = 50, 3
    v, i, l = stream(80, 5, d_sae, seed=9)
    vb = v.to(torch.bfloat16)
    state = run(backend, FeatureTopKState.empty(d_sae, k), [(vb, i, l)])
    ref = run("ref", FeatureTopKState.empty(d_sae, k), [(vb, i, l)])
    assert torch.equal(state.values, ref.values) and torch.equal(state.locations, ref.locations)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_zero_and_negative_are_never_candidates(backend):
    v = torch.tensor([[float("nan"), 0.0, -1.0, 2.0]])
    i = torch.tensor([[0, 1, 2, 3]])
    state = run(backend, FeatureTopKState.empty(4, 2), [(v, i, torch.tensor([[7, 8]]))])
    assert state.count().tolist() == [0, 0, 0, 1]
    assert state.values[3].tolist() == [2.0, -math.inf] and state.locations[3, 0].tolist() == [7, 8]


def test_bad_input():
    st_ = FeatureTopKState.empty(10, 3)
    v, i, l = stream(4, 3, 10)
    acts = SparseActs(v, i)
    with pytest.raises(ValueError, match=r"acts.indices must lie in \[0, d_sae=10\)"):
        feature_topk_update(FeatureTopKState.empty(10, 3), SparseActs(v, i + 10), l)
    with pytest.raises(ValueError, match=r"locations must have shape \[rows, 2\]"):
        feature_topk_update(st_, acts, l[:, :1])
    with pytest.raises(TypeError, match="locations must be int64"):
        feature_topk_update(st_, acts, l.int())
    with pytest.raises(ValueError, match="locations must be >= 0"):
        feature_topk_update(st_, acts, -l - 1)
    with pytest.raises(ValueError, match=r"locations=None needs acts of shape \[batch, pos, k\]"):
        feature_topk_update(st_, acts)
    with pytest.raises(ValueError, match="acts is on meta"):
        feature_topk_update(st_, SparseActs(v.to("meta"), i.to("meta")), l)
    with pytest.raises(TypeError, match="state must be a FeatureTopKState"):
        feature_topk_update((st_.values, st_.locations), acts, l)
    with pytest.raises(TypeError, match="acts must be a SparseActs"):
        feature_topk_update(st_, (v, i), l)
    with pytest.raises(ValueError, match=r"FeatureTopKState.locations must have shape \[d_sae, k, 2\]"):
        FeatureTopKState(torch.zeros(10, 3), torch.zeros(10, 4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        FeatureTopKState.empty(10, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k must satisfy"):
        FeatureTopKState.empty(10, 0)
    with pytest.raises(ValueError, match="inplace=True needs contiguous"):
        nc = FeatureTopKState(torch.zeros(3, 10).t(), torch.zeros(10, 3, 2, dtype=torch.int64))
        feature_topk_update(nc, acts, l, inplace=True)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_native_rechecks_indices():
    st_ = FeatureTopKState.empty(10, 3)
    v, i, l = stream(4, 3, 10)
    with pytest.raises(RuntimeError, match="indices must lie in"):
        backends.native().feature_topk_update(st_.values, st_.locations, v, i + 10, l)
    with pytest.raises(RuntimeError, match="locations must be int64"):
        backends.native().feature_topk_update(st_.values, st_.locations, v, i, l[:, :1])
    with pytest.raises(RuntimeError, match="values dtype"):
        backends.native().feature_topk_update(st_.values, st_.locations, v.double(), i, l)


def test_opcheck():
    v, i, l = stream(16, 4, 30)
    st_ = FeatureTopKState.empty(30, 3)
    torch.library.opcheck(torch.ops.sparsekern.feature_topk_update_.default,
                          (st_.values, st_.locations, v, i, l))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_hand_built_state(backend):
    """A state whose rows are not in the op's order (built by hand) still merges to the exact top-k."""
    d_sae, k = 30, 4
    g = torch.Generator().manual_seed(4)
    vals = torch.rand(d_sae, k, generator=g) + 0.5  # random order, all filled
    locs = torch.randint(1000, 2000, (d_sae, k, 2), generator=g)
    vals[::3, 1] = -math.inf  # odd -inf entries at real locations (they precede no empty slot)...
    vals[1::3, 2] = -math.inf  # ...next to empty slots, which sort before them
    locs[1::3, 2] = -1
    vals[1::3, 0] = -math.inf
    v, i, l = stream(40, 5, d_sae, seed=4)
    want = run("ref", FeatureTopKState(vals.clone(), locs.clone()), [(v, i, l)])
    got = run(backend, FeatureTopKState(vals.clone(), locs.clone()), [(v, i, l)])
    assert torch.equal(got.values, want.values) and torch.equal(got.locations, want.locations)
    # brute force over state entries + candidates
    dense = torch.zeros(40, d_sae).scatter_(1, i, v)
    for f in range(d_sae):  # touched rows: exact top-k of (row, candidates); others untouched
        new = dense[:, f][dense[:, f] > 0]
        expect = torch.cat([vals[f], new]).sort(descending=True).values[:k] if new.numel() else vals[f]
        assert torch.equal(want.values[f], expect)
