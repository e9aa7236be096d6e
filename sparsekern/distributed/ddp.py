"""Data-parallel SAE training: ``sparsekern.training.SAETrainer`` with gradients all-reduced across ranks.

Each rank steps on its own rows of the global batch. Everything that depends on the whole batch is
computed over all ranks, so a step on shards equals a step on the concatenated batch (up to float
rounding of the gradient sums, ~1e-7 relative in float32):

* the losses are means over rows, so the full-batch gradient is ``sum_r (n_r / N) grad_r``: each rank
  scales its gradients by ``n_r / N`` and they are summed (all-reduce) before clipping and Adam;
* the firing counts (dead-feature mask, AuxK, feature sparsity) are summed (exact integers);
* the activation scaling factor and the ``b_dec`` initialisation use every rank's rows;
* parameters are broadcast from rank 0 at start, checkpoints are written by rank 0 only.

BatchTopK is refused: it selects the top ``k * N`` activations over the whole batch (and keeps an EMA of
the batch's smallest kept one), which rank-local batches would change.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..training.config import TrainingConfig
from ..training.trainer import Batch, SAETrainer, _split, geometric_median
from .data_parallel import _all_gather, _collective, rank_and_world, sharded_range

__all__ = ["DistributedSAETrainer", "shard_rows", "train_sae_ddp"]


def shard_rows(batch: Batch, group: Optional[Any] = None) -> Batch:
    """This rank's contiguous rows of a global batch ``x [N, d]`` (or ``(x, y)``): :func:`sharded_range`."""
    rank, world = rank_and_world(group)
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    r = sharded_range(int(parts[0].shape[0]), rank, world)
    out = tuple(p[r.start:r.stop] for p in parts)
    return out if isinstance(batch, (tuple, list)) else out[0]


class DistributedSAETrainer(SAETrainer):
    """:class:`~sparsekern.training.SAETrainer` over the ranks of ``group`` (see the module docstring).

    Call ``step(x [n_r, d_in])`` / ``fit(batches)`` on every rank with this rank's rows; every rank then
    holds the same weights. ``fit`` stops when any rank runs out of batches.
    """

    def __init__(self, cfg: TrainingConfig, sae: Optional[Any] = None, *, group: Optional[Any] = None):
        if cfg.architecture == "batchtopk":
            raise ValueError(
                "DistributedSAETrainer: architecture='batchtopk' selects over the whole batch and cannot be "
                "split across ranks exactly; use 'topk' (or train BatchTopK on one process)"
            )
        self.group = group
        self.rank, self.world_size = rank_and_world(group)
        super().__init__(cfg, sae)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():  # same start everywhere, whatever each rank was given
            for t in itertools.chain(self.sae.parameters(), self.sae.buffers()):
                _collective("broadcast parameters", dist.broadcast, t.data, src, group=group)

    # ---- collectives ---------------------------------------------------------------------------------
    def _sum(self, values: list[float], what: str) -> list[float]:
        """Element-wise sum over ranks of a few float64 scalars."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        _collective(what, dist.all_reduce, t, group=self.group)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    # ---- whole-batch quantities ----------------------------------------------------------------------
    @torch.no_grad()
    def estimate_scaling_factor(self, batches: Iterable[Batch]) -> float:
        """``sqrt(d_in) / E||x||`` over every rank's ``batches`` (sets and returns it)."""
        total, count = 0.0, 0
        for b in batches:
            norms = _split(b)[0].float().norm(dim=-1)
            total += norms.double().sum().item()
            count += norms.numel()
        total, count = self._sum([total, float(count)], "scaling factor")
        if count == 0 or total == 0:
            raise ValueError("estimate_scaling_factor: no non-zero activations to estimate the norm from")
        self.scaling_factor = math.sqrt(self.cfg.d_in) / (total / count)
        return self.scaling_factor

    @torch.no_grad()
    def _init_b_dec(self, y: Tensor) -> None:
        # the first batch's targets of all ranks, in rank order (= the single-process batch)
        n = [int(v) for v in self._sum_vec(y.shape[0])]
        pad = y.new_zeros(max(n), y.shape[1])
        pad[: y.shape[0]] = y
        parts = _all_gather(pad.to(self._comm_device), "b_dec init rows", self.group)
        full = torch.cat([p[:k].to(y.device) for p, k in zip(parts, n)])
        m = self.cfg.b_dec_init_method
        self.sae.b_dec.copy_(full.mean(0) if m == "mean" else geometric_median(full))
        self.b_dec_initialized = True

    def _sum_vec(self, n_local: int) -> list[float]:
        """Every rank's ``n_local``, in rank order."""
        v = [0.0] * self.world_size
        v[self.rank] = float(n_local)
        return self._sum(v, "rows per rank")

    # ---- training ------------------------------------------------------------------------------------
    def _step(self, x: Tensor, y: Optional[Tensor]) -> dict[str, float]:
        # SAETrainer._step; the hooks below put the cross-rank reductions between its stages
        n_all = self._sum_vec(int(x.shape[0]))
        if min(n_all) == 0:
            empty = [r for r, k in enumerate(n_all) if k == 0]
            raise ValueError(f"DistributedSAETrainer.step: rank(s) {empty} got no rows (each needs >= 1)")
        self._n_step = (int(x.shape[0]), int(sum(n_all)))
        return super()._step(x, y)

    def _backward(self, out) -> None:
        n, n_total = self._n_step
        (out.loss * (n / n_total)).backward()  # the full batch's mean loss is sum_r (n_r / N) loss_r
        self._reduce_grads()  # before clipping: the norm is the full batch's

    def _rows(self, x: Tensor) -> int:
        return self._n_step[1]

    def _fire_counts(self, out) -> Tensor:
        counts = out.fire_counts.to(self._comm_device)
        _collective("firing counts", dist.all_reduce, counts, group=self.group)
        self._step_counts = counts.to(self.device)
        return self._step_counts

    def _metrics(self, out, y: Tensor) -> dict[str, float]:
        return self._global_metrics(out, y, self._step_counts, *self._n_step)

    def _reduce_grads(self) -> None:
        """Sum the (already ``n_r / N``-scaled) gradients over ranks, one flat buffer per dtype."""
        params = [p for p in self.sae.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused this step on this rank (e.g. no dead latents for AuxK): adds zeros
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self._comm_device)
        _collective("gradients", dist.all_reduce, flat, group=self.group)
        flat = flat.to(self.device)
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()

    def _global_metrics(self, out, y: Tensor, counts: Tensor, n: int, n_total: int) -> dict[str, float]:
        """The metrics of ``SAETrainer._metrics`` over the whole batch (float64 sums over ranks)."""
        w = n / n_total
        names = ["loss", *out.losses]
        local = [out.loss.item() * w, *(v.item() * w for v in out.losses.values())]
        yd = y.double()
        res = (out.sae_out.detach().double() - yd).pow(2).sum().item()
        sums = self._sum(local + [res, yd.pow(2).sum().item()] + yd.sum(0).tolist(), "metrics")
        m = dict(zip(names, sums[: len(names)]), **out.metrics)
        res_sum, sq = sums[len(names)], sums[len(names) + 1]
        y_sum = torch.tensor(sums[len(names) + 2:], dtype=torch.float64)
        var = sq - y_sum.pow(2).sum().item() / n_total  # sum_rows ||y - mean||^2
        m["mse"] = res_sum / n_total
        m["explained_variance"] = 1 - res_sum / var if var > 0 else float("nan")
        m["l0"] = counts.sum().item() / n_total
        m["dead_fraction"] = self.dead_neurons.float().mean().item()
        return m

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

    def _reconstruction_metrics(self, model: Any, eval_tokens: Iterable[Tensor]):
        from .metrics import distributed_reconstruction_metrics

        return distributed_reconstruction_metrics(model, self.to_inference(), eval_tokens, group=self.group,
                                                  progress=False)

    def _eval_totals(
        self, scalars: list[float], sums: Optional[Tensor]
    ) -> tuple[list[float], Optional[Tensor]]:
        # sums, not per-rank ratios: a mean of the ranks' explained variances is not the global one
        d = self.cfg.d_out or self.cfg.d_in
        vec = sums.tolist() if sums is not None else [0.0] * d  # a rank without rows adds zeros
        tot = self._sum(scalars + vec, "evaluation sums")
        k = len(scalars)
        return tot[:k], (torch.tensor(tot[k:], dtype=torch.float64) if tot[1] else None)

    def fit(self, batches: Iterable[Batch], *args: Any, **kwargs: Any):
        """:meth:`SAETrainer.fit` on this rank's ``batches``; stops for all when any rank runs out."""
        return super().fit(self._synced(batches), *args, **kwargs)

    def _synced(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        it = iter(batches)
        while True:
            b = next(it, None)
            (flag,) = self._sum([0.0 if b is None else 1.0], "batch available")
            if flag < self.world_size:
                return
            yield b

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

    from ..training.activations import ActivationStore, check_hooks
    from ..training.api import _with_model_info

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
    cfg = _with_model_info(dataclasses.replace(cfg, hook_name=hook_name), model, tokens)
    check_hooks(model, [hook_name])
    r = sharded_range(tokens.shape[0], rank, world)
    store = ActivationStore(model, tokens[r.start:r.stop], [hook_name],
                            train_batch_size_tokens=cfg.train_batch_size_tokens // world,
                            seed=cfg.seed + rank, device=cfg.device, dtype=cfg.torch_dtype, **store_kwargs)
    trainer = DistributedSAETrainer(cfg, group=group)
    return trainer.fit(store.batches(cfg.total_training_steps), progress=progress and rank == 0)
