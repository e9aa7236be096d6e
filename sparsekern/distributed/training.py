"""Feature-sharded (and data x feature parallel) TopK / JumpReLU / standard / gated training through
:class:`SAETrainer`.

:class:`ShardedTrainer` is an ``SAETrainer`` whose training module holds this rank's slice of the
features (:func:`shard_range`) and whose dead-feature counters are the local slice. A step on the same
batch on every rank of ``group`` equals a single-process step (same init for a seed: the full weights
are drawn, then sliced): the encode is the exact merged top-k, the decode an all-reduce of local
decodes (see :mod:`.sharded_sae`), AuxK a merged top-k among the dead features of all ranks, gradient
clipping uses the global norm, and Adam / decoder normalisation are per element / per feature row.
JumpReLU, standard (ReLU + L1) and gated need no merge: the code is local, and the decode and every
sum over features (L0, the L1 / Lp sparsity penalty, gated's auxiliary gate-path decode) are
all-reduced (standard / gated: one differentiable all-reduce of the concatenated per-row sums, plus a
scalar L0 count). Transcoders (and skip transcoders) of TopK, JumpReLU and standard work too;
``W_skip`` / ``b_dec`` are replicated. BatchTopK is not sharded: its selection is a top-k over the
whole batch x all features.

``data_group`` (optional): ranks holding the same features but different batches (one per data
replica, equal batch sizes). Gradients are averaged and feature-firing counts summed over it, so a
step equals a single-process step on the concatenated batch; the activation scaling factor and the
``b_dec`` initialisation use every replica's rows too.

The trainer is ``SAETrainer``'s own step: what is sharded is the training module (the public
:class:`~sparsekern.training.TrainingModule` base, one subclass per architecture below) and what the
step combines across ranks is :class:`ShardedReducer` (a :class:`~sparsekern.training.Reducer`).

Launch: one process per (data replica, feature shard), e.g. ``torchrun --nproc_per_node=8`` with
``group``/``data_group`` from ``torch.distributed.new_group`` (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import sparse_decode, threshold_encode, topk_encode
from ..training import Reducer, SAETrainer, TrainingConfig, build_module
from ..training import checkpoint as ckpt
from ..training.base import StepOutput, fire_counts_sparse, mse_loss
from ..training.export import inference_state
from ..training.gated import GatedTrainingModule
from ..training.jumprelu import JumpReLUTrainingModule, ThresholdSTE
from ..training.reducer import local_step_metrics
from ..training.standard import StandardTrainingModule
from ..training.topk import TopKTrainingModule
from . import _comm
from ._autograd import copy_to_group, reduce_from_group
from .ddp import DataParallelReducer
from .sharded_sae import FEATURE_DIM, ShardedSAE, merge_topk, shard_range


class _Shard:
    """What every sharded training module shares: this rank's slice, the single-process init, and the
    per-rank bookkeeping. ``self.cfg`` is the local config (``d_sae = d_sae_local``); ``global_cfg`` the
    run's. Every rank of ``group`` calls ``forward_train`` on the same batch and backwards the same loss.
    """

    def _shard_init(self, base: type, cfg: TrainingConfig, group: _comm.Group, data_group: _comm.Group):
        rank, world = _comm.rank_world(group)
        start, stop = shard_range(cfg.d_sae, rank, world)
        k = min(cfg.k, stop - start) if cfg.architecture == "topk" else cfg.k
        base.__init__(self, dataclasses.replace(cfg, d_sae=stop - start, k=k))
        self.global_cfg, self.group, self.data_group = cfg, group, data_group
        self.feature_offset, self.d_sae_local = start, stop - start
        self._b_in: Optional[Tensor] = None

    @torch.no_grad()
    def initialize_weights(self, seed: int) -> None:
        """The single-process init for ``seed`` (full weights drawn on CPU), sliced to this rank."""
        full = build_module(dataclasses.replace(self.global_cfg, device="cpu"))
        full.initialize_weights(seed)
        a, b = self.feature_offset, self.feature_offset + self.d_sae_local
        for name, p in self.named_parameters():
            dim = FEATURE_DIM.get(name)
            src = getattr(full, name)
            p.copy_(src if dim is None else src.narrow(dim, a, b - a))

    def _sae_in(self, x: Tensor) -> Tensor:
        """``x - b_dec * apply`` ``[N, d_in]`` for the local encode. ``b_dec`` goes through
        ``copy_to_group``: its encoder-side gradient is summed over the feature group (a ``[d_in]``
        all-reduce; ``x`` itself needs no gradient in training)."""
        return x - copy_to_group(self.b_dec, self.group) if self.cfg.apply_b_dec_to_input else x

    def _dense_l0(self, fired: Tensor) -> Tensor:
        """Mean L0 over every feature of ``group`` from the local ``fired [N, d_sae_local]`` (bool). The
        count is reduced in float64 (exact; a bf16 column would round row counts above 256)."""
        total = fired.sum().to(torch.float64).reshape(1)
        return _comm.all_reduce_(total, self.group, "all_reduce (L0)")[0] / max(fired.shape[0], 1)

    def _counts(self, values: Tensor, local_idx: Tensor, l0: Tensor) -> tuple[Tensor, Tensor]:
        """Local firing counts ``[d_sae_local]`` of a sparse local code and the mean L0 (already global
        over ``group``), summed / averaged over data replicas."""
        return self._data_counts(fire_counts_sparse(values, local_idx, self.d_sae_local), l0)

    def _data_counts(self, counts: Tensor, l0: Tensor) -> tuple[Tensor, Tensor]:
        """``counts [d_sae_local]`` summed and the scalar ``l0`` averaged over data replicas."""
        if self.data_group is not None:  # firing over every data replica's rows
            _comm.all_reduce_(counts, self.data_group, "all_reduce (fire counts)")
            l0 = _comm.all_reduce_(l0.clone(), self.data_group) / _comm.rank_world(self.data_group)[1]
        return counts, l0


class ShardedTopKTrainingModule(_Shard, TopKTrainingModule):
    """``TopKTrainingModule`` over features ``[feature_offset, feature_offset + d_sae_local)``."""

    def __init__(self, cfg: TrainingConfig, group: _comm.Group = None, data_group: _comm.Group = None):
        self._shard_init(TopKTrainingModule, cfg, group, data_group)

    def b_dec_in(self) -> Optional[Tensor]:
        # one copy_to_group per forward, shared by the encode and AuxK: one all-reduce in the backward
        return self._b_in

    def _owned(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        a = self.feature_offset
        own = (indices >= a) & (indices < a + self.d_sae_local)
        return own, torch.where(own, indices - a, torch.zeros_like(indices))

    def _decode_part(self, values: Tensor, indices: Tensor, n: Optional[Tensor]) -> Tensor:
        own, loc = self._owned(indices)
        values = torch.where(own, values, torch.zeros_like(values))
        if n is not None:
            values = values * (1 / n)[loc]
        return reduce_from_group(sparse_decode(values, loc, self.W_dec), self.group)

    def decode(self, values: Tensor, indices: Tensor, n: Optional[Tensor], x: Tensor) -> Tensor:
        return self.add_skip(self._decode_part(values, indices, n) + self.b_dec, x)

    def _topk(self, x: Tensor, W: Tensor, b: Tensor, k: int, ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Merged top-k (no ReLU) of ``x @ W + b`` over the columns ``ids`` (all if None) of every rank."""
        cols = W.shape[1]
        if cols:
            acts = topk_encode(x, W, b, min(k, cols), b_dec=self.b_dec_in(), relu=False)
            v, i = acts.values, acts.indices if ids is None else ids[acts.indices]
        else:  # no local candidate (AuxK with no dead feature here): still join the collective
            v, i = x.new_zeros(x.shape[0], 0), torch.zeros(x.shape[0], 0, dtype=torch.int64, device=x.device)
        return merge_topk(v, i + self.feature_offset, k, self.group)

    def select(self, x: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        v, i = self._topk(x, W, b, self.global_cfg.k, None)
        return v.relu(), i

    def aux_loss(self, x, W, b, n, residual, dead_mask) -> Tensor:
        """SAELens's AuxK over the dead features of every rank (global count, merged top-k_aux)."""
        if dead_mask is None:
            return residual.new_zeros(())
        local_dead = dead_mask.sum().reshape(1).to(torch.int64)
        num_dead = int(_comm.all_reduce_(local_dead.clone(), self.group, "all_reduce (dead count)"))
        k_aux = x.shape[-1] // 2
        if num_dead == 0 or k_aux == 0:
            return residual.new_zeros(())
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        dead = dead_mask.nonzero().squeeze(1)
        vals, idx = self._topk(x, W[:, dead], b[dead], k_aux, dead)
        recons = self._decode_part(vals, idx, n)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        self._b_in = copy_to_group(self.b_dec, self.group) if self.cfg.apply_b_dec_to_input else None
        try:
            n = self.decoder_norm()
            W, b = self.effective_encoder(n)
            values, indices = self.select(x, W, b)
            sae_out = self.decode(values, indices, n, x)
            mse = mse_loss(sae_out, y)
            aux = self.aux_loss(x, W, b, n, (y - sae_out).detach(), dead_mask)
        finally:
            self._b_in = None
        own, loc = self._owned(indices)
        l0 = (values.detach() != 0).sum().to(torch.float32) / x.shape[0]
        counts, l0 = self._counts(torch.where(own, values, torch.zeros_like(values)), loc, l0)
        return StepOutput(loss=mse + aux, losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
                          sae_out=sae_out, fire_counts=counts, l0=l0)


class ShardedJumpReLUTrainingModule(_Shard, JumpReLUTrainingModule):
    """``JumpReLUTrainingModule`` over this rank's features: no merge at all. The local
    ``threshold_encode`` code is decoded locally and all-reduced; the per-row L0 is all-reduced too
    (forward sum, identity backward), so the straight-through threshold gradients, computed on the
    local slice from the replicated ``dL/dsae_out`` and ``dL/dL0``, are the single-process ones."""

    def __init__(self, cfg: TrainingConfig, group: _comm.Group = None, data_group: _comm.Group = None):
        self._shard_init(JumpReLUTrainingModule, cfg, group, data_group)

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        t = self.threshold.detach().to(x.dtype)
        b_in = copy_to_group(self.b_dec, self.group) if self.cfg.apply_b_dec_to_input else None
        acts = threshold_encode(x, self.W_enc, self.b_enc, t, b_dec=b_in)  # local indices
        l0_rows = (acts.values.detach() != 0).sum(-1).to(x.dtype)
        zero, l0_ste = ThresholdSTE.apply(self.threshold, self.sae_in(x).detach(), self.W_enc.detach(),
                                           self.b_enc.detach(), self.W_dec.detach(), l0_rows,
                                           self.cfg.jumprelu_bandwidth)
        part = reduce_from_group(sparse_decode(acts.values, acts.indices, self.W_dec), self.group)
        sae_out = self.add_skip(part + self.b_dec + zero, x)
        mse = mse_loss(sae_out, y)
        l0_global = reduce_from_group(l0_ste, self.group)
        l0_loss = (coefficients["l0"] * l0_global).mean()
        counts, l0 = self._counts(acts.values, acts.indices, l0_global.detach().mean())
        return StepOutput(loss=mse + l0_loss, losses={"mse_loss": mse, "l0_loss": l0_loss},
                          sae_out=sae_out, fire_counts=counts, l0=l0)


def _reduce_columns(parts: list[Tensor], group: _comm.Group) -> list[Tensor]:
    """Sum every part (``[N, c_i]``, one dtype) over ``group`` in ONE all-reduce; identity backward."""
    sizes = [t.shape[-1] for t in parts]
    return list(reduce_from_group(torch.cat(parts, -1), group).split(sizes, -1))


def _lp_sum(a: Tensor, p: float) -> Tensor:
    """``sum_f a[:, f]^p`` ``[N, 1]`` of ``a [N, d] >= 0``: the local part of ``||a||_p^p``. Zero entries
    get a zero gradient, as in torch's norm backward (``0^(p-1)`` would be inf for ``p < 1``)."""
    pos = a > 0
    return torch.where(pos, torch.where(pos, a, torch.ones_like(a)).pow(p), torch.zeros_like(a)).sum(
        -1, keepdim=True)


def _lp_root(s: Tensor, p: float) -> Tensor:
    """``s^(1/p)`` (``s >= 0``, the all-reduced :func:`_lp_sum`) with a zero gradient where ``s == 0``
    (torch's norm backward there; the plain power would give inf * 0 = nan for ``p > 1``)."""
    pos = s > 0
    return torch.where(pos, torch.where(pos, s, torch.ones_like(s)).pow(1.0 / p), torch.zeros_like(s))


class ShardedStandardTrainingModule(_Shard, StandardTrainingModule):
    """``StandardTrainingModule`` (ReLU + L1 / Lp) over this rank's features: no merge. The local dense
    code ``f [N, d_sae_local]`` is decoded locally; the partial decode ``[N, d_out]`` and the per-row
    ``sum_f (f * ||W_dec[f]||)^p`` ``[N, 1]`` are summed over ``group`` in one all-reduce, then raised
    to ``1/p``: the loss equals the single-process one and each rank's gradients are its slice of the
    single-process gradients (replicated ``dL/dsae_out`` and ``dL/dsparsity``)."""

    def __init__(self, cfg: TrainingConfig, group: _comm.Group = None, data_group: _comm.Group = None):
        self._shard_init(StandardTrainingModule, cfg, group, data_group)

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        p = self.cfg.lp_norm
        f = (self._sae_in(x) @ self.W_enc + self.b_enc).relu()  # [N, d_sae_local]
        fired = f.detach() != 0
        part, lp = _reduce_columns([f @ self.W_dec, _lp_sum(f * self.W_dec.norm(dim=1), p)], self.group)
        sae_out = self.add_skip(part + self.b_dec, x)
        mse = mse_loss(sae_out, y)
        l1 = (coefficients["l1"] * _lp_root(lp.squeeze(-1), p)).mean()
        counts, l0 = self._data_counts(fired.sum(0).float(), self._dense_l0(fired))
        return StepOutput(loss=mse + l1, losses={"mse_loss": mse, "l1_loss": l1},
                          sae_out=sae_out, fire_counts=counts, l0=l0)


class ShardedGatedTrainingModule(_Shard, GatedTrainingModule):
    """``GatedTrainingModule`` over this rank's features (``b_gate``, ``r_mag``, ``b_mag`` sliced with
    ``W_enc``): gate and magnitude paths are per feature, hence local. The partial decode, the partial
    gate-path decode ``relu(pi_gate) @ W_dec`` (auxiliary loss), both ``[N, d_in]``, and the per-row L1
    sum ``[N, 1]`` are summed over ``group`` in one all-reduce; ``b_dec`` is added once after it."""

    def __init__(self, cfg: TrainingConfig, group: _comm.Group = None, data_group: _comm.Group = None):
        self._shard_init(GatedTrainingModule, cfg, group, data_group)

    def forward_train(self, x, y, dead_mask, coefficients) -> StepOutput:
        xc = self._sae_in(x)
        pi_gate = xc @ self.W_enc + self.b_gate  # [N, d_sae_local]
        mag = (xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        f = (pi_gate > 0).to(x.dtype) * mag
        pi_gate_act = pi_gate.relu()
        fired = f.detach() != 0
        l1_local = (pi_gate_act * self.W_dec.norm(dim=1)).sum(-1, keepdim=True)
        part, gate_part, l1_rows = _reduce_columns([f @ self.W_dec, pi_gate_act @ self.W_dec, l1_local],
                                                   self.group)
        sae_out = part + self.b_dec
        mse = mse_loss(sae_out, y)
        l1 = coefficients["l1"] * l1_rows.mean()
        aux = mse_loss(gate_part + self.b_dec, y)
        counts, l0 = self._data_counts(fired.sum(0).float(), self._dense_l0(fired))
        return StepOutput(loss=mse + l1 + aux,
                          losses={"mse_loss": mse, "l1_loss": l1, "auxiliary_reconstruction_loss": aux},
                          sae_out=sae_out, fire_counts=counts, l0=l0)


_MODULES = {"topk": ShardedTopKTrainingModule, "jumprelu": ShardedJumpReLUTrainingModule,
            "standard": ShardedStandardTrainingModule, "gated": ShardedGatedTrainingModule}


class ShardedReducer(Reducer):
    """The :class:`~sparsekern.training.Reducer` of feature-sharded training (see the module docstring).

    ``group``: the ranks that split the features; they see the same batch, and the sharded modules
    already combine the forward (merged top-k, all-reduced decode, L0 and firing counts over data
    replicas). What is left for the step: the gradient norm over the feature shards (clipping), the
    dead fraction over every feature, and, with ``data_group`` (replicas of this shard, equal batch
    sizes), the mean gradient, the row count and the mean metrics of all replicas; sums and the
    ``b_dec`` initialisation rows over replicas go through a :class:`~.ddp.DataParallelReducer` of
    ``data_group``.
    """

    def __init__(self, group: _comm.Group = None, data_group: _comm.Group = None):
        self.group, self.data_group = group, data_group
        self.data = DataParallelReducer(data_group) if data_group is not None else None
        self.d_sae = 0

    def attach(self, cfg: TrainingConfig, module: nn.Module) -> None:
        self.d_sae = cfg.d_sae  # the run's, not the shard's
        if self.data is not None:
            self.data.device = torch.device(cfg.device)

    def start_step(self, n_rows: int) -> int:
        return n_rows * (self.data.world_size if self.data is not None else 1)

    def sum(self, values, what: str) -> list[float]:
        return self.data.sum(values, what) if self.data is not None else super().sum(values, what)

    def gather_rows(self, y: Tensor) -> Tensor:
        return self.data.gather_rows(y) if self.data is not None else y

    def reduce_gradients(self, module: nn.Module) -> None:
        if self.data is None:
            return
        world = self.data.world_size
        for p in module.parameters():  # mean over replicas (equal batch sizes: the mean loss's gradient)
            if p.grad is not None:
                _comm.all_reduce_(p.grad, self.data_group, "all_reduce (data-parallel grads)").div_(world)

    def clip_gradients(self, module: nn.Module, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient: the feature-sharded parameters' squared norms
        summed over ``group``, the replicated ones counted once."""
        params = [p for p in module.parameters() if p.grad is not None]
        sharded = {id(p) for n, p in module.named_parameters() if n in FEATURE_DIM}
        # per-tensor norms in the grads' dtype (as clip_grad_norm_), squared and summed in float64
        norm2 = {id(p): torch.linalg.vector_norm(p.grad.detach()).double() ** 2 for p in params}
        sq = [v for i, v in norm2.items() if i in sharded]
        rep = [v for i, v in norm2.items() if i not in sharded]
        dev = params[0].device if params else torch.device("cpu")
        local = torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64, device=dev)
        total = _comm.all_reduce_(local.reshape(1), self.group, "all_reduce (grad norm)")[0]
        total = total + (torch.stack(rep).sum() if rep else 0.0)  # replicated: counted once
        norm = float(total.sqrt())
        coef = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if coef < 1:
            for p in params:
                p.grad.detach().mul_(coef)
        return norm

    def step_metrics(self, out: StepOutput, y: Tensor, counts: Tensor, n_rows: int,
                     n_total: int) -> dict[str, float]:
        m = local_step_metrics(out, y)  # the forward is already global over the feature group
        if self.data is not None:  # means over rows: the mean of equal-size replicas' means
            keys = ["loss", "mse", *out.losses]
            t = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=y.device)
            t = _comm.all_reduce_(t, self.data_group, "all_reduce (metrics)")
            t = t / self.data.world_size
            m.update(zip(keys, t.tolist()))
        return m

    def dead_fraction(self, dead: Tensor) -> float:
        n = dead.sum().reshape(1).to(torch.float64)
        return float(_comm.all_reduce_(n, self.group)[0]) / self.d_sae


class ShardedTrainer(SAETrainer):
    """``SAETrainer`` over a feature-sharded TopK / JumpReLU / standard / gated module (see the module
    docstring): the trainer's own step, with this rank's sharded training module and a
    :class:`ShardedReducer`.

    ``group``: the ranks that split the features (default: WORLD). ``data_group``: optional data
    replicas of this shard. ``step``/``fit`` are called on every rank (same batch within ``group``).
    ``to_inference()`` returns a :class:`ShardedSAE`; ``to_inference().to_sae()`` the full SAE.
    ``save_checkpoint`` / ``resume``: one folder per rank, same world size and groups to resume.
    """

    def __init__(self, cfg: TrainingConfig, group: _comm.Group = None, data_group: _comm.Group = None):
        if cfg.architecture not in _MODULES:
            why = (": BatchTopK selects its top k x N over the whole batch x all features, a global "
                   "selection that no feature shard can make locally" if cfg.architecture == "batchtopk"
                   else "")
            raise NotImplementedError(
                f"ShardedTrainer cannot train cfg.architecture={cfg.architecture!r}{why} (sharded: "
                f"{', '.join(_MODULES)})")
        same = {k: v for k, v in cfg.to_dict().items() if k != "device"}
        _comm.check_agree("the training config", same, group)
        module = _MODULES[cfg.architecture](cfg, group, data_group).to(torch.device(cfg.device))
        module.initialize_weights(cfg.seed)
        super().__init__(cfg, module, reducer=ShardedReducer(group, data_group))
        self.group, self.data_group = group, data_group

    def to_inference(self) -> ShardedSAE:
        """This rank's shard of the inference SAE (folded as ``SAETrainer.to_inference``)."""
        cfg_dict, sd = inference_state(self.sae, self.scaling_factor)
        cfg_dict.update(d_sae=self.cfg.d_sae, **({"k": self.cfg.k} if "k" in cfg_dict else {}))
        return ShardedSAE.from_local_state_dict(cfg_dict, sd, self.group)

    @staticmethod
    def _folder(path: Union[str, Path]) -> Path:
        return Path(path) / f"rank{dist.get_rank()}-of-{dist.get_world_size()}"

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """Each rank writes its state (shard, Adam moments, counters, RNG) to ``path/rank<r>-of-<R>``
        (safetensors + JSON, atomically); collective. The SAE itself: ``to_inference().save_model``."""
        _comm.require_initialized()
        tensors, meta = self.trainer_state()
        meta.update(format="sparsekern-sharded-trainer/1", feature_offset=self.sae.feature_offset,
                    d_sae_local=self.sae.d_sae_local)
        out = ckpt.write_atomic(self._folder(path), lambda f: ckpt.save_state(f, tensors, meta))
        _comm.collective("barrier (save_checkpoint)", lambda: dist.barrier())
        return out.parent

    checkpoint = save_checkpoint

    @classmethod
    def resume(cls, path: Union[str, Path], device: Optional[str] = None, group: _comm.Group = None,
               data_group: _comm.Group = None) -> "ShardedTrainer":
        """Continue a :meth:`save_checkpoint` run with the same world size and groups."""
        _comm.require_initialized()
        folder = cls._folder(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no checkpoint for this rank at {folder} (saved with another world size?)")
        tensors, meta = ckpt.load_state(folder)
        tr = cls(ckpt.saved_config(folder, meta, device), group, data_group)
        saved = ckpt.checked(folder, lambda: (meta["feature_offset"], meta["d_sae_local"]))
        if (tr.sae.feature_offset, tr.sae.d_sae_local) != saved:
            raise ValueError(f"{folder} holds features at offset {meta['feature_offset']} "
                             f"(x{meta['d_sae_local']}); this rank's group gives {tr.sae.feature_offset} "
                             f"(x{tr.sae.d_sae_local}): resume with the groups of the saved run")
        ckpt.checked(folder, lambda: tr.load_trainer_state(tensors, meta))
        return tr
