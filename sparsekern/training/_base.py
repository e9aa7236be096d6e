"""Deprecated alias of :mod:`sparsekern.training.base` (the training modules' public base)."""

from .base import StepOutput, TrainingModule, fire_counts_sparse, mse_loss

__all__ = ["StepOutput", "TrainingModule", "fire_counts_sparse", "mse_loss"]
