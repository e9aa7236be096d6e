"""FeatureStats pinned to dense float64 computations on random sparse codes (hypothesis).

Codes mix firing slots (log-uniform values over and beyond the histogram range), padding (value 0, any
index, duplicates of live ones included) and negative values, which must count nowhere.
"""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import sparsekern.features.accumulators.pair_table as pair_table
from sparsekern import SparseActs
from sparsekern.features.stats import FeatureStats, feature_stats

D_Y = 3
HIST = {"hist_range": (1e-2, 1e2), "hist_bins": 8}


# ---- data and oracle -------------------------------------------------------------------------------------
def random_code(n, k, F, seed, p_dead=0.3, p_neg=0.1, dtype=torch.float64):
    """[n, k] codes: distinct live indices per row, padding 0 at a random index, some negative values."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(F, generator=g)[:k] for _ in range(n)]
    idx = torch.stack(rows) if n else torch.zeros(0, k, dtype=torch.int64)
    vals = 10 ** (torch.rand(n, k, generator=g, dtype=torch.float64) * 6 - 3)  # 1e-3 .. 1e3
    u = torch.rand(n, k, generator=g)
    dead = u < p_dead
    vals = torch.where(dead, 0.0, torch.where(u > 1 - p_neg, -vals, vals))
    idx = torch.where(dead & (u < p_dead / 2), torch.randint(0, F, (n, k), generator=g), idx)
    y = torch.randn(n, D_Y, generator=g, dtype=torch.float64)
    return SparseActs(vals.to(dtype), idx), y.to(dtype)


def dense(acts, F):
    """relu of the dense code, float64 [N, F] (duplicate padding indices add 0)."""
    v = acts.values.reshape(-1, acts.k).double()
    return torch.zeros(v.shape[0], F, dtype=torch.float64).scatter_add_(1, acts.indices.reshape(-1, acts.k),
                                                                     v).clamp_min(0)


def oracle_hist(D, edges):
    B = edges.numel() + 1
    out = torch.zeros(D.shape[1], B, dtype=torch.int64)
    for f in range(D.shape[1]):
        v = D[:, f][D[:, f] > 0]
        out[f] = torch.bincount(torch.bucketize(v, edges, right=True), minlength=B)
    return out


def full_stats(F, **kw):
    return FeatureStats(F, cooccurrence=True, conditioned_on=D_Y, conditioned_sum=True, y_moments=True,
                        second_moment_features=[F - 1, 0] if F > 1 else [0], **HIST, **kw)


def feed(stats, acts, y, cuts):
    """Update in the row chunks given by ``cuts``; the first chunk goes in as [1, rows, k] (leading dims)."""
    bounds = [0, *sorted(cuts), acts.shape[0]]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        v, ix, yy = acts.values[a:b], acts.indices[a:b], y[a:b]
        if i == 0:
            v, ix, yy = v[None], ix[None], yy[None]
        stats.update(SparseActs(v, ix), yy)
    return stats


def close(a, b, tol=1e-10):
    assert a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    ok = ~torch.isnan(b)
    assert torch.allclose(a[ok].double(), b[ok].double(), rtol=tol, atol=tol)


def check_against_dense(s, acts, y, F):
    D = dense(acts, F)
    Bi = (D > 0).double()
    N = D.shape[0]
    assert s.n_tokens == N
    assert torch.equal(s.counts, Bi.sum(0).long())
    close(s.act_sum, D.sum(0))
    close(s.act_sq_sum, (D * D).sum(0))
    close(s.act_max, D.max(0).values if N else torch.zeros(F, dtype=torch.float64))
    close(s.act_min, torch.where(D > 0, D, math.inf).min(0).values if N else torch.full((F,), math.inf))
    assert torch.equal(s.hist_counts, oracle_hist(D, s.hist_edges))
    C = (Bi.T @ Bi).long()
    assert torch.equal(s.cooccurrence.long(), C)
    assert s.cooccurrence.dtype == torch.int32
    close(s.cond_act_sum, D.T @ y)
    assert torch.equal(s.cond_pos_count, (Bi.T @ (y > 0).double()).long())
    close(s.cond_sum, Bi.T @ y)
    for j, f in enumerate(s.second_moment_features.tolist()):
        close(s.cond_second_moment[j], (y * D[:, f:f + 1]).T @ y)
    if N > 1:
        close(s.y_mean(), y.mean(0))
        close(s.y_covariance(), torch.cov(y.T).reshape(D_Y, D_Y), 1e-9)


@st.composite
def shapes(draw, max_n=40):
    F = draw(st.integers(1, 10))
    return draw(st.integers(0, max_n)), draw(st.integers(1, F)), F, draw(st.integers(0, 2**31 - 1))


# ---- exactness ---------------------------------------------------------------------------------------------
@given(shapes(), st.lists(st.integers(0, 40), max_size=3))
@example((0, 1, 1, 0), [])  # empty batch
@example((7, 1, 3, 1), [2])  # k = 1
@example((5, 4, 4, 2), [])  # every slot fires in some rows: all features co-fire
def test_matches_dense(shape, cuts):
    n, k, F, seed = shape
    acts, y = random_code(n, k, F, seed)
    s = feed(full_stats(F), acts, y, [min(c, n) for c in cuts])
    check_against_dense(s, acts, y, F)


@given(shapes(), st.lists(st.integers(0, 40), min_size=1, max_size=3))
def test_merge_of_splits_equals_one_pass(shape, cuts):
    n, k, F, seed = shape
    acts, y = random_code(n, k, F, seed)
    one = full_stats(F).update(acts, y)
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    parts = [full_stats(F).update(SparseActs(acts.values[a:b], acts.indices[a:b]), y[a:b])
             for a, b in zip(bounds[:-1], bounds[1:])]
    merged = parts[0]
    merged.merge(full_stats(F))  # a state that saw nothing
    for p in parts[1:]:
        merged.merge(p)
    assert merged.n_tokens == one.n_tokens
    for name in ("counts", "hist_counts", "cond_pos_count"):
        assert torch.equal(getattr(merged, name), getattr(one, name))
    assert torch.equal(merged.cooccurrence, one.cooccurrence)
    floats = ("act_sum", "act_sq_sum", "act_max", "act_min", "cond_act_sum", "cond_sum", "cond_second_moment")
    for name in floats:
        close(getattr(merged, name), getattr(one, name), 1e-12)
    if n > 1:
        close(merged.y_mean(), one.y_mean(), 1e-12)
        close(merged.y_covariance(), one.y_covariance(), 1e-9)


@given(shapes())
def test_derived_statistics(shape):
    n, k, F, seed = shape
    acts, y = random_code(n, k, F, seed)
    s = FeatureStats(F, cooccurrence=True, conditioned_on=D_Y, conditioned_sum=True).update(acts, y)
    D = dense(acts, F)
    Bi = (D > 0).double()
    c, C = Bi.sum(0), Bi.T @ Bi
    with torch.no_grad():
        freq = c / n if n else torch.full((F,), math.nan, dtype=torch.float64)
        close(s.frequency(), freq)
        close(s.log_sparsity(), torch.log10(freq + 1e-10))
        close(s.mean_activation(), D.sum(0) / c)
        close(s.mean_activation(given_firing=False), D.sum(0) / n if n else freq)
        mean = D.sum(0) / c
        close(s.activation_variance(), ((D - mean) ** 2 * Bi).sum(0) / c, 1e-8)
        close(s.cooccurrence_prob(), C / c[:, None])
        close(s.cooccurrence_prob(rows=[F - 1]), (C / c[:, None])[F - 1:])
        close(s.cooccurrence_ratio(), (C / n) / (c[:, None] / n * c[None, :] / n) if n else C / C)
        Z = Bi - Bi.mean(0)
        sd = Z.pow(2).sum(0).sqrt()
        corr = (Z.T @ Z) / (sd[:, None] * sd[None, :])
        corr = torch.where((c[:, None] % n == 0) | (c[None, :] % n == 0), math.nan, corr) if n else C / C
        close(s.cooccurrence_correlation(), corr, 1e-9)
        close(s.conditioned_mean(), (D.T @ y) / D.sum(0)[:, None])
        close(s.conditioned_mean(weighted=False), (Bi.T @ y) / c[:, None])
        close(s.conditioned_positive_frac(), (Bi.T @ (y > 0).double()) / c[:, None])
    tp = s.top_partners(2)
    for i in range(F):
        row = [(-int(C[i, j]), j) for j in range(F) if j != i]
        row.sort()
        want = [(j if -cnt > 0 else -1, -cnt) for cnt, j in row[:2]]
        want += [(-1, 0)] * (min(2, F - 1) - len(want))
        got = list(zip(tp.partners[i].tolist(), tp.upper[i].tolist()))
        assert got == want[: tp.partners.shape[1]]
        assert tp.unlisted_bound[i] == (-row[2][0] if len(row) > 2 else 0)
    assert torch.equal(tp.lower, tp.upper)


def test_subset_table():
    F = 9
    acts, _ = random_code(60, 4, F, 3)
    sub = [7, 2, 5]
    s = FeatureStats(F, cooccurrence_features=torch.tensor(sub), **HIST).update(acts)
    Bi = (dense(acts, F) > 0).double()
    C = (Bi.T @ Bi).long()
    assert torch.equal(s.cooccurrence.long(), C[sub][:, sub])
    assert torch.equal(s.cooccurrence_features, torch.tensor(sub))
    close(s.cooccurrence_prob(), C[sub][:, sub] / C.diagonal()[sub][:, None].double())
    tp = s.top_partners(1)
    assert torch.equal(tp.features, torch.tensor(sub))
    sub_c = C[sub][:, sub].fill_diagonal_(-1)
    assert torch.equal(tp.upper[:, 0], sub_c.max(1).values.clamp_min(0))


def test_dense_input_and_float32():
    F = 12
    acts64, y64 = random_code(50, 5, F, 11)
    acts = SparseActs(acts64.values.float(), acts64.indices)
    y = y64.float()
    s = FeatureStats(F, cooccurrence=True, conditioned_on=D_Y, conditioned_sum=True, y_moments=True,
                     **HIST).update(acts, y)
    ref = full_stats(F).update(SparseActs(acts.values.double(), acts.indices), y.double())
    assert s.act_sum.dtype == s.cond_act_sum.dtype == torch.float64
    assert torch.equal(s.counts, ref.counts) and torch.equal(s.cooccurrence, ref.cooccurrence)
    assert torch.equal(s.hist_counts, ref.hist_counts) and torch.equal(s.cond_pos_count, ref.cond_pos_count)
    close(s.act_sum, ref.act_sum)  # float32 values are exact in float64
    close(s.cond_act_sum, ref.cond_act_sum, 1e-5)
    close(s.cond_sum, ref.cond_sum, 1e-5)
    close(s.y_covariance(), ref.y_covariance(), 1e-5)
    from_dense = FeatureStats(F, cooccurrence=True, **HIST).update(dense(acts64, F).float())
    assert torch.equal(from_dense.counts, ref.counts)
    assert torch.equal(from_dense.cooccurrence, ref.cooccurrence)
    assert torch.equal(from_dense.hist_counts, ref.hist_counts)


def test_conditioned_paths():
    """Pending small batches of different k (threshold codes), reduced on a few features (the compacted
    kernel call), then a batch large enough to be reduced at once; and conditioned_counts=False."""
    F = 50
    parts = [random_code(3, 2, F, 1), random_code(4, 3, F, 2), random_code(100, 4, F, 3)]
    s = FeatureStats(F, conditioned_on=D_Y, conditioned_sum=True, **HIST)
    sums = FeatureStats(F, conditioned_on=D_Y, conditioned_counts=False, **HIST)
    seen = []
    for i, (acts, y) in enumerate(parts):
        s.update(acts, y)
        sums.update(acts, y)
        seen.append((acts, y))
        cond = s.accumulators["conditioned"]
        if i == 1:
            # read -> flushed
            assert cond.pending_rows and s.cond_act_sum is not None and not cond.pending_rows
        if i == 2:
            assert not cond.pending_rows  # 100 rows x 4 slots >= 8 F: reduced at once
        D = torch.cat([dense(a, F) for a, _ in seen])
        y_all = torch.cat([yy for _, yy in seen])
        Bi = (D > 0).double()
        close(s.cond_act_sum, D.T @ y_all)
        close(s.cond_sum, Bi.T @ y_all)
        assert torch.equal(s.cond_pos_count, (Bi.T @ (y_all > 0).double()).long())
    close(sums.cond_act_sum, s.cond_act_sum, 1e-12)  # reduced in other groups: rounding differs
    assert sums.cond_pos_count is None
    with pytest.raises(ValueError, match="conditioned_counts"):
        sums.conditioned_positive_frac()


def test_quantiles_within_a_bin():
    torch.manual_seed(0)
    F, n = 5, 400
    vals = 10 ** (torch.rand(n, F, dtype=torch.float64) * 6 - 3)
    vals[:, 3] = 2.5  # a constant feature
    vals[: n // 2, 1] = 0  # half the tokens
    vals[:, 4] = 0  # never fires
    idx = torch.arange(F).expand(n, F)
    s = FeatureStats(F, **HIST).update(SparseActs(vals, idx))
    qs = torch.tensor([0.0, 0.01, 0.25, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    got = s.quantiles(qs)
    assert got.shape == (F, len(qs)) and s.quantiles(0.5).shape == (F,)
    assert torch.isnan(got[4]).all()
    assert torch.all(got[3] == 2.5)
    ext = torch.cat((torch.zeros(1, dtype=torch.float64), s.hist_edges, torch.full((1,), math.inf)))
    for f in range(3):
        v = vals[:, f][vals[:, f] > 0].sort().values
        true = torch.quantile(v, qs)
        assert got[f, 0] == v[0] and got[f, -1] == v[-1]
        for j, q in enumerate(qs.tolist()):
            r = q * (len(v) - 1)
            lo_v, hi_v = v[math.floor(r)], v[math.ceil(r)]  # the true quantile lies between these
            b = int(torch.bucketize(lo_v, s.hist_edges, right=True))
            lo, hi = max(ext[b], v[0]), min(ext[b + 1], v[-1])  # lo_v's bin, narrowed to [min, max]
            assert lo * (1 - 1e-12) <= got[f, j] <= hi * (1 + 1e-12)
            assert abs(got[f, j] - true[j]) <= (hi - lo) + (hi_v - lo_v) + 1e-12


# ---- partner sketch ---------------------------------------------------------------------------------
def check_sketch(s, C, m, n):
    F = C.shape[0]
    tp = s.top_partners(n)
    u = s.top_partners(m).unlisted_bound  # the sketch's own bound on partners it does not hold
    off = C.clone().fill_diagonal_(0)
    for i in range(F):
        listed = {}
        for j, lo, hi in zip(tp.partners[i].tolist(), tp.lower[i].tolist(), tp.upper[i].tolist()):
            if j >= 0:
                assert lo <= C[i, j] <= hi
                listed[j] = hi
        for j in range(F):
            if j != i and j not in listed:
                assert C[i, j] <= tp.unlisted_bound[i]
        assert u[i] * (m + 1) <= off[i].sum()
        if u[i] == 0:  # nothing ever dropped: exact
            assert torch.equal(tp.lower[i], tp.upper[i])
    return tp


@given(shapes(max_n=60), st.integers(1, 4), st.lists(st.integers(0, 60), max_size=4), st.booleans())
@example((30, 4, 10, 5), 1, [3, 10, 20], True)
def test_sketch_guarantees(shape, m, cuts, merge):
    n, k, F, seed = shape
    acts, _ = random_code(n, k, F, seed, p_dead=0.2)
    Bi = (dense(acts, F) > 0).double()
    C = (Bi.T @ Bi).long()
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    states = []
    s = FeatureStats(F, top_partners=1, partner_capacity=m)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if merge:
            s = FeatureStats(F, top_partners=1, partner_capacity=m)
            states.append(s)
        s.update(SparseActs(acts.values[a:b], acts.indices[a:b]))
    if merge:
        s = states[0]
        for t in states[1:]:
            s.merge(t)
    assert torch.equal(s.counts, C.diagonal())
    check_sketch(s, C, m, min(m, 1))
    check_sketch(s, C, m, m)


def test_sketch_with_room_for_every_partner_is_exact():
    F = 8
    acts, _ = random_code(80, 3, F, 5)
    Bi = (dense(acts, F) > 0).double()
    C = (Bi.T @ Bi).long()
    s = FeatureStats(F, top_partners=3, partner_capacity=F - 1)
    for a in range(0, 80, 16):
        s.update(SparseActs(acts.values[a:a + 16], acts.indices[a:a + 16]))
    exact = FeatureStats(F, cooccurrence=True).update(acts).top_partners(3)
    tp = check_sketch(s, C, F - 1, 3)
    assert torch.equal(tp.partners, exact.partners) and torch.equal(tp.lower, exact.lower)
    assert torch.equal(tp.upper, exact.upper) and torch.equal(tp.unlisted_bound, exact.unlisted_bound)


# ---- overflow, save/load, errors ------------------------------------------------------------------
def test_pair_table_promotes_before_int32_overflow(monkeypatch):
    monkeypatch.setattr(pair_table, "INT32_MAX", 5)
    F = 4
    acts = SparseActs(torch.ones(8, 2), torch.tensor([[0, 1]] * 8))
    s = FeatureStats(F, cooccurrence=True).update(SparseActs(acts.values[:4], acts.indices[:4]))
    assert s.cooccurrence.dtype == torch.int32
    s.update(SparseActs(acts.values[4:], acts.indices[4:]))
    assert s.cooccurrence.dtype == torch.int64 and int(s.cooccurrence[0, 1]) == 8
    merged = FeatureStats(F, cooccurrence=True).update(SparseActs(acts.values[:1], acts.indices[:1])).merge(s)
    assert merged.cooccurrence.dtype == torch.int64 and int(merged.cooccurrence[1, 0]) == 9
    small = FeatureStats(F, cooccurrence=True, memory_budget=4 * F * F)
    with pytest.raises(OverflowError, match="2\\^31 - 1"):
        small.update(acts)
    assert small.n_tokens == 0 and int(small.counts.sum()) == 0  # nothing was added


@pytest.mark.parametrize("kind", ["dense", "subset", "sketch"])
def test_save_load_roundtrip(tmp_path, kind):
    F = 10
    acts, y = random_code(40, 4, F, 9)
    kw = {"dense": {"cooccurrence": True}, "subset": {"cooccurrence_features": [3, 1, 8]},
          "sketch": {"top_partners": 2, "partner_capacity": 3}}[kind]
    s = FeatureStats(F, conditioned_on=D_Y, y_moments=True, second_moment_features=[2],
                     second_moment_weighting="indicator", source="sae-x", **kw)
    s.update(SparseActs(acts.values[:25], acts.indices[:25]), y[:25])
    s.save(tmp_path / "stats.safetensors")
    t = FeatureStats.load(tmp_path / "stats.safetensors")
    assert t.config == s.config and t.n_tokens == s.n_tokens
    for name, v in s.state_dict()["tensors"].items():
        assert torch.equal(t.state_dict()["tensors"][name], v), name
    rest = SparseActs(acts.values[25:], acts.indices[25:])
    s.update(rest, y[25:])
    t.update(rest, y[25:])
    if kind == "sketch":
        assert torch.equal(s.top_partners().upper, t.top_partners().upper)
    else:
        assert torch.equal(s.cooccurrence, t.cooccurrence)
    D = dense(acts, F)
    close(t.cond_second_moment[0], (y * (D[:, 2:3] > 0)).T @ y)
    close(t.y_covariance(), torch.cov(y.T))
    (tmp_path / "other.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a FeatureStats file"):
        FeatureStats.load(tmp_path / "other.safetensors")


def test_bad_input():
    F = 6
    s = FeatureStats(F, conditioned_on=2)
    good = SparseActs(torch.ones(3, 2), torch.tensor([[0, 1], [2, 3], [4, 5]]))
    y = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"outside \[0, d_sae=6\)"):
        s.update(SparseActs(torch.ones(1, 2), torch.tensor([[0, 6]])), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"dense code must be \[..., d_sae=6\]"):
        s.update(torch.zeros(3, 7), y)
    with pytest.raises(TypeError, match="acts must be SparseActs"):
        s.update([1, 2], y)
    with pytest.raises(ValueError, match="y .* is required"):
        s.update(good)
    with pytest.raises(ValueError, match=r"y must be \[..., d_y\] = \(3, 2\)"):
        s.update(good, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="feature firing in two slots"):
        s.update(SparseActs(torch.ones(1, 2), torch.tensor([[4, 4]])), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="no conditioned_on"):
        FeatureStats(F).update(good, y)
    on_cpu = FeatureStats(F, device="cpu")
    with pytest.raises(ValueError, match="acts are on meta but this FeatureStats lives on cpu"):
        meta = torch.zeros(1, 1, dtype=torch.long, device="meta")
        on_cpu.update(SparseActs(torch.ones(1, 1, device="meta"), meta))
    assert s.n_tokens == 0 and int(s.counts.sum()) == 0
    with pytest.raises(ValueError, match=r"needs 2\.25 GiB > memory_budget=1\.00 GiB.*top_partners"):
        FeatureStats(24576, cooccurrence=True, memory_budget=2**30)
    with pytest.raises(ValueError, match="not both"):
        FeatureStats(F, cooccurrence_features=[1], top_partners=2)
    with pytest.raises(ValueError, match="repeated"):
        FeatureStats(F, cooccurrence_features=[1, 1])
    with pytest.raises(ValueError, match="need conditioned_on"):
        FeatureStats(F, y_moments=True)
    with pytest.raises(ValueError, match="cooccurrence=True"):
        _ = FeatureStats(F).cooccurrence
    with pytest.raises(ValueError, match="use top_partners"):
        _ = FeatureStats(F, top_partners=1).cooccurrence
    with pytest.raises(ValueError, match=r"q must lie in \[0, 1\]"):
        FeatureStats(F).quantiles(1.5)
    with pytest.raises(ValueError, match=r"d_sae: 6 vs 7"):
        FeatureStats(F).merge(FeatureStats(7))
    with pytest.raises(ValueError, match=r"source: 'sae-a' vs 'sae-b'"):
        FeatureStats(F, source="sae-a").merge(FeatureStats(F, source="sae-b"))
    with pytest.raises(ValueError, match=r"cooccurrence: 'dense' vs 'none'"):
        FeatureStats(F, cooccurrence=True).merge(FeatureStats(F))


# ---- driver -----------------------------------------------------------------------------------------------
def tiny_sae(d_in=12, d_sae=40, seed=0):
    import sparsekern as sk

    torch.manual_seed(seed)
    sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae


def test_feature_stats_through_a_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=12, n_ctx=8, d_head=4, n_heads=3, d_vocab=30,
                                  act_fn="relu", seed=0)
    model = HookedTransformer(cfg)
    hook, mlp = "blocks.0.hook_resid_post", "blocks.0.mlp.hook_pre"
    sae = tiny_sae()
    sae.cfg.metadata.hook_name = hook
    tokens = torch.randint(0, 30, (6, 8))
    s = feature_stats(sae, tokens.split(4), model=model, conditioned_hook=mlp, progress=False,
                      cooccurrence=True, **HIST)
    _, cache = model.run_with_cache(tokens, names_filter=[hook, mlp])
    with torch.no_grad():
        D = sae.encode(cache[hook]).double().reshape(-1, 40)
    y = cache[mlp].double().reshape(-1, 48)
    Bi = (D > 0).double()
    assert s.n_tokens == 48 and s.config["conditioned_on"] == 48
    assert torch.equal(s.counts, Bi.sum(0).long())
    assert torch.equal(s.cooccurrence.long(), (Bi.T @ Bi).long())
    close(s.act_sum, D.sum(0), 1e-5)
    close(s.cond_act_sum, D.T @ y, 1e-5)
    assert torch.equal(s.cond_pos_count, (Bi.T @ (y > 0).double()).long())

    # the same activations as (x, y) batches, split in two runs and merged
    x, yy = cache[hook], cache[mlp]
    a = feature_stats(sae, [(x[:2], yy[:2])], conditioned_hook=mlp, hook_name=hook, progress=False,
                      cooccurrence=True, **HIST)
    b = feature_stats(sae, [(x[2:], yy[2:])], conditioned_hook=mlp, hook_name=hook, progress=False,
                      cooccurrence=True, **HIST)
    a.merge(b)
    assert torch.equal(a.cooccurrence, s.cooccurrence) and torch.equal(a.cond_pos_count, s.cond_pos_count)
    close(a.cond_act_sum, s.cond_act_sum, 1e-6)
    feature_stats(sae, [(x[:1], yy[:1])], stats=a, conditioned_hook=mlp, hook_name=hook, progress=False)
    assert a.n_tokens == 56
    other = feature_stats(tiny_sae(seed=1), [(x, yy)], conditioned_hook=mlp, hook_name=hook, progress=False,
                          cooccurrence=True, **HIST)
    with pytest.raises(ValueError, match="source"):
        a.merge(other)
    with pytest.raises(ValueError, match="stats comes from source"):
        feature_stats(tiny_sae(seed=1), [], stats=a, conditioned_hook=mlp, hook_name=hook, progress=False)
    with pytest.raises(ValueError, match=r"activations must be \[batch, pos, d_in\]"):
        feature_stats(sae, [torch.randn(5, 12)], progress=False)
