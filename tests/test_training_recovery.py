"""A short run on a planted sparse dictionary recovers it (TopK and BatchTopK; ~15 s each on CPU).

64 random unit features in 32 dims; each sample is a non-negative combination (weights in
[0.5, 2]) of 3 of them. Recovery: mean over true features of the best cosine with a learned decoder
row, > 0.9.
"""

import pytest
import torch

from sparsekern.training import SAETrainer, TrainingConfig


def _data(n, g, F):
    idx = torch.rand(n, F.shape[0], generator=g).argsort(-1)[:, :3]
    coef = torch.rand(n, 3, generator=g) * 1.5 + 0.5
    return (coef[:, :, None] * F[idx]).sum(1)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_planted_dictionary_is_recovered(arch):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(64, 32, generator=g)
    F /= F.norm(dim=-1, keepdim=True)
    steps = 200
    cfg = TrainingConfig(
        architecture=arch,
        d_in=32,
        d_sae=128,
        k=3,
        train_batch_size_tokens=256,
        training_tokens=256 * steps,
        lr=1e-2,
        seed=0,
    )
    tr = SAETrainer(cfg)
    sae = tr.fit((_data(256, g, F) for _ in range(steps)), progress=False)
    W = sae.W_dec.detach()
    W = W / W.norm(dim=-1, keepdim=True)
    cos = (F @ W.T).max(dim=1).values
    assert cos.mean() > 0.9, cos.mean()
    ev = tr.evaluate([_data(1024, g, F)])
    assert ev["explained_variance"] > 0.8 and ev["l0"] == pytest.approx(3.0, abs=0.5)
