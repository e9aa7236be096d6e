"""sparsekern.features.geometry against dense float64 cosine matrices + stable top-k (ties -> lower index).

Tie-heavy cases use "lattice" weights: rows with 1, 4 or 16 entries of +-1 (times a power of two), so
normalised rows and every cosine are exact in float32 and float64 alike and the comparison with the
dense reference can be exact, tie-breaks included.
"""

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
from sparsekern.bench.timing import measure_peak
from sparsekern.features.geometry import (
    FeatureLogits,
    Neighbours,
    cosine_neighbours,
    decoder_neighbours,
    encoder_decoder_neighbours,
    feature_logits,
)


# ---- references ------------------------------------------------------------------------------------
def unit(W):
    W = W.double()
    n = W.norm(dim=1, keepdim=True)
    return torch.where(n > 0, W / torch.where(n > 0, n, 1), 0)


def stable_topk(key, k):
    """Top k per row by key descending, ties -> lower column (stable sort keeps index order)."""
    return key.sort(dim=1, descending=True, stable=True).indices[:, :k]


def ref_neighbours(Q, K, k, absolute=False, exclude_self=False):
    C = unit(Q) @ unit(K).T
    key = C.abs() if absolute else C.clone()
    if exclude_self:
        key.fill_diagonal_(-float("inf"))
    idx = stable_topk(key, k)
    return C.gather(1, idx), idx


def assert_exact(got, want_v, want_i):
    assert isinstance(got, Neighbours)
    assert got.indices.dtype == torch.int64
    assert torch.equal(got.indices, want_i)
    assert torch.equal(got.values.double(), want_v)


def assert_close_topk(got, Q, K, k, absolute=False, exclude_self=False, tol=1e-5):
    """Rounding-tolerant check (float32 vs the float64 reference): same ranked values, and each
    returned index really has the returned cosine."""
    want_v, _ = ref_neighbours(Q, K, k, absolute, exclude_self)
    C = unit(Q) @ unit(K).T
    key = (lambda t: t.abs()) if absolute else (lambda t: t)
    torch.testing.assert_close(key(got.values.double()), key(want_v), rtol=0, atol=tol)
    torch.testing.assert_close(C.gather(1, got.indices), got.values.double(), rtol=0, atol=tol)
    assert all(len(set(r)) == k for r in got.indices.tolist())
    if exclude_self:
        assert not (got.indices == torch.arange(len(Q)).unsqueeze(1)).any()


def lattice(n, d, *, pool=None, zero_rows=0, seed=0, dtype=torch.float64):
    """Rows with c in {1, 4, 16} entries of +-1 (c <= d), scaled by 2^e: exact cosines, many ties.
    ``pool`` < n draws the rows from that many distinct ones (duplicates and negated duplicates)."""
    g = torch.Generator().manual_seed(seed)
    pool = n if pool is None else pool
    rows = torch.zeros(pool, d, dtype=torch.float64)
    counts = [c for c in (1, 4, 16) if c <= d]
    for r in range(pool):
        c = counts[int(torch.randint(len(counts), (1,), generator=g))]
        cols = torch.randperm(d, generator=g)[:c]
        rows[r, cols] = torch.randint(0, 2, (c,), generator=g).double() * 2 - 1
    W = rows[torch.randint(pool, (n,), generator=g)] if pool < n else rows
    sign = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    W = W * (2.0 ** torch.randint(-3, 4, (n, 1), generator=g)) * sign
    if zero_rows:
        W[torch.randperm(n, generator=g)[:zero_rows]] = 0
    return W.to(dtype)


def gaussian(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---- decoder_neighbours --------------------------------------------------------------------------------
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_decoder_neighbours_gaussian_float64(absolute, chunk_size):
    W = gaussian(300, 24, seed=1)
    got = decoder_neighbours(W, 9, absolute, chunk_size=chunk_size, progress=False)
    v, i = ref_neighbours(W, W, 9, absolute, exclude_self=True)
    assert torch.equal(got.indices, i)
    torch.testing.assert_close(got.values, v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_neighbours_low_precision(absolute, dtype):
    W = gaussian(257, 40, seed=2, dtype=dtype)
    got = decoder_neighbours(W, 12, absolute=absolute, chunk_size=100, progress=False)
    assert got.values.dtype == torch.float32  # half precision is upcast
    assert_close_topk(got, W, W, 12, absolute, exclude_self=True)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_neighbours_ties_duplicates_zero_rows(absolute, dtype):
    """Duplicate and negated rows (exact ties with the row itself), zero rows, many equal cosines."""
    W = lattice(120, 16, pool=25, zero_rows=6, seed=3, dtype=dtype)
    for k in (1, 5, 30):
        got = decoder_neighbours(W, k, absolute=absolute, chunk_size=33, progress=False)
        assert got.values.dtype == dtype
        assert_exact(got, *ref_neighbours(W, W, k, absolute, exclude_self=True))


def test_duplicates_drop_self_by_index():
    """Rows 0..3 identical: each one's neighbours are the other three (cos 1), lowest index first."""
    W = torch.cat([torch.ones(4, 8), gaussian(6, 8, seed=4, dtype=torch.float32)])
    got = decoder_neighbours(W, 3, progress=False)
    assert got.indices[:4].tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    torch.testing.assert_close(got.values[:4], torch.ones(4, 3))


@pytest.mark.parametrize("absolute", [False, True])
def test_k_is_d_sae_minus_one(absolute):
    W = lattice(40, 16, pool=12, zero_rows=2, seed=5)
    got = decoder_neighbours(W, 39, absolute=absolute, chunk_size=16, progress=False)
    assert_exact(got, *ref_neighbours(W, W, 39, absolute, exclude_self=True))
    # every other feature exactly once per row
    assert all(sorted(r) == [j for j in range(40) if j != i] for i, r in enumerate(got.indices.tolist()))


def test_zero_rows_have_cosine_zero():
    W = gaussian(10, 6, seed=6)
    W[3] = 0
    got = decoder_neighbours(W, 9, progress=False)
    assert torch.equal(got.values[3], torch.zeros(9, dtype=torch.float64))
    assert got.indices[3].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # all tie at 0: index order
    for r in range(10):
        if r != 3:
            pos = (got.indices[r] == 3).nonzero()
            assert got.values[r, pos].item() == 0.0


def test_absolute_finds_antiparallel():
    W = gaussian(50, 16, seed=7)
    W[20] = -3 * W[10]
    plain = decoder_neighbours(W, 1, progress=False)
    absv = decoder_neighbours(W, 1, absolute=True, progress=False)
    assert absv.indices[10, 0] == 20 and absv.indices[20, 0] == 10
    torch.testing.assert_close(absv.values[10, 0], torch.tensor(-1.0, dtype=torch.float64))
    assert plain.indices[10, 0] != 20


@given(
    n=st.integers(2, 40), d=st.integers(1, 20), pool_frac=st.floats(0.05, 1.0), zero=st.integers(0, 3),
    k_frac=st.floats(0, 1), absolute=st.booleans(), chunk=st.integers(1, 45),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
)
def test_fuzz_lattice_exact(n, d, pool_frac, zero, k_frac, absolute, chunk, dtype, seed):
    W = lattice(n, d, pool=max(1, int(pool_frac * n)), zero_rows=min(zero, n), seed=seed, dtype=dtype)
    k = 1 + int(k_frac * (n - 2))
    got = decoder_neighbours(W, k, absolute=absolute, chunk_size=chunk, progress=False)
    assert_exact(got, *ref_neighbours(W, W, k, absolute, exclude_self=True))


@given(n=st.integers(2, 60), m=st.integers(1, 60), d=st.integers(1, 24), k_frac=st.floats(0, 1),
       absolute=st.booleans(), chunk=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_fuzz_gaussian_cosine_neighbours(n, m, d, k_frac, absolute, chunk, seed):
    Q, K = gaussian(n, d, seed=seed), gaussian(m, d, seed=seed + 1)
    k = 1 + int(k_frac * (m - 1))
    got = cosine_neighbours(Q, K, k, absolute=absolute, chunk_size=chunk, progress=False)
    v, i = ref_neighbours(Q, K, k, absolute)
    assert torch.equal(got.indices, i)
    torch.testing.assert_close(got.values, v, rtol=0, atol=1e-12)


def test_memory_never_builds_the_square_matrix():
    n, d, k = 12000, 8, 4
    W = gaussian(n, d, seed=8, dtype=torch.float32)
    square_mib = n * n * 4 / 2**20  # 549 MiB
    decoder_neighbours(W[:3000], k, absolute=True, progress=False)  # one-time thread pool / BLAS setup
    got, peak = measure_peak(lambda: decoder_neighbours(W, k, absolute=True, progress=False),
                             torch.device("cpu"))
    assert got.values.shape == (n, k)
    rows = torch.arange(0, n, 997)
    C = unit(W[rows]) @ unit(W).T
    key = C.abs()
    key[torch.arange(len(rows)), rows] = -1  # the feature itself
    want = key.sort(dim=1, descending=True, stable=True).values[:, :k]
    torch.testing.assert_close(got.values[rows].double().abs(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(C.gather(1, got.indices[rows]), got.values[rows].double(), rtol=0, atol=1e-5)
    if peak is not None:
        assert peak < 0.1 * square_mib, peak


# ---- encoder_decoder_neighbours ------------------------------------------------------------------
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_encoder_decoder_neighbours(absolute, exclude_self):
    W_enc = lattice(64, 16, pool=20, zero_rows=2, seed=9).T.contiguous()  # [d_in, d_sae]
    W_dec = lattice(64, 16, pool=20, zero_rows=2, seed=10)  # [d_sae, d_in]
    W_dec[5] = 2 * W_enc[:, 5]  # a feature whose decoder is its encoder
    for k in (1, 7, 63):
        got = encoder_decoder_neighbours(W_enc, W_dec, k, absolute, exclude_self=exclude_self,
                                         chunk_size=10, progress=False)
        assert_exact(got, *ref_neighbours(W_enc.T, W_dec, k, absolute, exclude_self))
    if not exclude_self:
        assert got.indices[5, 0] == 5 and got.values[5, 0] == 1.0


def test_encoder_decoder_neighbours_gaussian_and_reverse():
    W_enc, W_dec = gaussian(20, 90, seed=11), gaussian(90, 20, seed=12)
    got = encoder_decoder_neighbours(W_enc, W_dec, 5, progress=False)
    v, i = ref_neighbours(W_enc.T, W_dec, 5)
    assert torch.equal(got.indices, i)
    torch.testing.assert_close(got.values, v, rtol=0, atol=1e-12)
    own = torch.nn.functional.cosine_similarity(W_enc.T, W_dec)  # SAELens's encoder_decoder_cosine_sim
    full = encoder_decoder_neighbours(W_enc, W_dec, 90, progress=False)
    # float64 on both sides, d = 20: each is within (ceil(log2 d) + 4) eps64 ~ 2e-15 of the exact cosine
    # (a dot and two norms over d, a division); assert_close's float64 default (rtol 1e-7) is far above
    torch.testing.assert_close(full.values[full.indices == torch.arange(90)[:, None]], own)
    rev = cosine_neighbours(W_dec, W_enc.T, 5, progress=False)  # decoder -> encoders
    v, i = ref_neighbours(W_dec, W_enc.T, 5)
    assert torch.equal(rev.indices, i)


# ---- feature_logits ----------------------------------------------------------------------------------
D_MODEL, VOCAB = 32, 50


@pytest.fixture(scope="module")
def model():
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=8, n_heads=4, d_mlp=64,
                                  d_vocab=VOCAB, act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval()


def make_sae(d_sae=70, hook="blocks.1.hook_resid_post", d_in=D_MODEL, **cfg):
    c = sk.StandardSAEConfig(d_in=d_in, d_sae=d_sae, **cfg)
    c.metadata.hook_name = hook
    return sk.StandardSAE(c)


def ref_logits(W_dec, W_U, k):
    L = W_dec.double() @ W_U.double()
    top = stable_topk(L, k)
    bot = stable_topk(-L, k)
    return L.gather(1, top), top, L.gather(1, bot), bot


@torch.no_grad()
def test_feature_logits_exact_with_ties(model):
    """Small-integer weights: every logit is exact in float32, so ties (lots) compare exactly."""
    g = torch.Generator().manual_seed(13)
    sae = make_sae()
    sae.W_dec.copy_(torch.randint(-2, 3, sae.W_dec.shape, generator=g).float())
    model.W_U.copy_(torch.randint(-2, 3, model.W_U.shape, generator=g).float())
    for k in (1, 6, VOCAB):
        got = feature_logits(sae, model, k, chunk_size=16, progress=False)
        assert isinstance(got, FeatureLogits)
        pv, pt, sv, stt = ref_logits(sae.W_dec, model.W_U, k)
        assert torch.equal(got.promoted_tokens, pt) and torch.equal(got.suppressed_tokens, stt)
        assert torch.equal(got.promoted_values.double(), pv)
        assert torch.equal(got.suppressed_values.double(), sv)
        assert got.promoted_values.shape == (70, k)


@torch.no_grad()
def test_feature_logits_gaussian_transcoder(model):
    """A transcoder writing to hook_mlp_out: W_dec [d_sae, d_out = d_model]."""
    c = sk.TranscoderConfig(d_in=D_MODEL, d_sae=40, d_out=D_MODEL)
    c.metadata.hook_name, c.metadata.hook_name_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = sk.Transcoder(c)
    tc.W_dec.copy_(gaussian(40, D_MODEL, seed=14, dtype=torch.float32))
    got = feature_logits(tc, model, 5, progress=False)
    pv, _, sv, _ = ref_logits(tc.W_dec, model.W_U, 5)
    torch.testing.assert_close(got.promoted_values.double(), pv, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.suppressed_values.double(), sv, rtol=0, atol=1e-5)
    L = tc.W_dec.double() @ model.W_U.double()
    torch.testing.assert_close(L.gather(1, got.promoted_tokens), pv, rtol=0, atol=1e-5)
    torch.testing.assert_close(L.gather(1, got.suppressed_tokens), sv, rtol=0, atol=1e-5)


def test_feature_logits_token_strings(model):
    got = feature_logits(make_sae(), model, 3, progress=False)
    fake = types.SimpleNamespace(to_str_tokens=lambda ids: [f"<{int(i)}>" for i in ids])
    up, down = got.token_strings(fake, 4)
    assert up == [f"<{i}>" for i in got.promoted_tokens[4].tolist()]
    assert down == [f"<{i}>" for i in got.suppressed_tokens[4].tolist()]
    with pytest.raises(ValueError, match="feature"):
        got.token_strings(fake, 70)


def test_feature_logits_bad_input(model):
    with pytest.raises(ValueError, match="d_model"):
        feature_logits(make_sae(hook="blocks.0.mlp.hook_post", d_in=64), model, 3, progress=False)
    z = make_sae(hook="blocks.0.attn.hook_z", reshape_activations="hook_z")  # d_in 32 = 4 heads x 8
    with pytest.raises(ValueError, match="hook_z"):
        feature_logits(z, model, 3, progress=False)
    with pytest.raises(ValueError, match="k must satisfy"):
        feature_logits(make_sae(), model, VOCAB + 1, progress=False)
    with pytest.raises(TypeError, match="sae.W_dec must be a torch.Tensor"):
        feature_logits(object(), model, 3, progress=False)


# ---- errors ----------------------------------------------------------------------------------------
def test_bad_input():
    W = gaussian(10, 4)
    with pytest.raises(TypeError, match="W_dec must be a torch.Tensor"):
        decoder_neighbours(W.numpy(), 3)
    with pytest.raises(ValueError, match=r"W_dec must be 2-D \[d_sae, d_out\]"):
        decoder_neighbours(W[0], 3)
    with pytest.raises(TypeError, match="float32/float64"):
        decoder_neighbours(W.long(), 3)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 9"):
        decoder_neighbours(W, 10)
    with pytest.raises(ValueError, match="k must satisfy"):
        decoder_neighbours(W, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        decoder_neighbours(W, True)
    with pytest.raises(ValueError, match="at least 2"):
        decoder_neighbours(W[:1], 1)
    with pytest.raises(ValueError, match="non-empty"):
        decoder_neighbours(W[:, :0], 1)
    bad = W.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        decoder_neighbours(bad, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        decoder_neighbours(W, 3, chunk_size=0)
    with pytest.raises(ValueError, match=r"W_enc must be \[d_in, d_sae\]"):
        encoder_decoder_neighbours(W, W, 3)  # W_enc [10, 4] with W_dec [10, 4]
    with pytest.raises(ValueError, match="must share d"):
        cosine_neighbours(W, gaussian(10, 5), 3)
    with pytest.raises(ValueError, match="exclude_self needs"):
        cosine_neighbours(W, gaussian(11, 4), 3, exclude_self=True)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 11"):
        cosine_neighbours(W, gaussian(11, 4), 12)


def test_decoder_neighbours_takes_the_symmetric_kernel_on_cpu(monkeypatch):
    """decoder_neighbours uses gram_topk (half the GEMM work) and agrees with the row-by-row path."""
    import sparsekern.features.geometry as geo

    calls = []
    real = geo.gram_topk
    monkeypatch.setattr(geo, "gram_topk", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    W = gaussian(200, 16, seed=9)
    sym = decoder_neighbours(W, 6, absolute=True, chunk_size=30, progress=False)
    assert len(calls) == 1 and calls[0]["block"] == 30
    rowwise = cosine_neighbours(W, W.clone(), 6, absolute=True, exclude_self=True, progress=False)
    assert len(calls) == 1  # distinct tensors: not the symmetric path
    assert torch.equal(sym.indices, rowwise.indices)
    torch.testing.assert_close(sym.values, rowwise.values, rtol=0, atol=1e-12)
