"""What :class:`~sparsekern.training.SAETrainer` refuses before a step can harm the weights.

* activations that are not floating point (``TypeError``: int64 tokens passed instead of activations);
* non-finite inputs, losses or gradients (:class:`NonFiniteError`, raised before the optimiser runs; with
  ``TrainingConfig(skip_nonfinite=True)`` the batch is skipped instead, with a ``RuntimeWarning``, and
  counted in ``SAETrainer.n_skipped_batches`` and the ``skipped_batches`` metric).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .base import StepOutput
from .reducer import Reducer

SKIP_HINT = "set TrainingConfig(skip_nonfinite=True) to skip such batches instead"


class NonFiniteError(ValueError):
    """A training step met NaN / inf values and changed nothing: the weights, the optimiser state and the
    counters are as before the step.

    ``step``: the index of the refused step (``SAETrainer.n_training_steps`` when it ran, 0-based);
    ``what``: the names of what was not finite (``"x"``, ``"y"``, ``"loss"``, a loss term such as
    ``"mse_loss"``, ``"gradient"``, or ``"norm estimate"``).
    """

    def __init__(self, message: str, step: int, what: Sequence[str]):
        super().__init__(message)
        self.step = step
        self.what = list(what)


def check_float(t: Tensor, name: str, shape: str) -> None:
    """``TypeError`` unless ``t`` is a floating-point tensor; for integer / bool tensors the message says
    that tokens were probably passed where activations belong."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a float tensor {shape}, got {type(t).__name__}")
    if t.dtype.is_floating_point:
        return
    hint = ""
    if not t.dtype.is_complex:
        hint = ("; did you pass tokens? pass activations (e.g. from ActivationStore) or use train_sae with a "
                "model, which runs the model on the tokens")
    raise TypeError(f"{name} must hold float activations {shape}, got a {t.dtype} tensor{hint}")


def nonfinite_counts(tensors: Sequence[Optional[Tensor]]) -> list[int]:
    """Number of NaN / inf entries of each tensor (0 for None)."""
    return [0 if t is None else int(t.numel() - torch.isfinite(t).sum()) for t in tensors]


def all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor is finite everywhere, read back with one device synchronisation."""
    if not tensors:
        return []
    return [bool(v) for v in torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).tolist()]


def refusal(step: int, what: Sequence[str], detail: str, skip: bool) -> str:
    """The message of a refused (or, with ``skip``, skipped) step."""
    if skip:
        return f"SAETrainer: skipped the batch of step {step}: {detail} (skip_nonfinite=True)"
    return (f"SAETrainer: step {step} refused: {detail}; the weights, the optimiser state and the counters "
            f"are unchanged. Look for NaN / inf in the activations (or lower lr), or {SKIP_HINT}")


def nonfinite_inputs(reducer: Reducer, x: Tensor, y: Optional[Tensor]) -> Optional[tuple[list[str], str]]:
    """``(names, detail)`` if ``x [N, d_in]`` / ``y [N, d_out]`` (None: not checked) hold NaN / inf on
    any process (the flags go through ``reducer.sum``, so every process agrees), else None."""
    tensors = [x] if y is None else [x, y]
    flags = reducer.sum([0.0 if ok else 1.0 for ok in all_finite(tensors)], "finite inputs")
    if not any(flags):
        return None
    counts = reducer.sum(nonfinite_counts(tensors), "non-finite inputs")
    label = {"x": "the input activations x", "y": "the targets y"}
    bad = [(n, int(c)) for n, c in zip(("x", "y"), counts) if c]
    return [n for n, _ in bad], "; ".join(f"{label[n]} hold {c} NaN / inf value(s)" for n, c in bad)


def nonfinite_results(reducer: Reducer, out: StepOutput, norm: Any) -> Optional[tuple[list[str], str]]:
    """``(names, detail)`` if the loss, a loss term of ``out.losses`` or the gradient ``norm`` (a tensor,
    a float, or None: not checked) is NaN / inf on any process, else None."""
    names = ["loss", *out.losses]
    values = [out.loss, *out.losses.values()]
    ok = all_finite(values)
    if norm is not None:
        names.append("gradient")
        ok.append(math.isfinite(norm) if isinstance(norm, (int, float)) else all_finite([norm])[0])
    flags = reducer.sum([0.0 if f else 1.0 for f in ok], "finite loss")
    if not any(flags):
        return None
    bad = [n for n, f in zip(names, flags) if f]
    shown = ", ".join(f"{n}={float(v.detach()):.4g}" for n, v in zip(names, values))
    if bad == ["gradient"]:
        return bad, f"the gradient norm is {float(norm)} although the loss is finite ({shown})"
    terms = [n for n in bad if n not in ("loss", "gradient")]
    which = f"the loss term(s) {', '.join(terms)} are" if terms else "the loss is"
    return bad, f"{which} not finite ({shown})"
