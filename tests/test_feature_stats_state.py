"""FeatureStats's public mergeable state: the accumulators on their own, state_dict / from_state_dict,
clear errors on bad states, and files written by the FeatureStats of before the accumulators (format 1)."""

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from sparsekern import SparseActs
from sparsekern.features.accumulators import (
    ConditionedAccumulator,
    FeatureStatsConfig,
    FiringBatch,
    MomentsAccumulator,
    PairTableAccumulator,
    PartnerSketchAccumulator,
)
from sparsekern.features.stats import FeatureStats

DATA = pathlib.Path(__file__).parent / "data"
F, D_Y = 10, 3
FULL = dict(cooccurrence=True, conditioned_on=D_Y, conditioned_sum=True, y_moments=True,
            second_moment_features=[7, 2], hist_range=(1e-2, 1e2), hist_bins=8)


def code(n, seed, k=4):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(n)])
    vals = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 0.3
    return SparseActs(vals, idx), torch.randn(n, D_Y, generator=g, dtype=torch.float64)


def part(acts, a, b):
    return SparseActs(acts.values[a:b], acts.indices[a:b])


def tensors(s):
    return s.state_dict()["tensors"]


def assert_same_state(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb) and a.n_tokens == b.n_tokens and a.config == b.config
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("kw", [FULL, dict(top_partners=2, partner_capacity=3, conditioned_on=D_Y),
                                dict(cooccurrence_features=[6, 1, 3], histogram=False)],
                         ids=["table+conditioned", "sketch", "subset"])
def test_state_dict_roundtrip_continues_and_merges_like_the_original(kw):
    acts, y = code(60, 1)
    cond = "conditioned_on" in kw
    s = FeatureStats(F, **kw).update(part(acts, 0, 35), y[:35] if cond else None)
    state = s.state_dict()
    assert set(state) == {"config", "n_tokens", "memory_budget", "top_partners", "tensors"}
    t = FeatureStats.from_state_dict(state)
    assert_same_state(s, t)
    rest = SparseActs(acts.values[35:], acts.indices[35:]), (y[35:] if cond else None)
    t.update(*rest)  # copy=True: the original is untouched
    assert s.n_tokens == 35 and not torch.equal(tensors(s)["counts"], tensors(t)["counts"])
    s.update(*rest)
    assert_same_state(s, t)
    # the accumulators of the parts, merged, equal the whole
    a = FeatureStats(F, **kw).update(part(acts, 0, 20), y[:20] if cond else None)
    b = FeatureStats(F, **kw).update(part(acts, 20, 60), y[20:] if cond else None)
    merged = FeatureStats.from_state_dict(a.state_dict()).merge(FeatureStats.from_state_dict(b.state_dict()))
    for k, v in tensors(merged).items():
        if k.startswith("sketch_"):
            continue  # a merged sketch keeps its bounds, not the one-pass layout (test_feature_stats.py)
        w = tensors(s)[k]
        exact = torch.equal(v, w) if not v.is_floating_point() else torch.allclose(v, w, 1e-12, 1e-12)
        assert exact, k


def test_accumulators_on_their_own():
    acts, y = code(40, 2)
    cfg, _, _ = FeatureStatsConfig.from_arguments(
        F, histogram=True, hist_range=(1e-2, 1e2), hist_bins=8, cooccurrence=True, cooccurrence_features=None,
        top_partners=None, partner_capacity=None, memory_budget=2**30, conditioned_on=D_Y,
        conditioned_counts=True, conditioned_sum=False, y_moments=True, second_moment_features=None,
        second_moment_weighting="activation", source=None)
    whole = FeatureStats(F, **{**FULL, "conditioned_sum": False, "second_moment_features": None})
    whole.update(acts, y)
    assert whole._cfg == cfg
    for kind in (MomentsAccumulator, PairTableAccumulator, ConditionedAccumulator):
        parts = [kind(cfg), kind(cfg)]
        for p, (lo, hi) in zip(parts, ((0, 13), (13, 40))):
            p.update(FiringBatch.build(acts.values[lo:hi], acts.indices[lo:hi], y[lo:hi], F, torch.float64))
        merged = kind.from_state_dict(cfg, parts[0].state_dict(), n_tokens=parts[0].n_tokens).merge(parts[1])
        assert merged.n_tokens == 40
        want = whole.accumulators[{"MomentsAccumulator": "moments", "PairTableAccumulator": "cooccurrence",
                                   "ConditionedAccumulator": "conditioned"}[kind.__name__]].state_dict()
        got = merged.state_dict()
        assert sorted(got) == sorted(want)
        for k in got:
            assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-12, atol=1e-12), (kind, k)
    with pytest.raises(TypeError, match="MomentsAccumulator.merge expects a MomentsAccumulator"):
        MomentsAccumulator(cfg).merge(PairTableAccumulator(cfg))
    with pytest.raises(ValueError, match="a partner sketch needs cooccurrence 'sketch'"):
        PartnerSketchAccumulator(cfg)


def test_bad_states_are_refused_with_the_reason():
    s = FeatureStats(F, **FULL).update(*code(12, 3))
    state = s.state_dict()

    def with_tensors(**change):
        t = dict(state["tensors"])
        for k, v in change.items():
            if v is None:
                del t[k]
            else:
                t[k] = v
        return {**state, "tensors": t}

    with pytest.raises(ValueError, match=r"misses \['cond_sum'\]"):
        FeatureStats.from_state_dict(with_tensors(cond_sum=None))
    with pytest.raises(ValueError, match=r"tensors this configuration does not: \['extra'\]"):
        FeatureStats.from_state_dict(with_tensors(extra=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"state\['act_sum'\] must have shape \(10,\), got \(9,\)"):
        FeatureStats.from_state_dict(with_tensors(act_sum=torch.zeros(9, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"state\['counts'\] must be an int tensor"):
        FeatureStats.from_state_dict(with_tensors(counts=torch.zeros(F)))
    with pytest.raises(ValueError, match="missing \\['n_tokens'\\]"):
        FeatureStats.from_state_dict({k: v for k, v in state.items() if k != "n_tokens"})
    with pytest.raises(ValueError, match="unknown \\['colour'\\]"):
        FeatureStats.from_state_dict({**state, "config": {**state["config"], "colour": 1}})
    with pytest.raises(ValueError, match=r"n_tokens'\] must satisfy 0 <="):
        FeatureStats.from_state_dict({**state, "n_tokens": -1})


@pytest.mark.parametrize("name", ["table", "sketch"])
def test_reads_files_of_format_1(tmp_path, name):
    """Files saved by FeatureStats before it was split into accumulators load, continue, and save again."""
    inputs = load_file(str(DATA / "feature_stats_v1_inputs.safetensors"))
    acts, y = SparseActs(inputs["values"], inputs["indices"]), inputs["y"]
    old = FeatureStats.load(DATA / f"feature_stats_v1_{name}.safetensors")
    cond = old.config["conditioned_on"] is not None
    kw = {k: old.config[k] for k in ("histogram", "hist_range", "hist_bins", "conditioned_sum", "y_moments",
                                     "second_moment_weighting", "source", "conditioned_on")}
    if name == "table":
        kw.update(cooccurrence=True, second_moment_features=old.config["second_moment_features"])
    else:
        kw.update(top_partners=old._top_n, partner_capacity=old.config["partner_capacity"])
    new = FeatureStats(6, **kw)
    for a, b in ((0, 11), (11, 30)):  # the batches the file was written from
        new.update(SparseActs(acts.values[a:b], acts.indices[a:b]), y[a:b] if cond else None)
    assert old.n_tokens == new.n_tokens == 30
    for k, v in tensors(new).items():
        w = tensors(old)[k]
        assert torch.equal(v, w) if not v.is_floating_point() else torch.allclose(v, w, rtol=1e-12, atol=0), k
    old.save(tmp_path / "again.safetensors")
    assert_same_state(FeatureStats.load(tmp_path / "again.safetensors"), old)
