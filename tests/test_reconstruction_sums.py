"""ReconstructionSums (the mergeable sums behind reconstruction_metrics): merged / all-reduced splits of a
stream against one pass over it, and the centring that keeps the explained variance accurate."""

import threading

import pytest
import torch

from sparsekern.features import ReconstructionSums

D_SAE, D = 20, 8


def stream(n_batches=4, rows=9, offset=1e4, seed=0):
    """Batches (x, x_hat, code values, code indices, per-token CE/KL, keep) with a large common mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = offset + torch.randn(rows, D, generator=g, dtype=torch.float64)
        xh = x + 0.3 * torch.randn(rows, D, generator=g, dtype=torch.float64)
        vals = torch.rand(rows, 3, generator=g) * (torch.rand(rows, 3, generator=g) > 0.3)
        idx = torch.randint(0, D_SAE - 4, (rows, 3), generator=g)  # the last 4 features never fire
        ce = [torch.rand(3, 3, generator=g) + 4 for _ in range(3)]  # [batch, pos - 1], 3 x 4 tokens
        kl = [torch.rand(3, 4, generator=g) for _ in range(2)]
        keep = torch.rand(3, 4, generator=g) > 0.2
        out.append((x, xh, vals, idx, ce, kl, keep))
    return out


def summed(batches):
    s = ReconstructionSums(D_SAE, D)
    for x, xh, vals, idx, ce, kl, keep in batches:
        s.add_reconstruction(x, xh, vals, idx)
        s.add_downstream(*ce, *kl, keep)
        s.add_sequences(3)
    return s


def assert_metrics_close(a, b, rel=1e-12):
    da, db = a.to_dict(), b.to_dict()
    for k, v in da.items():
        assert v == pytest.approx(db[k], rel=rel, abs=1e-12), k
    assert torch.equal(a.feature_density, b.feature_density) and torch.equal(a.dead_features, b.dead_features)


def test_merge_of_splits_equals_one_pass():
    batches = stream()
    one = summed(batches).finish()
    parts = [summed(batches[:1]), ReconstructionSums(D_SAE, D), summed(batches[1:3]), summed(batches[3:])]
    merged = parts[1]  # an empty state takes the first non-empty one's centre
    for p in (parts[2], parts[0], parts[3]):
        merged.merge(p)
    got = merged.finish()
    assert_metrics_close(got, one)
    assert got.n_tokens == 36 and got.n_sequences == 12 and got.dead_features.tolist() == [16, 17, 18, 19]
    # the variance about a centre near the data is accurate; about 0, E||x||^2 - ||E x||^2 would lose
    # ~8 digits
    x = torch.cat([b[0] for b in batches])
    want_ev = 1 - (x - torch.cat([b[1] for b in batches])).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert got.explained_variance == pytest.approx(float(want_ev), rel=1e-10)


def test_state_dict_roundtrip_and_recentre():
    s = summed(stream(seed=1))
    t = ReconstructionSums.from_state_dict(s.state_dict())
    assert_metrics_close(t.finish(), s.finish(), rel=0)
    t.recentre(torch.zeros(D, dtype=torch.float64) + 3.0)
    assert torch.equal(t.centre, torch.full((D,), 3.0, dtype=torch.float64))
    assert_metrics_close(t.finish(), s.finish(), rel=1e-9)  # same metrics about another centre
    with pytest.raises(ValueError, match="misses"):
        ReconstructionSums.from_state_dict({"d_sae": D_SAE})
    with pytest.raises(ValueError, match=r"state\['sums'\] must be a tensor of shape \(11,\)"):
        ReconstructionSums.from_state_dict({**s.state_dict(), "sums": torch.zeros(3)})
    with pytest.raises(ValueError, match="cannot merge ReconstructionSums"):
        s.merge(ReconstructionSums(D_SAE, D + 1))
    with pytest.raises(ValueError, match="no tokens to evaluate"):
        ReconstructionSums(D_SAE, D).finish()
    with pytest.raises(ValueError, match="dense_threshold"):
        ReconstructionSums(D_SAE, D, dense_threshold=1.5)


def test_all_reduce_over_ranks_equals_one_pass():
    """Three "ranks" as threads (one with no tokens), reducing through a shared sum."""
    batches = stream(n_batches=5, seed=2)
    shards = [batches[:2], [], batches[2:]]
    world = len(shards)
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world

    def rank(r):
        def reduce_sum(t):
            slots[r] = t.clone()
            barrier.wait()
            total = sum(slots[q] for q in range(world))
            barrier.wait()
            return total

        results[r] = summed(shards[r]).all_reduce(reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    one = summed(batches).finish()
    for res in results:
        assert_metrics_close(res.finish(), one)
        assert torch.equal(res.counts, results[0].counts) and torch.equal(res.sums, results[0].sums)
