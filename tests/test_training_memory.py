"""TopK / BatchTopK (with AuxK) and JumpReLU training steps never create an ``[N, d_sae]`` tensor.

Every tensor produced by an op during a full step (forward, backward, Adam) is recorded through a
``TorchDispatchMode``; none may have ``N * d_sae / 2`` or more elements (parameters are
``d_in * d_sae``, 4x smaller here). JumpReLU's threshold gradient uses ``[N, block]`` buffers of at most
``2**22`` elements; the test shrinks that budget.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparsekern.training import SAETrainer, TrainingConfig

N, D_IN, D_SAE = 64, 16, 2048


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_training_step_builds_no_dense_code(arch, monkeypatch):
    from sparsekern.training import jumprelu

    # the threshold STE works in [N, block] column blocks of at most _BLOCK_ELEMS (2**22) elements;
    # shrink the budget so that a block is an eighth of [N, d_sae] here
    monkeypatch.setattr(jumprelu, "_BLOCK_ELEMS", N * D_SAE // 8)
    cfg = TrainingConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=4, train_batch_size_tokens=N,
                         dead_feature_window=1, jumprelu_init_threshold=0.3)
    tr = SAETrainer(cfg)
    x = torch.randn(N, D_IN)
    for _ in range(3):  # from the third step on, most latents are dead: AuxK runs
        mode = _Largest()
        with mode:
            m = tr.step(x)
    if arch != "jumprelu":
        assert m["auxiliary_reconstruction_loss"] > 0
    assert mode.largest[0] < N * D_SAE // 2, mode.largest
