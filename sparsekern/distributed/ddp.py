"""Data-parallel SAE training: ``sparsekern.training.SAETrainer`` with gradients all-reduced across ranks.

Each rank steps on its own rows of the global batch. Everything that depends on the whole batch is
computed over all ranks, so a step on shards equals a step on the concatenated batch (up to float
rounding of the gradient sums, ~1e-7 relative in float32):

* the losses are means over rows, so the full-batch gradient is ``sum_r (n_r / N) grad_r``: each rank
  scales its gradients by ``n_r / N`` and they are summed (all-reduce) before clipping and Adam;
* the firing counts (dead-feature mask, AuxK, feature sparsity) are summed (exact integers);
* the activation scaling factor and the ``b_dec`` initialisation use every rank's rows (for the
  scale each rank sums its float32 norms in float32, as one process does, and the ranks' sums are
  added in float64);
* parameters are broadcast from rank 0 at start, checkpoints are written by rank 0 only;
* the NaN / inf checks of a step are summed too, so every rank refuses (or, with ``skip_nonfinite``,
  skips) the same step.

All of this is :class:`DataParallelReducer`, the :class:`~sparsekern.training.Reducer` that
:class:`DistributedSAETrainer` hands to ``SAETrainer``; the trainer's own step runs unchanged.

BatchTopK is refused: it selects the top ``k * N`` activations over the whole batch (and keeps an EMA of
the batch's smallest kept one), which rank-local batches would change.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..training import Reducer, SAETrainer, StepOutput, TrainingConfig
from ..training.trainer import Batch
from .data_parallel import _all_gather, _collective, rank_and_world, sharded_range

__all__ = ["DataParallelReducer", "DistributedSAETrainer", "shard_rows", "train_sae_ddp"]


def shard_rows(batch: Batch, group: Optional[Any] = None) -> Batch:
    """This rank's contiguous rows of a global batch ``x [N, d]`` (or ``(x, y)``): :func:`sharded_range`."""
    rank, world = rank_and_world(group)
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    r = sharded_range(int(parts[0].shape[0]), rank, world)
    out = tuple(p[r.start:r.stop] for p in parts)
    return out if isinstance(batch, (tuple, list)) else out[0]


def _refuse_batchtopk(cfg: TrainingConfig) -> None:
    if cfg.architecture == "batchtopk":
        raise ValueError(
            "DistributedSAETrainer: architecture='batchtopk' selects over the whole batch and cannot be "
            "split across ranks exactly; use 'topk' (or train BatchTopK on one process)"
        )


class DataParallelReducer(Reducer):
    """:class:`~sparsekern.training.Reducer` of data-parallel training over the ranks of ``group`` (see
    the module docstring): each rank holds different rows of the step's batch and a full replica of
    the module. Losses are weighted ``n_r / N`` and the gradients all-reduced (one flat buffer);
    firing counts, metric, evaluation and scaling sums are float64 all-reduces; the ``b_dec``
    initialisation gathers every rank's first batch; ``batches`` stops every rank when one runs out.
    ``attach`` refuses BatchTopK and broadcasts parameters and buffers from the group's rank 0.

    Use it through :class:`DistributedSAETrainer`, or as ``SAETrainer(cfg, reducer=DataParallelReducer())``.
    """

    def __init__(self, group: Optional[Any] = None):
        self.group = group
        self.rank, self.world_size = rank_and_world(group)
        self.device = torch.device("cpu")

    def attach(self, cfg: TrainingConfig, module: nn.Module) -> None:
        _refuse_batchtopk(cfg)
        self.device = torch.device(cfg.device)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():  # same start everywhere, whatever each rank was given
            for t in itertools.chain(module.parameters(), module.buffers()):
                _collective("broadcast parameters", dist.broadcast, t.data, src, group=self.group)

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the training device under NCCL, the CPU under gloo."""
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def sum(self, values, what: str) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        _collective(what, dist.all_reduce, t, group=self.group)
        return t.tolist()

    def rows_per_rank(self, n_local: int) -> list[int]:
        """Every rank's ``n_local``, in rank order."""
        v = [0.0] * self.world_size
        v[self.rank] = float(n_local)
        return [int(k) for k in self.sum(v, "rows per rank")]

    def start_step(self, n_rows: int) -> int:
        n_all = self.rows_per_rank(n_rows)
        if min(n_all) == 0:
            empty = [r for r, k in enumerate(n_all) if k == 0]
            raise ValueError(f"DistributedSAETrainer.step: rank(s) {empty} got no rows (each needs >= 1)")
        return sum(n_all)

    def gather_rows(self, y: Tensor) -> Tensor:
        n = self.rows_per_rank(y.shape[0])
        pad = y.new_zeros(max(n), y.shape[1])
        pad[: y.shape[0]] = y
        parts = _all_gather(pad.to(self.comm_device), "b_dec init rows", self.group)
        return torch.cat([p[:k].to(y.device) for p, k in zip(parts, n)])

    def loss_for_backward(self, loss: Tensor, n_rows: int, n_total: int) -> Tensor:
        return loss * (n_rows / n_total)  # the full batch's mean loss is sum_r (n_r / N) loss_r

    def reduce_gradients(self, module: nn.Module) -> None:
        """Sum the (already ``n_r / N``-weighted) gradients over ranks, one flat buffer."""
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused this step on this rank (e.g. no dead latents for AuxK): adds zeros
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self.comm_device)
        _collective("gradients", dist.all_reduce, flat, group=self.group)
        flat = flat.to(self.device)
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()

    def fire_counts(self, counts: Tensor) -> Tensor:
        device = counts.device
        counts = counts.to(self.comm_device)
        _collective("firing counts", dist.all_reduce, counts, group=self.group)
        return counts.to(device)

    def step_metrics(self, out: StepOutput, y: Tensor, counts: Tensor, n_rows: int,
                     n_total: int) -> dict[str, float]:
        """The single-process metrics of the whole batch, from float64 sums over ranks."""
        w = n_rows / n_total
        names = ["loss", *out.losses]
        local = [out.loss.item() * w, *(v.item() * w for v in out.losses.values())]
        yd = y.double()
        res = (out.sae_out.detach().double() - yd).pow(2).sum().item()
        sums = self.sum(local + [res, yd.pow(2).sum().item()] + yd.sum(0).tolist(), "metrics")
        m = dict(zip(names, sums[: len(names)]), **out.metrics)
        res_sum, sq = sums[len(names)], sums[len(names) + 1]
        y_sum = torch.tensor(sums[len(names) + 2:], dtype=torch.float64)
        var = sq - y_sum.pow(2).sum().item() / n_total  # sum_rows ||y - mean||^2
        m["mse"] = res_sum / n_total
        m["explained_variance"] = 1 - res_sum / var if var > 0 else float("nan")
        m["l0"] = counts.sum().item() / n_total
        return m

    def batches(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        it = iter(batches)
        while True:
            b = next(it, None)
            (flag,) = self.sum([0.0 if b is None else 1.0], "batch available")
            if flag < self.world_size:
                return
            yield b

    def reconstruction_metrics(self, model: Any, sae: Any, eval_tokens: Iterable[Tensor]):
        from .metrics import distributed_reconstruction_metrics

        return distributed_reconstruction_metrics(model, sae, eval_tokens, group=self.group, progress=False)


class DistributedSAETrainer(SAETrainer):
    """:class:`~sparsekern.training.SAETrainer` over the ranks of ``group`` (see the module docstring):
    an ``SAETrainer`` with a :class:`DataParallelReducer`, whose checkpoints rank 0 writes.

    Call ``step(x [n_r, d_in])`` / ``fit(batches)`` on every rank with this rank's rows; every rank then
    holds the same weights. ``fit`` stops when any rank runs out of batches.
    """

    def __init__(self, cfg: TrainingConfig, sae: Optional[Any] = None, *, group: Optional[Any] = None):
        _refuse_batchtopk(cfg)  # before any process-group call: the error is about the config
        reducer = DataParallelReducer(group)
        self.group, self.rank, self.world_size = group, reducer.rank, reducer.world_size
        super().__init__(cfg, sae, reducer=reducer)

    def evaluate(self, batches: Optional[Iterable[Batch]] = None, model: Any = None,
                 eval_tokens: Optional[Iterable[Tensor]] = None) -> dict[str, float]:
        """:meth:`SAETrainer.evaluate` over every rank's ``batches`` (this rank's rows ``[n_r, d_in]``, up to
        ``cfg.n_eval_batches`` per rank): ``mse``, ``explained_variance`` and ``l0`` come from sums over all
        ranks, so every rank reports what one process reports on the concatenated rows (to float64 rounding
        of the sums, ``l0`` to float32 rounding). Collective: call it on every rank (``fit`` does when every
        rank passes ``eval_batches`` / ``model``). The ``model_*`` metrics (``model`` + this rank's
        ``eval_tokens [batch, pos]`` batches) are :func:`.metrics.distributed_reconstruction_metrics`'s, over
        every rank's ``eval_tokens``."""
        return super().evaluate(batches, model=model, eval_tokens=eval_tokens)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """Rank 0 writes (every rank holds the same state); the others wait for it."""
        out = super().save_checkpoint(path) if self.rank == 0 else Path(path)
        _collective("checkpoint barrier", dist.barrier, group=self.group)
        return out

    checkpoint = save_checkpoint


def train_sae_ddp(
    model: Any,
    tokens: Tensor,
    hook_name: str,
    cfg: TrainingConfig,
    *,
    group: Optional[Any] = None,
    progress: bool = True,
    **store_kwargs: Any,
):
    """:func:`sparsekern.training.train_sae`, data parallel: rank r reads the sequences
    ``tokens[sharded_range(n_seq)]`` through its own ``ActivationStore`` and steps on
    ``cfg.train_batch_size_tokens // world_size`` rows (so a step sees the configured number of tokens).

    Returns the inference SAE (the same on every rank). Not bitwise equal to one-process training: each
    rank shuffles its own shard (use :class:`DistributedSAETrainer` on row shards of the same batches for
    that).
    """
    import dataclasses

    from ..training import ActivationStore, with_model_info
    from ..training.activations import check_hooks

    rank, world = rank_and_world(group)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise TypeError("tokens must be a [n_seq, ctx] tensor (each rank takes its sequences)")
    if cfg.transcoder:
        raise ValueError("train_sae_ddp trains SAEs; use DistributedSAETrainer.fit for transcoders")
    if cfg.train_batch_size_tokens % world:
        raise ValueError(
            f"cfg.train_batch_size_tokens={cfg.train_batch_size_tokens} must be divisible by "
            f"world_size={world}"
        )
    cfg = with_model_info(dataclasses.replace(cfg, hook_name=hook_name), model, tokens)
    check_hooks(model, [hook_name])
    r = sharded_range(tokens.shape[0], rank, world)
    store = ActivationStore(model, tokens[r.start:r.stop], [hook_name],
                            train_batch_size_tokens=cfg.train_batch_size_tokens // world,
                            seed=cfg.seed + rank, device=cfg.device, dtype=cfg.torch_dtype, **store_kwargs)
    trainer = DistributedSAETrainer(cfg, group=group)
    return trainer.fit(store.batches(cfg.total_training_steps), progress=progress and rank == 0)
