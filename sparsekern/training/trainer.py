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
``1 - mean_rows ||y - y_hat||^2 / mean_rows ||y - mean(y)||^2``), ``dead_fraction``, ``lr``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

from . import checkpoint as ckpt
from ._base import TrainingModule
from .config import TrainingConfig
from .export import to_inference
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


def _split(batch: Batch) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch must be a tensor or an (x, y) pair, got a sequence of {len(batch)}")
        return batch[0], batch[1]
    return batch, None


class SAETrainer:
    """Trains one SAE / transcoder described by a :class:`TrainingConfig` (see the module docstring).

    ``sae``: optional starting weights: a training module of the same architecture, or a sparsekern
    inference SAE whose parameters (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``, ...) are
    copied (unfolded: use it with ``rescale_acts_by_decoder_norm=False`` / no activation scaling).
    """

    def __init__(self, cfg: TrainingConfig, sae: Optional[Any] = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
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
        d_sae = cfg.d_sae
        self.n_training_steps = 0
        self.n_training_tokens = 0
        self.n_forward_passes_since_fired = torch.zeros(d_sae, device=self.device)
        self.act_freq_scores = torch.zeros(d_sae, device=self.device)
        self.n_frac_active_samples = 0
        self.scaling_factor: Optional[float] = None
        self.b_dec_initialized = cfg.b_dec_init_method == "zeros"
        self.last_eval: dict[str, float] = {}

    # ---- state -----------------------------------------------------------------------------------
    @property
    def dead_neurons(self) -> Tensor:
        """``[d_sae]`` bool: not fired for more than ``dead_feature_window`` steps (SAELens)."""
        return self.n_forward_passes_since_fired > self.cfg.dead_feature_window

    @property
    def feature_sparsity(self) -> Tensor:
        """``[d_sae]`` firing frequency over the current sampling window."""
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
        """``sqrt(d_in) / E||x||`` over ``batches`` (SAELens's ``ActivationScaler``); sets and returns it."""
        total, count = 0.0, 0
        for b in batches:
            x = _split(b)[0]
            norms = x.float().norm(dim=-1)
            total += norms.sum().item()
            count += norms.numel()
        if count == 0 or total == 0:
            raise ValueError("estimate_scaling_factor: no non-zero activations to estimate the norm from")
        self.scaling_factor = math.sqrt(self.cfg.d_in) / (total / count)
        return self.scaling_factor

    def _prepare(self, x: Tensor, y: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        if x.dim() != 2 or x.shape[1] != cfg.d_in:
            raise ValueError(f"x must be [N, d_in={cfg.d_in}], got {tuple(x.shape)}")
        if y is None:
            if cfg.transcoder:
                raise ValueError("a transcoder needs targets: pass y [N, d_out] (or (x, y) batches)")
        elif y.shape != (x.shape[0], cfg.d_out):
            raise ValueError(f"y must be [N={x.shape[0]}, d_out={cfg.d_out}], got {tuple(y.shape)}")
        x = x.to(self.device, cfg.torch_dtype)
        y = x if y is None else y.to(self.device, cfg.torch_dtype)
        if cfg.normalize_activations == "expected_average_only_in":
            if self.scaling_factor is None:
                self.estimate_scaling_factor([x])
            x, y = x * self.scaling_factor, y * self.scaling_factor
        return x, y

    @torch.no_grad()
    def _init_b_dec(self, y: Tensor) -> None:
        m = self.cfg.b_dec_init_method
        self.sae.b_dec.copy_(y.mean(0) if m == "mean" else geometric_median(y))
        self.b_dec_initialized = True

    # ---- training --------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Optional[Tensor] = None) -> dict[str, float]:
        """One optimiser step on ``x [N, d_in]`` (``y [N, d_out]`` for transcoders); returns metrics.

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
        cfg, sae = self.cfg, self.sae
        x, y = self._prepare(x, y)
        if not self.b_dec_initialized:
            self._init_b_dec(y)
        sae.train()
        out = sae.forward_train(x, y, self.dead_neurons, self.coefficients())
        self._backward(out)
        self._clip_grads()
        lr = cfg.lr * lr_factor(self.n_training_steps, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if cfg.normalize_sae_decoder:
                sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            counts = self._fire_counts(out)
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[counts > 0] = 0
            self.act_freq_scores += counts
            self.n_frac_active_samples += self._rows(x)
            metrics = self._metrics(out, y)
        self.n_training_steps += 1
        self.n_training_tokens += self._rows(x)
        metrics["lr"] = lr
        if self.n_training_steps % cfg.feature_sampling_window == 0:
            self.act_freq_scores.zero_()
            self.n_frac_active_samples = 0
        return metrics

    # hooks of _step, overridden by sparsekern.distributed: ShardedTrainer (global norm; rows of every data
    # replica) and DistributedSAETrainer (scaled loss + all-reduced grads; counts and metrics of all ranks)
    def _backward(self, out) -> None:
        out.loss.backward()

    def _fire_counts(self, out) -> Tensor:
        """``[d_sae]`` firings in this step's batch (what the dead-feature counters see)."""
        return out.fire_counts

    def _clip_grads(self) -> None:
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.max_grad_norm)

    def _rows(self, x: Tensor) -> int:
        return x.shape[0]

    def _metrics(self, out, y: Tensor) -> dict[str, float]:
        res = (out.sae_out.detach() - y).pow(2).sum(-1)
        var = (y - y.mean(0)).pow(2).sum(-1)
        m = {"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}, **out.metrics}
        m["mse"] = res.mean().item()
        m["explained_variance"] = 1 - (res.mean() / var.mean()).item() if var.mean() > 0 else float("nan")
        m["l0"] = out.l0.item()
        m["dead_fraction"] = self.dead_neurons.float().mean().item()
        return m

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
        it = iter(batches)
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
                x, y = _split(batch)
                m = self.step(x, y)
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
        (``ce_loss_score`` = CE loss recovered)."""
        res_sum, n, l0_sum = 0.0, 0, 0.0
        sums, sq = None, 0.0
        self.sae.eval()
        for i, b in enumerate(batches or []):
            if i >= self.cfg.n_eval_batches:
                break
            x, y = self._prepare(*_split(b))
            out = self.sae.forward_train(x, y, None, self.coefficients())
            yd = y.double()
            res_sum += (out.sae_out.double() - yd).pow(2).sum().item()
            l0_sum += out.l0.item() * x.shape[0]
            sums = yd.sum(0) if sums is None else sums + yd.sum(0)
            sq += yd.pow(2).sum().item()
            n += x.shape[0]
        self.sae.train()
        (res_sum, n, l0_sum, sq), sums = self._eval_totals([res_sum, float(n), l0_sum, sq], sums)
        m: dict[str, float] = {"dead_fraction": self.dead_neurons.float().mean().item()}
        if n:
            var = sq - (sums.pow(2).sum().item() / n)
            m.update(
                mse=res_sum / n,
                l0=l0_sum / n,
                explained_variance=1 - res_sum / var if var > 0 else float("nan"),
            )
        if model is not None and eval_tokens is not None:
            r = self._reconstruction_metrics(model, eval_tokens)
            m.update({f"model_{k}": v for k, v in r.to_dict().items() if isinstance(v, float)})
        return m

    def _reconstruction_metrics(self, model: Any, eval_tokens: Iterable[Tensor]):
        """:meth:`evaluate`'s model metrics (``DistributedSAETrainer``: over every rank's ``eval_tokens``)."""
        from ..features.metrics import reconstruction_metrics

        return reconstruction_metrics(model, self.to_inference(), eval_tokens, progress=False)

    def _eval_totals(
        self, scalars: list[float], sums: Optional[Tensor]
    ) -> tuple[list[float], Optional[Tensor]]:
        """:meth:`evaluate`'s sums ``[res, n_rows, l0 * rows, sum ||y||^2]`` and ``sum_rows y [d_out]``
        (None without rows); ``DistributedSAETrainer`` adds them up over ranks."""
        return scalars, sums

    # ---- export / checkpoints --------------------------------------------------------------------
    def to_inference(self):
        """The sparsekern SAE / transcoder of the matching architecture (folded; BatchTopK -> JumpReLU)."""
        return to_inference(self.sae, self.scaling_factor)

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """SAELens disk format (via the inference SAE's ``save_model``) + trainer state, atomically."""
        sae_inf = self.to_inference()

        def write(folder: Path) -> None:
            sae_inf.save_model(folder, sparsity=self.log_feature_sparsity)
            ckpt.save_state(folder, *self._state())

        return ckpt.write_atomic(Path(path), write)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, meta) of the trainer state (module, optimiser, counters, RNG) for a checkpoint."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors.update(opt_t)
        tensors["n_forward_passes_since_fired"] = self.n_forward_passes_since_fired
        tensors["act_freq_scores"] = self.act_freq_scores
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "format": "sparsekern-trainer/1",
            "cfg": self.cfg.to_dict(),
            "n_training_steps": self.n_training_steps,
            "n_training_tokens": self.n_training_tokens,
            "n_frac_active_samples": self.n_frac_active_samples,
            "scaling_factor": self.scaling_factor,
            "b_dec_initialized": self.b_dec_initialized,
            "optimizer": opt_meta,
        }
        return tensors, meta

    checkpoint = save_checkpoint

    @classmethod
    def resume(cls, path: Union[str, Path], device: Optional[str] = None) -> "SAETrainer":
        """A trainer continuing exactly where :meth:`save_checkpoint` left off."""
        tensors, meta = ckpt.load_state(Path(path))
        cfg_d = dict(meta["cfg"])
        if device is not None:
            cfg_d["device"] = device
        tr = cls(TrainingConfig.from_dict(cfg_d))
        tr._load_state(tensors, meta)
        return tr

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`_state` saved."""
        dev = self.device
        sd = {k[4:]: v.to(dev) for k, v in tensors.items() if k.startswith("sae.")}
        self.sae.load_state_dict(sd)
        self.optimizer_load(tensors, meta)
        self.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"].to(dev)
        self.act_freq_scores = tensors["act_freq_scores"].to(dev)
        self.n_training_steps = meta["n_training_steps"]
        self.n_training_tokens = meta["n_training_tokens"]
        self.n_frac_active_samples = meta["n_frac_active_samples"]
        self.scaling_factor = meta["scaling_factor"]
        self.b_dec_initialized = meta["b_dec_initialized"]
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], dev)

    def optimizer_load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        opt = {
            k: v.to(self.device) if not k.endswith(".step") else v
            for k, v in tensors.items()
            if k.startswith("optim.")
        }
        ckpt.optimizer_from_flat(self.optimizer, opt, meta["optimizer"])
