"""Learning-rate and coefficient schedules, as closed forms of the training step.

``lr_factor(step, cfg)`` is SAELens's ``get_lr_scheduler`` (linear warm-up from ``1/w`` over
``lr_warm_up_steps``, then constant or cosine annealing to ``lr_end``, then a linear decay over the last
``lr_decay_steps`` from ``lr_end/lr`` (``1`` for the constant schedule) to 0) written as a function of the
step, so a resumed run needs only the step to continue exactly. ``coefficient(step, value, w)`` is
SAELens's ``CoefficientScheduler`` (0 at step 0, ``value * min(step, w) / w`` after; ``value`` if
``w == 0``).
"""

from __future__ import annotations

import math

from .config import TrainingConfig


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of ``cfg.lr`` used by optimiser step ``step`` (0-based)."""
    total, w, d = cfg.total_training_steps, cfg.lr_warm_up_steps, cfg.lr_decay_steps
    if w > 0 and step < w:
        return 1.0 if w == 1 else 1.0 / w + (1.0 - 1.0 / w) * step / (w - 1)
    constant = cfg.lr_scheduler_name.lower() == "constant"
    if d > 0 and step >= total - d:
        start = 1.0 if constant else cfg.lr_end / cfg.lr
        return start * max(0.0, 1.0 - (step - (total - d)) / d)
    if constant:
        return 1.0
    t_max = max(1, total - w - d)
    t = step - w
    eta = cfg.lr_end
    return (eta + (cfg.lr - eta) * (1 + math.cos(math.pi * min(t, t_max) / t_max)) / 2) / cfg.lr


def coefficient(step: int, value: float, warm_up_steps: int) -> float:
    """Sparsity coefficient used at step ``step`` (SAELens's ``CoefficientScheduler``)."""
    if warm_up_steps <= 0:
        return value
    return value * min(step, warm_up_steps) / warm_up_steps
