"""``SAETrainer``: one SAE / transcoder, one Adam optimiser, SAELens's training loop.

Per ``step(x [N, d_in], y [N, d_out] | None)``, as SAELens 6.54's ``SAETrainer._train_step``:

1. ``expected_average_only_in``: inputs (and transcoder targets) times ``s = sqrt(d_in) / E||x||``,
   estimated once (``fit``: from the first ``n_batches_for_norm_estimate`` batches, which are then
   trained on; a bare ``step``: from its batch). Folded into the weights at export.
2. ``b_dec`` set once from the first batch's targets (``b_dec_init_method``: zeros = SAELens 6,
   ``mean``, or ``geometric_median`` by Weiszfeld iterations).
3. forward with the dead mask ``n_forward_passes_since_fired > dead_feature_window`` and the warmed-up
   coefficients; backward; gradient-norm clipping (``max_grad_norm``, SAELens: 1.0); Adam with the
   scheduled learning rate; optional unit-norm decoder rows (``normalize_sae_decoder``).
4. dead-feature counters and feature-firing frequencies (window ``feature_sampling_window``).

Returned metrics: ``loss``, each named loss, ``mse`` (per-row squared error summed over dims, mean
over rows: SAELens's convention), ``l0``, ``explained_variance`` (SAELens's training formula
``1 - mean_rows ||y - y_hat||^2 / mean_rows ||y - mean(y)||^2``), ``dead_fraction``, ``lr`` (and
``skipped_batches`` with ``skip_nonfinite``).

Bad input is refused before the optimiser runs (:mod:`.guards`): non-float activations (tokens passed by
mistake), and NaN / inf in the inputs, the loss terms or the gradient norm (:class:`NonFiniteError`
naming the step and what was not finite; ``TrainingConfig.skip_nonfinite`` skips such a batch instead).

Across processes, the trainer combines what it must through its :class:`~.reducer.Reducer` (gradients,
firing counts, metric and evaluation sums); the default one is local and does nothing.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .base import TrainingModule
from .config import TrainingConfig
from .export import to_inference
from .guards import NonFiniteError, check_float, count_nonfinite, nonfinite, refusal
from .reducer import LOCAL, Reducer
from .schedule import coefficient, lr_factor

Batch = Union[Tensor, tuple[Tensor, Tensor]]


def build_module(cfg: TrainingConfig) -> TrainingModule:
    """The training module of ``cfg.architecture`` (weights not initialised)."""
    from .gated import GatedTrainingModule
    from .jumprelu import JumpReLUTrainingModule
    from .standard import StandardTrainingModule
    from .topk import BatchTopKTrainingModule, TopKTrainingModule

    cls = {
        "standard": StandardTrainingModule,
        "topk": TopKTrainingModule,
        "batchtopk": BatchTopKTrainingModule,
        "jumprelu": JumpReLUTrainingModule,
        "gated": GatedTrainingModule,
    }[cfg.architecture]
    return cls(cfg)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm on ``points [N, d]`` (float64 inside) -> ``[d]``."""
    p = points.double()
    m = p.mean(0)
    for _ in range(max_iter):
        w = 1 / (p - m).norm(dim=-1).clamp(min=1e-12)
        new = (w[:, None] * p).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, m.norm().item()):
            m = new
            break
        m = new
    return m.to(points.dtype)


def split_batch(batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
    """``(x [N, d_in], y [N, d_out] or None)`` of a batch: a tensor ``x``, or an ``(x, y)`` pair
    (transcoders)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch must be a tensor or an (x, y) pair, got a sequence of {len(batch)}")
        return batch[0], batch[1]
    return batch, None


_split = split_batch  # deprecated private name, kept for old imports


class SAETrainer:
    """Trains one SAE / transcoder described by a :class:`TrainingConfig` (see the module docstring).

    ``sae``: optional starting weights: a training module of the same architecture (used as is, e.g. a
    feature shard of ``sparsekern.distributed``), or a sparsekern inference SAE whose parameters
    (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``, ...) are copied (unfolded: use it with
    ``rescale_acts_by_decoder_norm=False`` / no activation scaling).
    ``reducer``: how the step combines across processes (:class:`~.reducer.Reducer`; default: one
    process, nothing to combine).
    """

    def __init__(self, cfg: TrainingConfig, sae: Optional[Any] = None, *, reducer: Optional[Reducer] = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.reducer = LOCAL if reducer is None else reducer
        if isinstance(sae, TrainingModule):
            self.sae = sae.to(self.device)
        else:
            self.sae = build_module(cfg)
            self.sae.initialize_weights(cfg.seed)
            if sae is not None:
                own = self.sae.state_dict()
                src = {k: v for k, v in sae.state_dict().items() if k in own}
                self.sae.load_state_dict({**own, **src})
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2)
        )
        n_latents = self.sae.n_latents  # a feature shard counts its own latents
        self.n_training_steps = 0
        self.n_training_tokens = 0
        self.n_skipped_batches = 0
        self.n_forward_passes_since_fired = torch.zeros(n_latents, device=self.device)
        self.act_freq_scores = torch.zeros(n_latents, device=self.device)
        self.n_frac_active_samples = 0
        self.scaling_factor: Optional[float] = None
        self.b_dec_initialized = cfg.b_dec_init_method == "zeros"
        self.last_eval: dict[str, float] = {}
        self.reducer.attach(cfg, self.sae)

    # ---- state -----------------------------------------------------------------------------------
    @property
    def dead_neurons(self) -> Tensor:
        """``[n_latents]`` bool: not fired for more than ``dead_feature_window`` steps (SAELens)."""
        return self.n_forward_passes_since_fired > self.cfg.dead_feature_window

    @property
    def feature_sparsity(self) -> Tensor:
        """``[n_latents]`` firing frequency over the current sampling window."""
        return self.act_freq_scores / max(self.n_frac_active_samples, 1)

    @property
    def log_feature_sparsity(self) -> Tensor:
        """``log10(feature_sparsity + 1e-10)`` on CPU (what SAELens writes to ``sparsity.safetensors``)."""
        return torch.log10(self.feature_sparsity + 1e-10).detach().cpu()

    def coefficients(self) -> dict[str, float]:
        c, s = self.cfg, self.n_training_steps
        return {
            "l1": coefficient(s, c.l1_coefficient, c.l1_warm_up_steps),
            "l0": coefficient(s, c.l0_coefficient, c.l0_warm_up_steps),
        }

    # ---- data preparation ------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_scaling_factor(self, batches: Iterable[Batch]) -> float:
        """``sqrt(d_in) / E||x||`` over ``batches`` (SAELens's ``ActivationScaler``) of every process;
        sets and returns it. Each batch's float32 norms are summed in float32; those sums are added in
        float64, over batches and then (``reducer.sum``) over processes. A batch with NaN / inf norms
        raises :class:`NonFiniteError` (with ``skip_nonfinite``: is left out of the estimate)."""
        total, count, bad = 0.0, 0, 0
        for b in batches:
            x = split_batch(b)[0]
            check_float(x, "x", f"[N, d_in={self.cfg.d_in}]")
            norms = x.float().norm(dim=-1)  # float32 norms, as SAELens
            s = norms.sum().item()
            if not math.isfinite(s):
                bad += 1
                continue
            total += s
            count += norms.numel()
        total, count, bad = self.reducer.sum([total, float(count), float(bad)], "scaling factor")
        if bad and not self.cfg.skip_nonfinite:
            raise NonFiniteError(
                f"SAETrainer.estimate_scaling_factor: {int(bad)} batch(es) have NaN / inf activation norms "
                "(NaN / inf values, or values too large for float32); clean the activations, or set "
                "TrainingConfig(skip_nonfinite=True) to leave them out",
                self.n_training_steps, ["norm estimate"])
        if count == 0 or total == 0:
            raise ValueError("estimate_scaling_factor: no non-zero activations to estimate the norm from")
        self.scaling_factor = math.sqrt(self.cfg.d_in) / (total / count)
        return self.scaling_factor

    def _validate(self, x: Tensor, y: Optional[Tensor]) -> None:
        cfg = self.cfg
        check_float(x, "x", f"[N, d_in={cfg.d_in}]")
        if x.dim() != 2 or x.shape[1] != cfg.d_in:
            raise ValueError(f"x must be [N, d_in={cfg.d_in}], got {tuple(x.shape)}")
        if y is None:
            if cfg.transcoder:
                raise ValueError("a transcoder needs targets: pass y [N, d_out] (or (x, y) batches)")
            return
        check_float(y, "y", f"[N, d_out={cfg.d_out}]")
        if y.shape != (x.shape[0], cfg.d_out):
            raise ValueError(f"y must be [N={x.shape[0]}, d_out={cfg.d_out}], got {tuple(y.shape)}")

    def _to_device(self, x: Tensor, y: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        dt = self.cfg.torch_dtype
        x = x.to(self.device, dt)
        return x, (x if y is None else y.to(self.device, dt))

    def _scale(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.normalize_activations == "expected_average_only_in":
            if self.scaling_factor is None:
                self.estimate_scaling_factor([x])
            x, y = x * self.scaling_factor, y * self.scaling_factor
        return x, y

    def _prepare(self, x: Tensor, y: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Checked, on the device in the training dtype, scaled: ``(x [N, d_in], y [N, d_out])``."""
        self._validate(x, y)
        return self._scale(*self._to_device(x, y))

    @torch.no_grad()
    def _init_b_dec(self, y: Tensor) -> None:
        m = self.cfg.b_dec_init_method
        y = self.reducer.gather_rows(y)  # the first batch of every process, in rank order
        self.sae.b_dec.copy_(y.mean(0) if m == "mean" else geometric_median(y))
        self.b_dec_initialized = True

    # ---- training --------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Optional[Tensor] = None) -> dict[str, float]:
        """One optimiser step on ``x [N, d_in]`` (``y [N, d_out]`` for transcoders); returns metrics.

        Refuses non-float activations (``TypeError``) and, before the optimiser runs, NaN / inf in ``x``,
        ``y``, a loss term or the gradient norm (:class:`NonFiniteError`; nothing changes). With
        ``cfg.skip_nonfinite`` such a batch is skipped instead: the step returns ``{"skipped": 1.0,
        "skipped_batches": n}`` and warns, and ``n_training_steps`` does not advance.

        With ``cfg.flush_denormal`` (default) CPU denormals are flushed to zero during the step (and
        the flag is cleared after): Adam's second moments of rarely firing latents decay into the
        denormal range, where CPU arithmetic is ~70x slower.
        """
        flush = self.cfg.flush_denormal and self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            return self._step(x, y)
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def _step(self, x: Tensor, y: Optional[Tensor]) -> dict[str, float]:
        cfg, sae, red = self.cfg, self.sae, self.reducer
        self._validate(x, y)
        n_rows = int(x.shape[0])
        n_total = red.start_step(n_rows)
        x, y = self._to_device(x, y)
        # NaN / inf in the inputs are counted here, on the unscaled batch, but read back together with the
        # loss's and the gradient's after the backward: the checks cost one host synchronisation per step
        # (the snapshot undoes what the forward changed). A step that estimates the scaling factor reads
        # them at once: the estimate would otherwise meet them first and blame the norm.
        in_counts = count_nonfinite(x, y if cfg.transcoder else None)
        if cfg.normalize_activations == "expected_average_only_in" and self.scaling_factor is None:
            bad, in_counts = nonfinite(red, in_counts), []
            if bad:
                return self._refuse(*bad)
        saved = self._snapshot()
        x, y = self._scale(x, y)
        if not self.b_dec_initialized:
            self._init_b_dec(y)
        sae.train()
        out = sae.forward_train(x, y, self.dead_neurons, self.coefficients())
        red.loss_for_backward(out.loss, n_rows, n_total).backward()
        red.reduce_gradients(sae)  # before clipping: the norm is the whole batch's
        norm = red.clip_gradients(sae, cfg.max_grad_norm) if cfg.max_grad_norm is not None else None
        bad = nonfinite(red, in_counts, out, norm)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(saved)
            return self._refuse(*bad)
        lr = cfg.lr * lr_factor(self.n_training_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if cfg.normalize_sae_decoder:
                sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            counts = red.fire_counts(out.fire_counts)
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[counts > 0] = 0
            self.act_freq_scores += counts
            self.n_frac_active_samples += n_total
            metrics = red.step_metrics(out, y, counts, n_rows, n_total)
            metrics["dead_fraction"] = red.dead_fraction(self.dead_neurons)
        self.n_training_steps += 1
        self.n_training_tokens += n_total
        metrics["lr"] = lr
        if cfg.skip_nonfinite:
            metrics["skipped_batches"] = float(self.n_skipped_batches)
        if self.n_training_steps % cfg.feature_sampling_window == 0:
            self.act_freq_scores.zero_()
            self.n_frac_active_samples = 0
        return metrics

    # ---- refusing non-finite steps -----------------------------------------------------------------
    def _snapshot(self) -> tuple[Any, ...]:
        """What a step may change before the optimiser runs: the scaling factor (a bare first step
        estimates it), ``b_dec`` (initialised from the first batch), the module's buffers (BatchTopK's
        threshold EMA is updated by the forward) and JumpReLU's ``threshold [d_sae]`` (clamped to >= 0
        by the forward). All small: ``[d_out]``, ``[d_sae]`` or scalars."""
        b_dec = None if self.b_dec_initialized else self.sae.b_dec.detach().clone()
        small = {n: b.detach().clone() for n, b in self.sae.named_buffers()}
        if isinstance(getattr(self.sae, "threshold", None), torch.nn.Parameter):
            small["threshold"] = self.sae.threshold.detach().clone()
        return self.scaling_factor, self.b_dec_initialized, b_dec, small

    @torch.no_grad()
    def _restore(self, saved: tuple[Any, ...]) -> None:
        self.scaling_factor, self.b_dec_initialized, b_dec, buffers = saved
        if b_dec is not None:
            self.sae.b_dec.copy_(b_dec)
        for name, value in buffers.items():
            target = self.sae.threshold if name == "threshold" else self.sae.get_buffer(name)
            target.copy_(value)

    def _refuse(self, what: list[str], detail: str) -> dict[str, float]:
        step = self.n_training_steps
        if not self.cfg.skip_nonfinite:
            raise NonFiniteError(refusal(step, what, detail, skip=False), step, what)
        self.n_skipped_batches += 1
        warnings.warn(refusal(step, what, detail, skip=True) + f"; {self.n_skipped_batches} skipped so far",
                      RuntimeWarning, stacklevel=4)
        return {"skipped": 1.0, "skipped_batches": float(self.n_skipped_batches)}

    def fit(
        self,
        batches: Iterable[Batch],
        n_steps: Optional[int] = None,
        progress: bool = True,
        eval_batches: Optional[Iterable[Batch]] = None,
        model: Any = None,
        eval_tokens: Optional[Iterable[Tensor]] = None,
    ):
        """Step through ``batches`` (tensors, or ``(x, y)`` pairs for transcoders) and return the
        inference SAE (:meth:`to_inference`).

        ``n_steps``: steps to run in this call (default: what is left of ``cfg.total_training_steps``);
        stops early when ``batches`` runs out. Every ``cfg.eval_every_n_steps`` steps, if
        ``eval_batches`` (a re-iterable) or ``model`` + ``eval_tokens`` are given, :meth:`evaluate`
        runs. ``cfg.n_checkpoints`` checkpoints are written evenly under ``cfg.checkpoint_path``.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        if n_steps is None:
            n_steps = max(0, cfg.total_training_steps - self.n_training_steps)
        it = self.reducer.batches(batches)
        if cfg.normalize_activations == "expected_average_only_in" and self.scaling_factor is None:
            head = list(itertools.islice(it, cfg.n_batches_for_norm_estimate))
            self.estimate_scaling_factor(head)
            it = itertools.chain(head, it)
        ck_every = n_steps // (cfg.n_checkpoints + 1) if cfg.n_checkpoints else 0
        pbar = tqdm(total=n_steps, disable=not progress, desc=f"training {cfg.architecture}")
        done = 0
        try:
            for batch in it:
                if done >= n_steps:
                    break
                x, y = split_batch(batch)
                m = self.step(x, y)
                if m.get("skipped"):  # skip_nonfinite: no step was taken
                    pbar.set_postfix(skipped=self.n_skipped_batches)
                    continue
                done += 1
                pbar.update(1)
                if done % 10 == 0 or done == n_steps:
                    pbar.set_postfix(
                        loss=f"{m['loss']:.4g}", l0=f"{m['l0']:.1f}", ev=f"{m['explained_variance']:.3f}"
                    )
                if (
                    cfg.eval_every_n_steps
                    and self.n_training_steps % cfg.eval_every_n_steps == 0
                    and (eval_batches is not None or model is not None)
                ):
                    self.last_eval = self.evaluate(eval_batches, model=model, eval_tokens=eval_tokens)
                if ck_every and done % ck_every == 0 and done < n_steps and cfg.checkpoint_path:
                    self.save_checkpoint(Path(cfg.checkpoint_path) / f"step_{self.n_training_steps}")
        finally:
            pbar.close()
        return self.to_inference()

    @torch.no_grad()
    def evaluate(
        self,
        batches: Optional[Iterable[Batch]] = None,
        model: Any = None,
        eval_tokens: Optional[Iterable[Tensor]] = None,
    ) -> dict[str, float]:
        """Held-out metrics: ``mse``, ``explained_variance`` (over all rows: ``1 - sum res / sum ||y -
        mean||^2``, SAELens's eval formula), ``l0``, ``dead_fraction``; with ``model`` and
        ``eval_tokens``, ``sparsekern.features.metrics.reconstruction_metrics``'s CE / KL scores too
        (``ce_loss_score`` = CE loss recovered). Up to ``cfg.n_eval_batches`` batches; the sums go
        through the reducer (data parallel: over every process's rows, so every process reports what
        one process reports on all of them)."""
        res_sum, n, l0_sum = 0.0, 0, 0.0
        sums, sq = None, 0.0
        self.sae.eval()
        for i, b in enumerate(batches or []):
            if i >= self.cfg.n_eval_batches:
                break
            x, y = self._prepare(*split_batch(b))
            out = self.sae.forward_train(x, y, None, self.coefficients())
            yd = y.double()
            res_sum += (out.sae_out.double() - yd).pow(2).sum().item()
            l0_sum += out.l0.item() * x.shape[0]
            sums = yd.sum(0) if sums is None else sums + yd.sum(0)
            sq += yd.pow(2).sum().item()
            n += x.shape[0]
        self.sae.train()
        # sums, not per-process ratios: a mean of the processes' explained variances is not the whole's
        vec = sums.tolist() if sums is not None else [0.0] * self.cfg.d_out  # no rows here: adds zeros
        tot = self.reducer.sum([res_sum, float(n), l0_sum, sq, *vec], "evaluation sums")
        res_sum, n, l0_sum, sq = tot[:4]
        m: dict[str, float] = {"dead_fraction": self.reducer.dead_fraction(self.dead_neurons)}
        if n:
            var = sq - (torch.tensor(tot[4:], dtype=torch.float64).pow(2).sum().item() / n)
            m.update(
                mse=res_sum / n,
                l0=l0_sum / n,
                explained_variance=1 - res_sum / var if var > 0 else float("nan"),
            )
        if model is not None and eval_tokens is not None:
            r = self.reducer.reconstruction_metrics(model, self.to_inference(), eval_tokens)
            m.update({f"model_{k}": v for k, v in r.to_dict().items() if isinstance(v, float)})
        return m

    # ---- export / checkpoints --------------------------------------------------------------------
    def to_inference(self):
        """The sparsekern SAE / transcoder of the matching architecture (folded; BatchTopK -> JumpReLU)."""
        return to_inference(self.sae, self.scaling_factor)

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """SAELens disk format (via the inference SAE's ``save_model``) + trainer state, atomically."""
        sae_inf = self.to_inference()

        def write(folder: Path) -> None:
            sae_inf.save_model(folder, sparsity=self.log_feature_sparsity)
            ckpt.save_state(folder, *self.trainer_state())

        return ckpt.write_atomic(Path(path), write)

    checkpoint = save_checkpoint

    def trainer_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)`` of the trainer state (module, optimiser, counters, RNG) for a checkpoint:
        :func:`.checkpoint.trainer_state`; :meth:`load_trainer_state` restores it."""
        return ckpt.trainer_state(self)

    def load_trainer_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`trainer_state` returned (:func:`.checkpoint.load_trainer_state`)."""
        ckpt.load_trainer_state(self, tensors, meta)

    @classmethod
    def resume(cls, path: Union[str, Path], device: Optional[str] = None) -> "SAETrainer":
        """A trainer continuing exactly where :meth:`save_checkpoint` left off. A file of the checkpoint
        that cannot be read, or a state that does not fit, raises an error naming it."""
        path = Path(path)
        tensors, meta = ckpt.load_state(path)
        tr = cls(ckpt.saved_config(path, meta, device))
        ckpt.checked(path, lambda: tr.load_trainer_state(tensors, meta))
        return tr

    def optimizer_load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore the Adam state from a checkpoint's flat ``optim.<i>.<key>`` tensors and ``meta``."""
        opt = {
            k: v.to(self.device) if not k.endswith(".step") else v
            for k, v in tensors.items()
            if k.startswith("optim.")
        }
        ckpt.optimizer_from_flat(self.optimizer, opt, meta["optimizer"])
