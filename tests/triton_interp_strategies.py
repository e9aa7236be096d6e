"""The "blocks" and "fused" encoder strategies under TRITON_INTERPRET=1, pinned to float64 oracles.

Run by ``tests/test_triton.py`` in a child process (see ``triton_interp_cases.py`` for why). By hand:
``TRITON_INTERPRET=1 python -m pytest tests/triton_interp_strategies.py -q -p no:cacheprovider``.
Small blocks (``block_cols``) and budgets force many column blocks, select chunks, buffer
tightenings and row chunks at shapes the interpreter runs in well under a second.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern import ops  # noqa: E402
from sparsekern.triton import CALLS  # noqa: E402
from sparsekern.triton import encode as E  # noqa: E402

from _bounds import (U, assert_threshold_decided, assert_topk_decided, encoder_err, rel,  # noqa: E402
                     rounded, topk_decided)
from _cases import dyadic_encoder_problem, encoder_problem  # noqa: E402
from conftest import rel_err  # noqa: E402

# Tolerances are the worst-case rounding bounds of tests/_bounds.py (any summation order); exact index and
# support comparisons run on data asserted to be decided by them (or exact by construction: integer and
# dyadic problems).

STRATS = ["blocks", "fused"]
LOW = (torch.bfloat16, torch.float16)


def pre64(x, W, b, bd=None):
    x = x.double() - bd.double() if bd is not None else x.double()
    return x @ W.double() + b.double()


def topk64(pre, k):
    """Independent oracle: stable descending sort (ties -> lower index, NaN first)."""
    v, i = torch.sort(pre, dim=-1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def decided(x, W, b, bd, k):
    """The rounding bound of every pre-activation, after asserting the data's top-k is decided by it."""
    err = encoder_err(x, W, b, bd)
    assert_topk_decided(pre64(x, W, b, bd), err, k)
    return err


def integer_problem(n, d_in, d_sae, seed=0):
    """Values in a few integers: most pre-activations tie with many others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (n, d_in), generator=g).float()
    W = torch.randint(-1, 2, (d_in, d_sae), generator=g).float()
    b = torch.randint(0, 2, (d_sae,), generator=g).float()
    return x, W, b


# ---- topk_encode ---------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("b_dec", [True, False])
@pytest.mark.parametrize("block_cols", [None, 33])
def test_topk_matches_float64_oracle(strategy, dtype, b_dec, block_cols):
    x, W, b, bd = encoder_problem(13, 20, 150, dtype, b_dec=b_dec)
    err = decided(x, W, b, bd, 7)
    v, i = E.topk_encode(x, W, b, bd, 7, False, strategy=strategy, block_cols=block_cols)
    ev, ei = topk64(pre64(x, W, b, bd), 7)
    floor = rel(err.gather(1, ei), ev)  # fp32 accumulation, gamma(22) * sum |terms|: ~3e-6 here
    assert v.dtype == dtype and i.dtype == torch.int64
    assert torch.equal(i, ei)  # decided data: the float64 oracle's indices, also in 16-bit
    got = rel_err(v, ev)
    assert got <= rounded(dtype, floor)  # one rounding of an fp32-accurate value (fp32: floor + u)
    if dtype != torch.float32:  # within twice the error of the fp32-accumulating reference + 2 floor
        # (derivation: tests/test_topk_encode.py::test_low_precision_within_twice_reference_error)
        rv, _ = sk.ref.topk_encode(x, W, b, bd, 7, False)
        assert got <= 2 * rel_err(rv, ev) + 2 * floor


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("k", [1, 16, 17, 150])
def test_topk_every_k_up_to_d_sae(strategy, k):
    # seed 1: the first whose whole order (k = 150) is decided by the fp32 bound
    x, W, b, bd = encoder_problem(9, 12, 150, torch.float32, seed=1)
    err = decided(x, W, b, bd, k)
    v, i = E.topk_encode(x, W, b, bd, k, True, strategy=strategy, block_cols=40)
    ev, ei = topk64(pre64(x, W, b, bd), k)
    expected = ev.clamp_min(0)
    assert torch.equal(i, ei) and rel_err(v, expected) <= rel(err.gather(1, ei), expected)  # gamma(14)


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("block_cols", [None, 20])
def test_topk_ties_go_to_the_lower_index(strategy, block_cols):
    x, W, b = integer_problem(24, 6, 130)
    v, i = E.topk_encode(x, W, b, None, 9, False, strategy=strategy, block_cols=block_cols)
    ev, ei = topk64(pre64(x, W, b), 9)
    assert torch.equal(i, ei) and torch.equal(v.double(), ev)
    zeros = torch.zeros(3, 6)  # every pre-activation equal: the first k features
    v, i = E.topk_encode(zeros, W, torch.zeros(130), None, 5, True, strategy=strategy, block_cols=block_cols)
    assert torch.equal(i, torch.arange(5).expand(3, 5)) and not v.any()


@pytest.mark.parametrize("strategy", STRATS)
def test_topk_nan_inf_and_signed_zeros_rank_as_torch_sort(strategy):
    x, W, b, _ = encoder_problem(6, 8, 100, torch.float32, b_dec=False)
    x[1, 2] = float("nan")  # row 1: every pre-activation is NaN -> the first k features
    W[:, 70] = float("nan")  # feature 70 is NaN in every row: ranks above +inf
    b[[5, 50]] = float("inf")
    b[60:] = float("-inf")  # -inf features (rank by index among themselves)
    x[2] = 0.0  # row 2: +-0.0 products; torch.sort ranks -0.0 == +0.0
    # rows 0, 3, 4, 5: NaN (70), +inf (5, 50), then 3 finite features, decided by the fp32 bound (row 2
    # is exact: 0 * W + b)
    finite = [f for f in range(60) if f not in (5, 50)]
    rows = [0, 3, 4, 5]
    assert_topk_decided(pre64(x[rows], W[:, finite], b[finite]),
                        encoder_err(x[rows], W[:, finite], b[finite], None), 3)
    v, i = E.topk_encode(x, W, b, None, 6, False, strategy=strategy, block_cols=30)
    pre = pre64(x, W, b)
    _, ei = topk64(pre, 6)
    assert torch.equal(i, ei)
    assert torch.equal(i[1], torch.arange(6)) and bool(v[1].isnan().all())
    assert int(i[0, 0]) == 70 and bool(v[0, 0].isnan()) and set(i[0, 1:3].tolist()) == {5, 50}
    v, i = E.topk_encode(x[:3], W[:, 60:], b[60:], None, 4, False, strategy=strategy)  # all -inf but NaN
    _, ei = topk64(pre64(x[:3], W[:, 60:], b[60:]), 4)
    assert torch.equal(i, ei)


@pytest.mark.parametrize("strategy", STRATS)
def test_rising_pre_activations_exercise_tightening_and_overflow(strategy):
    # pre-activations rising with the feature index: every key of every later block beats the
    # K-th seen so far. "blocks" tightens its buffers mid-block again and again; the fused
    # epilogue's buffers overflow and those rows are recomputed exactly.
    x, W, _, _ = encoder_problem(5, 4, 400, torch.float32, b_dec=False)
    b = torch.arange(400, dtype=torch.float32)
    before = CALLS["topk_encode_overflow_rows"]
    v, i = E.topk_encode(x * 1e-3, W, b, None, 3, False, strategy=strategy, block_cols=32)
    assert CALLS["topk_encode_overflow_rows"] - before == (5 if strategy == "fused" else 0)
    ev, ei = topk64(pre64(x * 1e-3, W, b), 3)
    # the top 3 are features 399, 398, 397 (gaps ~1); fp32 bound gamma(6) * sum |terms| ~ 3.6e-7 relative
    err = encoder_err(x * 1e-3, W, b, None)
    assert torch.equal(i, ei) and rel_err(v, ev) <= rel(err.gather(1, ei), ev)


@pytest.mark.parametrize("first", [True, False])
def test_select_kernel_state_after_one_block(first):
    """After a block the buffer holds exactly the K best keys and kth is the K-th of them; the
    first block's group-maximum bound must leave room (no keys lost) whatever the data."""
    from sparsekern.triton._select import NONE_KEY, topk_select_kernel

    g = torch.Generator().manual_seed(3)
    R, NC, K, BC = 6, 300, 5, 32
    pre = torch.randn(R, NC, generator=g)
    pre[0] = torch.arange(NC, dtype=torch.float32)  # rising: the bound is loose for nothing
    pre[1] = 1.0  # all tied: keys still unique (lower feature first)
    bias = torch.randn(NC, generator=g)
    cand = torch.empty(R, 2 * BC, dtype=torch.int64)
    cnt = torch.zeros(R, dtype=torch.int32)
    kth = torch.full((R,), NONE_KEY, dtype=torch.int64)
    col0 = 1000
    topk_select_kernel[(1,)](pre, bias, cand, cnt, kth, R, NC, col0, FIRST=first, K=K, C=2 * BC, BR=8, BC=BC)
    full = pre.double() + bias.double()
    # keys are fp32 pre + bias: one rounding, u |pre + bias|; the K+1 best are decided by it
    assert_topk_decided(full, U[torch.float32] * full.abs(), K)
    _, ei = topk64(full, K)
    assert torch.equal(cnt, torch.full((R,), K, dtype=torch.int32))
    v, i = E.decode_keys(torch.sort(cand[:, :K], dim=1, descending=True).values)
    assert torch.equal(i, ei + col0)
    assert torch.equal(kth, torch.sort(cand[:, :K], dim=1).values[:, 0])  # the K-th best key


@pytest.mark.parametrize("strategy", STRATS)
def test_row_chunks_under_a_small_memory_budget(strategy, monkeypatch):
    monkeypatch.setenv(E.ENV_BUDGET, "0.01")  # 10 KiB: blocks of one chunk width, rows in chunks
    x, W, b, bd = encoder_problem(50, 8, 90, torch.float32)
    plan = E._plan(x, 90, 32, 64 * 8, None)
    assert plan.rows < 50 and plan.cols == 32
    err = decided(x, W, b, bd, 5)
    v, i = E.topk_encode(x, W, b, bd, 5, False, strategy=strategy)
    ev, ei = topk64(pre64(x, W, b, bd), 5)
    assert torch.equal(i, ei) and rel_err(v, ev) <= rel(err.gather(1, ei), ev)  # fp32, gamma(10)
    out = E.threshold_encode(x, W, b, torch.full((90,), 0.2), bd, strategy=strategy)
    check_threshold(*out, pre64(x, W, b, bd), 0.2, err, torch.float32)


@pytest.mark.parametrize("strategy", STRATS)
def test_results_are_deterministic(strategy):
    x, W, b, bd = encoder_problem(17, 10, 200, torch.bfloat16)
    a = E.topk_encode(x, W, b, bd, 8, True, strategy=strategy, block_cols=50)
    c = E.topk_encode(x, W, b, bd, 8, True, strategy=strategy, block_cols=50)
    assert all(torch.equal(p, q) for p, q in zip(a, c))


@settings(max_examples=25)
@given(n=st.integers(0, 9), d_in=st.integers(1, 7), d_sae=st.integers(1, 90), k=st.integers(1, 12),
       block=st.sampled_from([None, 1, 7, 32]), ties=st.booleans(), strategy=st.sampled_from(STRATS),
       seed=st.integers(0, 2**16))
def test_topk_fuzz(n, d_in, d_sae, k, block, ties, strategy, seed):
    k = min(k, d_sae)
    if ties:
        x, W, b = integer_problem(n, d_in, d_sae, seed)
        bd = None
    else:
        x, W, b, bd = encoder_problem(n, d_in, d_sae, torch.float32, seed=seed)
    err = encoder_err(x, W, b, bd)
    # integers are exact in fp32; continuous data whose top-k is not decided by the fp32 bound (a gap
    # within ~1e-6 of another) could not be compared exactly, so that example is skipped
    assume(ties or topk_decided(pre64(x, W, b, bd), err, k))
    v, i = E.topk_encode(x, W, b, bd, k, False, strategy=strategy, block_cols=block)
    ev, ei = topk64(pre64(x, W, b, bd), k)
    assert i.shape == (n, k) and torch.equal(i, ei)
    assert rel_err(v, ev) <= rel(err.gather(1, ei), ev)  # 0 for integers, gamma(d_in + 2) otherwise


# ---- threshold_encode ----------------------------------------------------------------------
def check_threshold(values, indices, l0, pre, thr, err, dtype):
    """Exact support and counts (no pre-activation within its rounding bound ``err`` of the threshold:
    asserted; ``err=None``: exact arithmetic, where a pre-activation equal to the threshold must not
    fire), ascending features, 0/0 padding, values within one rounding to ``dtype`` of an fp32-accurate
    value (tests/_bounds.py) of the float64 pre-activations."""
    if err is None:
        err = torch.zeros_like(pre)
    else:
        assert_threshold_decided(pre, thr, err, dtype)
    fire = pre > torch.as_tensor(thr, dtype=torch.float64)
    assert torch.equal(l0, fire.sum(1))
    assert values.shape[1] == (int(l0.max()) if l0.numel() else 0)
    for r in range(values.shape[0]):
        n = int(l0[r])
        assert torch.equal(indices[r, :n], fire[r].nonzero().squeeze(1))
        assert not values[r, n:].any() and not indices[r, n:].any()
    if values.numel():
        live = torch.arange(values.shape[1]) < l0[:, None]
        exp = pre.gather(1, indices) * live
        assert rel_err(values, exp) <= rounded(dtype, rel(err.gather(1, indices) * live, exp))


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_feature", [True, False])
@pytest.mark.parametrize("capacity", [None, 3])  # 3: most rows overflow and are redone exactly
def test_threshold_matches_float64_oracle(strategy, dtype, per_feature, capacity):
    x, W, b, bd = encoder_problem(14, 20, 150, dtype)
    g = torch.Generator().manual_seed(1)
    thr = torch.rand(150, generator=g) * 0.8 if per_feature else torch.full((150,), 0.5)
    v, i, l0 = E.threshold_encode(x, W, b, thr, bd, strategy=strategy, block_cols=40, capacity=capacity)
    assert v.dtype == dtype and i.dtype == torch.int64 and l0.dtype == torch.int64
    check_threshold(v, i, l0, pre64(x, W, b, bd), thr.double(), encoder_err(x, W, b, bd), dtype)


@pytest.mark.parametrize("strategy", STRATS)
def test_threshold_nan_never_fires_and_empty_results(strategy):
    x, W, b, _ = encoder_problem(5, 6, 70, torch.float32, b_dec=False)
    x[2, 0] = float("nan")
    thr = torch.full((70,), 0.1)
    out = E.threshold_encode(x, W, b, thr, None, strategy=strategy)
    err = encoder_err(x, W, b, None).nan_to_num(0.0)  # the NaN row is -1 below: far from 0.1
    check_threshold(*out, pre64(x, W, b).nan_to_num(-1.0), 0.1, err, torch.float32)
    assert int(out[2][2]) == 0
    v, i, l0 = E.threshold_encode(x, W, b, torch.full((70,), 1e6), None, strategy=strategy)
    assert v.shape == (5, 0) and not l0.any()


# ---- strategy choice -----------------------------------------------------------------------
def test_public_ops_follow_the_strategy_env_var(monkeypatch):
    x, W, b, bd = encoder_problem(6, 8, 40, torch.float32)
    decided(x, W, b, bd, 4)
    for name in ("blocks", "fused", "tiles"):
        monkeypatch.setenv(E.ENV_STRATEGY, name)
        before = CALLS[f"topk_encode[{name}]"], CALLS[f"threshold_encode[{name}]"]
        with sk.use_backend("triton"):
            acts = ops.topk_encode(x, W, b, 4, b_dec=bd)
            ops.threshold_encode(x, W, b, 0.1, b_dec=bd)
        after = CALLS[f"topk_encode[{name}]"], CALLS[f"threshold_encode[{name}]"]
        assert after == (before[0] + 1, before[1] + 1)
        assert torch.equal(acts.indices, topk64(pre64(x, W, b, bd), 4)[1])
    monkeypatch.setenv(E.ENV_STRATEGY, "fastest")
    with pytest.raises(ValueError, match="SPARSEKERN_ENCODE_STRATEGY"):
        E.topk_encode(x, W, b, bd, 4, True)


def test_strategy_precedence_and_float64(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(E.ENV_STRATEGY, raising=False)
    assert E.strategy_for(x, "topk_encode") == E.DEFAULT_STRATEGY  # nothing measured for CPU
    monkeypatch.setattr(E, "_measured", lambda *a: "fused")
    assert E.strategy_for(x, "topk_encode") == "fused"
    monkeypatch.setenv(E.ENV_STRATEGY, "blocks")
    assert E.strategy_for(x, "topk_encode") == "blocks"
    assert E.strategy_for(x, "topk_encode", "tiles") == "tiles"
    assert E.strategy_for(x.double(), "topk_encode", "fused") == "tiles"  # keys are fp32-based


def test_measured_strategy_table_is_valid():
    table = E._measured_table()
    assert isinstance(table, dict)
    for gpu, dtypes in table.items():
        for dtype, ops_ in dtypes.items():
            assert dtype in ("float32", "bfloat16", "float16"), (gpu, dtype)
            assert set(ops_) <= {"topk_encode", "threshold_encode"}
            assert set(ops_.values()) <= set(E.STRATEGIES)


def test_bad_budget_env_is_a_clear_error(monkeypatch):
    for raw in ("lots", "-5", "0"):
        monkeypatch.setenv(E.ENV_BUDGET, raw)
        with pytest.raises(ValueError, match=E.ENV_BUDGET):
            E.budget_bytes()


def test_memory_plan_stays_in_budget_and_never_builds_n_by_d_sae():
    """The fp32 block and the top-k buffers of one call stay within the budget at issue 10's shapes;
    the first block (read twice by top-k) is about an eighth of the features."""
    budget = E.budget_bytes()
    for n, d_sae, k in ((2048, 24576, 32), (16384, 24576, 32), (4096, 65536, 64), (4096, 2**20, 64)):
        x = torch.empty(n, 1)
        bc = max(E._min_bc(x), E.next_pow2(2 * k))
        plan = E._plan(x, d_sae, bc, 2 * bc * 8, None)
        block = 4 * plan.rows * plan.cols
        buffers = plan.rows * 2 * bc * 8
        assert block + buffers <= budget and plan.cols < d_sae or n * d_sae * 4 <= budget // 2
        assert plan.first <= plan.cols and plan.first >= min(plan.cols, d_sae // 8 - bc)


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_launch_configs_under_the_interpreter(strategy, dtype, monkeypatch):
    """The CUDA tile/program shapes (select 8 x 256 lanes, GEMM 128 x 64 x 64 for 16-bit, first block
    an eighth of the features), run by the interpreter: catches shape bugs that only those sizes hit."""
    monkeypatch.setattr(E, "_on_gpu", lambda x: True)
    monkeypatch.setattr(E, "_gemm_config", lambda x, real=E._gemm_config: {
        **real(type("T", (), {"device": torch.device("cuda"), "dtype": x.dtype})()), "num_stages": None})
    # dyadic inputs: every pre-activation is exact in fp32 (tests/_cases.py), so the top 40 of 2100 and
    # the support are exact on any machine (continuous data at this size has gaps of ~1e-5 inside the
    # fp32 bound), ties included
    x, W, b, bd = dyadic_encoder_problem(20, 70, 2100, dtype)
    v, i = E.topk_encode(x, W, b, bd, 40, False, strategy=strategy)
    ev, ei = topk64(pre64(x, W, b, bd), 40)
    assert torch.equal(i, ei)
    thr = torch.full((2100,), 1.5)
    out = E.threshold_encode(x, W, b, thr, bd, strategy=strategy)
    check_threshold(*out, pre64(x, W, b, bd), 1.5, None, dtype)  # some pre-activations equal 1.5 exactly
