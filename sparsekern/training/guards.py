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


def refusal(step: int, what: Sequence[str], detail: str, skip: bool) -> str:
    """The message of a refused (or, with ``skip``, skipped) step."""
    if skip:
        return f"SAETrainer: skipped the batch of step {step}: {detail} (skip_nonfinite=True)"
    return (f"SAETrainer: step {step} refused: {detail}; the weights, the optimiser state and the counters "
            f"are unchanged. Look for NaN / inf in the activations (or lower lr), or {SKIP_HINT}")


def count_nonfinite(x: Tensor, y: Optional[Tensor]) -> list[Tensor]:
    """The number of NaN / inf entries of ``x [N, d_in]`` (and ``y [N, d_out]``; None: not counted), as
    0-d int64 tensors on their device: queued, not read back (:func:`nonfinite` reads them)."""
    return [torch.isfinite(t).logical_not().sum() for t in ([x] if y is None else [x, y])]


def nonfinite(reducer: Reducer, input_counts: Sequence[Tensor], out: Optional[StepOutput] = None,
              norm: Any = None) -> Optional[tuple[list[str], str]]:
    """``(names, detail)`` if, on any process, the inputs hold NaN / inf (``input_counts`` from
    :func:`count_nonfinite`, for ``x`` then ``y``), or the loss, a loss term of ``out.losses`` or the
    gradient ``norm`` (a tensor, a float, or None: not checked) are not finite; else None. The inputs
    are named first: a non-finite input makes the loss non-finite too.

    All of it is read back from the device at once and goes through one ``reducer.sum`` (so every
    process agrees): a step pays one host synchronisation for its checks.
    """
    names = ["loss", *out.losses] if out is not None else []
    values = [out.loss, *out.losses.values()] if out is not None else []
    # int64 on the device (not float64: MPS has none); 1 = not finite for the loss terms and the norm
    queued = [c.to(torch.int64) for c in input_counts]
    queued += [torch.isfinite(v.detach()).all().logical_not().to(torch.int64) for v in values]
    on_host: list[int] = []
    if norm is not None:
        names.append("gradient")
        if isinstance(norm, Tensor):
            queued.append(torch.isfinite(norm.detach()).all().logical_not().to(torch.int64))
        else:
            on_host.append(0 if math.isfinite(norm) else 1)
    local = (torch.stack(queued).tolist() if queued else []) + on_host
    total = reducer.sum(local, "non-finite checks")
    counts, flags = total[: len(input_counts)], total[len(input_counts):]
    if any(counts):
        label = {"x": "the input activations x", "y": "the targets y"}
        bad_in = [(n, int(c)) for n, c in zip(("x", "y"), counts) if c]
        return [n for n, _ in bad_in], "; ".join(f"{label[n]} hold {c} NaN / inf value(s)" for n, c in bad_in)
    if not any(flags):
        return None
    bad = [n for n, f in zip(names, flags) if f]
    shown = ", ".join(f"{n}={float(v.detach()):.4g}" for n, v in zip(names, values))
    if bad == ["gradient"]:
        return bad, f"the gradient norm is {float(norm)} although the loss is finite ({shown})"
    terms = [n for n in bad if n not in ("loss", "gradient")]
    which = f"the loss term(s) {', '.join(terms)} are" if terms else "the loss is"
    return bad, f"{which} not finite ({shown})"
