"""Several SAEs / transcoders trained on the same activation batches (one model forward for all).

``MultiSAETrainer(cfgs, hook_names)`` holds one :class:`SAETrainer` per config; each batch is a tuple
of ``[B, d_h]`` tensors in ``hook_names`` order (what an :class:`ActivationStore` over those hooks
yields) and every trainer steps on its own hook (``(x, y)`` = ``(hook_name, hook_name_out)`` for
transcoders). Different widths, architectures or hooks are fine; all must share
``train_batch_size_tokens``.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence, Union

from torch import Tensor

from .config import TrainingConfig
from .trainer import SAETrainer


def hooks_of(cfgs: Sequence[TrainingConfig]) -> list[str]:
    """The hooks the configs read, each once, in first-use order."""
    out: list[str] = []
    for c in cfgs:
        for h in [c.hook_name, c.target_hook_name] if c.transcoder else [c.hook_name]:
            if h not in out:
                out.append(h)
    return out


class MultiSAETrainer:
    """Steps several trainers on shared batches (see the module docstring)."""

    def __init__(self, cfgs: Sequence[TrainingConfig], hook_names: Optional[Sequence[str]] = None):
        if not cfgs:
            raise ValueError("MultiSAETrainer needs at least one TrainingConfig")
        sizes = {c.train_batch_size_tokens for c in cfgs}
        if len(sizes) != 1:
            raise ValueError(f"all configs must share train_batch_size_tokens, got {sorted(sizes)}")
        self.hook_names = list(hook_names) if hook_names is not None else hooks_of(cfgs)
        for c in cfgs:
            for h in [c.hook_name, c.target_hook_name] if c.transcoder else [c.hook_name]:
                if h not in self.hook_names:
                    raise ValueError(f"config hook {h!r} is not among the batch hooks {self.hook_names}")
        self.trainers = [SAETrainer(c) for c in cfgs]

    def _inputs(self, batch: Union[Tensor, Sequence[Tensor]], cfg: TrainingConfig):
        parts = (batch,) if isinstance(batch, Tensor) else tuple(batch)
        x = parts[self.hook_names.index(cfg.hook_name)]
        y = parts[self.hook_names.index(cfg.target_hook_name)] if cfg.transcoder else None
        return x, y

    def step(self, batch) -> list[dict[str, float]]:
        """One step of every trainer on ``batch``; their metrics, in order."""
        return [t.step(*self._inputs(batch, t.cfg)) for t in self.trainers]

    def fit(self, batches: Iterable, n_steps: Optional[int] = None, progress: bool = True) -> list:
        """Train all on ``batches``; returns their inference SAEs, in order."""
        from tqdm.auto import tqdm

        if n_steps is None:
            n_steps = max(t.cfg.total_training_steps - t.n_training_steps for t in self.trainers)
        it = iter(batches)
        need = [
            t for t in self.trainers if t.cfg.normalize_activations != "none" and t.scaling_factor is None
        ]
        if need:
            head = list(itertools.islice(it, max(t.cfg.n_batches_for_norm_estimate for t in need)))
            for t in need:
                t.estimate_scaling_factor(
                    [self._inputs(b, t.cfg)[0] for b in head[: t.cfg.n_batches_for_norm_estimate]]
                )
            it = itertools.chain(head, it)
        with tqdm(total=n_steps, disable=not progress, desc=f"training {len(self.trainers)} SAEs") as pbar:
            for i, batch in enumerate(it):
                if i >= n_steps:
                    break
                ms = self.step(batch)
                pbar.update(1)
                if (i + 1) % 10 == 0:
                    # a trainer that skipped this batch (skip_nonfinite) has no explained variance
                    pbar.set_postfix({f"ev{j}": f"{m.get('explained_variance', float('nan')):.3f}"
                                      for j, m in enumerate(ms)})
        return [t.to_inference() for t in self.trainers]
