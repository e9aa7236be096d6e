"""LazyLogits (logits unembedded only where the metric reads them) behaves as the plain logits tensor,
and the patching engine stays exact for metrics that read other positions, change what they read, or
need every position."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsekern.patching._lazy_logits import LazyLogits, ReadLog

B, T, V, D, S = 3, 7, 11, 5, 3


def _make(seed=0, start=S):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, V, generator=g)
    corr = torch.randn(B, T, V, generator=g)
    resid = torch.randn(B, T - start, D, generator=g)
    full = torch.cat([corr[:, :start], resid @ W], 1)
    log = ReadLog()
    return LazyLogits(corr, start, resid, {}, lambda x: x @ W, log), full, log


_pos = st.one_of(
    st.integers(-T, T - 1),
    st.builds(slice, st.none() | st.integers(-T, T), st.none() | st.integers(-T, T), st.sampled_from([None, 1, 2, -1])),
)
_batch = st.one_of(
    st.just(slice(None)),
    st.integers(-B, B - 1),
    st.lists(st.integers(0, B - 1), min_size=1, max_size=4).map(torch.tensor),
)
_vocab = st.one_of(
    st.just(()),
    st.integers(-V, V - 1).map(lambda v: (v,)),
    st.lists(st.integers(0, V - 1), min_size=1, max_size=3).map(lambda v: (torch.tensor(v),)),
    st.just((slice(2, 9),)),
)


@given(b=_batch, p=_pos, v=_vocab)
def test_position_indexing_matches_the_plain_tensor(b, p, v):
    lazy, full, log = _make()
    index = (b, p, *v)
    try:
        want = full[index]
    except (IndexError, ValueError) as e:  # mismatched advanced-index lengths, negative slice steps
        with pytest.raises(type(e)):
            lazy[index]
        return
    got = lazy[index]
    assert type(got) is torch.Tensor and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    ps = range(T)[p] if isinstance(p, slice) else [p % T]
    assert log.read == set(ps)
    assert log.missed == {q for q in ps if q >= S}  # computed on demand: nothing was precomputed
    assert log.materialized == 0  # an empty position slice needs no logits either


def test_only_the_read_positions_are_unembedded():
    calls = []
    lazy, full, log = _make()
    f = lazy._unembed_fn
    lazy._unembed_fn = lambda x: calls.append(x.shape[1]) or f(x)
    torch.testing.assert_close(lazy[:, -1, 4], full[:, -1, 4])
    torch.testing.assert_close(lazy[:, 1], full[:, 1])  # before start: the corrupted run's logits
    torch.testing.assert_close(lazy[:, -1], full[:, -1])  # already known: no new unembedding
    assert calls == [1] and log.materialized == 0


def test_any_other_operation_sees_the_full_logits():
    lazy, full, log = _make()
    assert lazy.shape == (B, T, V) and lazy.dtype == full.dtype and len(lazy) == B and lazy.dim() == 3
    assert log.materialized == 0  # metadata needs no values
    torch.testing.assert_close(lazy.log_softmax(-1), full.log_softmax(-1))
    torch.testing.assert_close(torch.nn.functional.softmax(lazy, dim=-1), full.softmax(-1))
    torch.testing.assert_close(lazy[..., 5], full[..., 5])
    torch.testing.assert_close(lazy[:, torch.tensor([0, 6])], full[:, torch.tensor([0, 6])])
    assert torch.equal(lazy.argmax(-1), full.argmax(-1))
    assert log.materialized == 1  # computed once, reused
    lazy, full, _ = _make()
    lazy[:, -1, 0] = 100.0  # writes are kept: later reads see them
    assert float(lazy[:, -1, 0].min()) == 100.0 and float(lazy.max()) >= 100.0
    with pytest.raises(IndexError):
        _make()[0][:, T]


# ---------------------------------------------------------------- through the patching engine
tl = pytest.importorskip("transformer_lens")
import transformer_lens.patching as tlp  # noqa: E402

import sparsekern.patching as skp  # noqa: E402
from test_patching import Setup, close  # noqa: E402


@pytest.fixture(scope="module")
def s():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Setup("gpt2")
    torch.set_num_threads(n)


def _tl(s, metric, fn="get_act_patch_resid_pre"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(tlp, fn)(s.model, s.corr, s.cache, metric)


def test_metrics_reading_changing_positions_match_transformer_lens(s):
    def wandering(logits):  # the position read depends on the logits: misses, computed on demand
        p = int(logits[0, -1, : logits.shape[1]].argmax())
        return logits[:, p, 3].mean() - logits[0, -1, 5]

    probe = lambda lg: lg[0, -1, 3]  # noqa: E731
    vals = _tl(s, probe).flatten()
    with torch.no_grad():
        corrupted = float(probe(s.model(s.corr)))
    thr = max(corrupted + 1e-4, float(vals.median()))
    assert corrupted < thr < float(vals.max())

    def late_full(logits):  # last position on the corrupted run, all positions for some patches (re-plan)
        if logits[0, -1, 3] > thr:
            return logits.log_softmax(-1)[..., 3].mean()
        return logits[:, -1, 3].mean()

    for metric in (wandering, late_full):
        ours = skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, metric, progress=False, max_batch=3)
        close(ours, _tl(s, metric))


@pytest.fixture
def logit_rows(monkeypatch):
    """Token rows the engine unembedded in the last sweep."""
    from sparsekern.patching import _engine

    rows = {}
    orig = _engine.Engine._metric_values

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        rows["n"] = self.logit_rows
        return out

    monkeypatch.setattr(_engine.Engine, "_metric_values", spy)
    return rows


def test_lazy_and_full_logits_agree_and_lazy_unembeds_less(s, logit_rows, monkeypatch):
    metric = lambda lg: (lg[:, -1, 3] - lg[:, -1, 7]).mean()  # noqa: E731
    lazy = skp.get_act_patch_attn_head_out_by_pos(s.model, s.corr, s.cache, metric, progress=False)
    n_lazy = logit_rows["n"]
    monkeypatch.setenv("SPARSEKERN_PATCH_LAZY", "0")
    full = skp.get_act_patch_attn_head_out_by_pos(s.model, s.corr, s.cache, metric, progress=False)
    close(lazy, full, 1e-6)  # ours against ours: one unembedding GEMM per position vs per chunk
    close(lazy, _tl(s, metric, "get_act_patch_attn_head_out_by_pos"))  # against TL: close()'s derivation
    assert n_lazy * 2 < logit_rows["n"], (n_lazy, logit_rows)  # one position of up to T per patch


def test_hooks_on_the_unembedding_turn_lazy_logits_off(s, logit_rows, monkeypatch):
    metric = lambda lg: lg[:, -1, 3].mean()  # noqa: E731
    seen = []
    s.model.unembed.hook_out.add_hook(lambda act, hook: seen.append(act.shape))
    try:
        ours = skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, metric, progress=False)
    finally:
        s.model.reset_hooks()
    n_hooked = logit_rows["n"]
    monkeypatch.setenv("SPARSEKERN_PATCH_LAZY", "0")
    skp.get_act_patch_resid_pre(s.model, s.corr, s.cache, metric, progress=False)
    assert seen and n_hooked == logit_rows["n"]  # every recomputed position went through the hook
    close(ours, _tl(s, metric))
