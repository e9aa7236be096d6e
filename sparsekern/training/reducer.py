"""``Reducer``: what an :class:`~sparsekern.training.SAETrainer` combines across processes.

One training step runs the same code on every process; the reducer is called at fixed points of it,
in the same order everywhere (so a reducer may use collectives in any method):

1. :meth:`Reducer.start_step` with this process's row count -> the rows of the whole step;
2. :meth:`Reducer.sum` (float64 scalars) for the activation-scaling estimate (and, on that step, the
   inputs' non-finite check); :meth:`Reducer.gather_rows` for the first batch's ``b_dec``
   initialisation;
3. :meth:`Reducer.loss_for_backward` -> backward -> :meth:`Reducer.reduce_gradients` ->
   :meth:`Reducer.clip_gradients` (the norm of the whole model's gradient) -> :meth:`Reducer.sum` of
   the step's non-finite checks (inputs, loss terms, gradient norm) -> Adam;
4. :meth:`Reducer.fire_counts` (dead-feature counters, feature sparsity), :meth:`Reducer.step_metrics`
   and :meth:`Reducer.dead_fraction` (the returned metrics).

``fit`` iterates :meth:`Reducer.batches`; ``evaluate`` sums through :meth:`Reducer.sum` and adds
:meth:`Reducer.reconstruction_metrics`.
:meth:`Reducer.attach` runs once, when the trainer is built.

This base class is the single-process reducer: no communication, every method returns its input (or
does what a single process does). ``sparsekern.distributed`` subclasses it for data parallelism
(``DataParallelReducer``: gradients, counts and sums all-reduced) and for feature sharding.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from .base import StepOutput
from .config import TrainingConfig


def local_step_metrics(out: StepOutput, y: Tensor) -> dict[str, float]:
    """A step's metrics on one batch: ``loss`` and each named loss, the module's extras, ``mse``
    (per-row squared error summed over dims, mean over rows), ``explained_variance`` (``1 - mean res /
    mean ||y - mean(y)||^2``, SAELens's training formula) and ``l0``. ``y [N, d_out]`` the target."""
    res = (out.sae_out.detach() - y).pow(2).sum(-1)
    var = (y - y.mean(0)).pow(2).sum(-1)
    m = {"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}, **out.metrics}
    m["mse"] = res.mean().item()
    m["explained_variance"] = 1 - (res.mean() / var.mean()).item() if var.mean() > 0 else float("nan")
    m["l0"] = out.l0.item()
    return m


class Reducer:
    """The single-process reducer (see the module docstring); subclass it to combine across processes.

    Every method is called on every process at the same point of a step; a subclass that communicates
    must do so in all of them or in none.
    """

    def attach(self, cfg: TrainingConfig, module: nn.Module) -> None:
        """Once, from ``SAETrainer.__init__``, after ``module`` is built and initialised: refuse a
        ``cfg`` that cannot be combined exactly (ValueError naming the field), and make every process
        start from the same weights."""

    def start_step(self, n_rows: int) -> int:
        """The rows of this step's whole batch, given this process's ``n_rows`` (local: ``n_rows``).
        The trainer counts training tokens and feature-sparsity samples with it."""
        return n_rows

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise float64 sums over the processes that hold different rows of the data (local:
        ``values`` as floats). ``what`` names the quantity in a communication error."""
        return [float(v) for v in values]

    def gather_rows(self, y: Tensor) -> Tensor:
        """Every process's rows ``[n_r, d]`` concatenated in rank order ``[N, d]`` (local: ``y``): the
        first batch from which ``b_dec`` is initialised (``b_dec_init_method`` mean / geometric median)."""
        return y

    def loss_for_backward(self, loss: Tensor, n_rows: int, n_total: int) -> Tensor:
        """The scalar to backward on this process, given its ``loss`` (a mean over its ``n_rows`` of the
        step's ``n_total``) (local: ``loss``). Data parallel: ``loss * n_rows / n_total``, whose gradients
        summed over processes are the gradient of the whole batch's mean loss."""
        return loss

    def reduce_gradients(self, module: nn.Module) -> None:
        """Combine ``module``'s ``.grad`` across processes in place, before clipping (local: nothing)."""

    def clip_gradients(self, module: nn.Module, max_norm: float) -> Union[Tensor, float]:
        """Scale the gradients so that the norm of the whole model's gradient is at most ``max_norm`` and
        return that norm, before scaling (local: ``torch.nn.utils.clip_grad_norm_``). A feature shard
        holds a part of the gradient only, so its norm is a sum over processes."""
        return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)

    def fire_counts(self, counts: Tensor) -> Tensor:
        """``[n_latents]`` firings of this step's whole batch from this process's ``counts`` (local:
        ``counts``). The dead-feature mask and the feature sparsity read it."""
        return counts

    def step_metrics(self, out: StepOutput, y: Tensor, counts: Tensor, n_rows: int,
                     n_total: int) -> dict[str, float]:
        """The step's metrics over the whole batch (:func:`local_step_metrics`' keys) from this process's
        forward ``out``, its targets ``y [n_rows, d_out]`` and the combined ``counts [n_latents]``."""
        return local_step_metrics(out, y)

    def dead_fraction(self, dead: Tensor) -> float:
        """The fraction of all latents that are dead, from this process's ``dead [n_latents]`` bool."""
        return dead.float().mean().item()

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The batches ``fit`` steps on (data parallel: stops on every process when one runs out)."""
        return iter(batches)

    def reconstruction_metrics(self, model: Any, sae: Any, eval_tokens: Iterable[Tensor]) -> Any:
        """``sparsekern.features.metrics.reconstruction_metrics`` of ``sae`` in ``model`` over
        ``eval_tokens`` (data parallel: over every process's ``eval_tokens``)."""
        from ..features.metrics import reconstruction_metrics

        return reconstruction_metrics(model, sae, eval_tokens, progress=False)


LOCAL = Reducer()  # stateless: shared by every single-process trainer
