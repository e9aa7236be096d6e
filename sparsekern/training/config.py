"""``TrainingConfig``: everything a training run needs, validated before any work is done.

Field names follow SAELens 6.54 (``LanguageModelSAERunnerConfig`` and the architecture's
``*TrainingSAEConfig``) wherever the meaning is the same: ``d_in``, ``d_sae``, ``k``, ``lr``,
``adam_beta1/2``, ``lr_scheduler_name``, ``lr_warm_up_steps``, ``lr_decay_steps``, ``lr_end``,
``l1_coefficient``, ``l1_warm_up_steps``, ``lp_norm``, ``l0_coefficient``, ``l0_warm_up_steps``,
``jumprelu_init_threshold``, ``jumprelu_bandwidth``, ``aux_loss_coefficient``,
``rescale_acts_by_decoder_norm``, ``topk_threshold_lr``, ``decoder_init_norm``,
``train_batch_size_tokens``, ``training_tokens``, ``normalize_activations``,
``n_batches_for_norm_estimate``, ``dead_feature_window``, ``dead_feature_threshold``,
``feature_sampling_window``, ``apply_b_dec_to_input``, ``device``, ``dtype``, ``seed``, ``hook_name``,
``model_name``, ``context_size``, ``n_checkpoints``, ``checkpoint_path``, ``n_eval_batches``.

sparsekern additions (SAELens has no equivalent): transcoders (``transcoder``, ``skip_transcoder``,
``d_out``, ``hook_name_out``), ``b_dec_init_method`` (SAELens 6 always starts b_dec at zero, which is
our default), ``max_grad_norm`` (SAELens hard-codes 1.0, our default), ``normalize_sae_decoder`` (unit
decoder rows after every step; off as in SAELens 6), ``eval_every_n_steps``, ``flush_denormal`` and
``skip_nonfinite`` (skip a batch whose inputs, loss or gradient hold NaN / inf instead of raising).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "gated")
NORMALIZE_MODES = ("none", "expected_average_only_in")
B_DEC_INIT_METHODS = ("zeros", "mean", "geometric_median")
LR_SCHEDULERS = ("constant", "cosineannealing")
_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class TrainingConfig:
    """Configuration of one SAE / transcoder training run (see the module docstring for names).

    Shapes: inputs ``x [N, d_in]``; transcoder targets ``y [N, d_out]`` (``d_out = d_in`` for SAEs).
    ``k`` is an int for ``topk`` and the *average* number of active latents per row (a float is
    allowed) for ``batchtopk``.
    """

    architecture: str = "topk"
    d_in: int = 768
    d_sae: int = 16384
    k: Union[int, float] = 100
    # transcoders (sparsekern): read hook_name, reconstruct hook_name_out ([N, d_out])
    transcoder: bool = False
    skip_transcoder: bool = (
        False  # adds y += x @ W_skip.T (W_skip [d_out, d_in], zero init); implies transcoder
    )
    d_out: Optional[int] = None  # default d_in
    hook_name: str = "blocks.0.hook_resid_pre"
    hook_name_out: Optional[str] = None
    model_name: str = "unknown"
    context_size: Optional[int] = None
    # optimiser / schedules (SAELens names and defaults)
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    lr_end: Optional[float] = None  # default lr / 10 (SAELens)
    max_grad_norm: Optional[float] = 1.0  # SAELens clips at 1.0 always; None = no clipping
    # sparsity losses
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    lp_norm: float = 1.0
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    aux_loss_coefficient: float = 1.0
    rescale_acts_by_decoder_norm: bool = True  # topk / batchtopk (SAELens default)
    topk_threshold_lr: float = 0.01  # batchtopk
    # init / constraints
    decoder_init_norm: Optional[float] = 0.1
    normalize_sae_decoder: bool = False
    b_dec_init_method: str = "zeros"
    apply_b_dec_to_input: Optional[bool] = None  # None: True for SAEs, False for transcoders
    # data
    train_batch_size_tokens: int = 4096
    training_tokens: int = 2_000_000
    normalize_activations: str = "none"
    n_batches_for_norm_estimate: int = 10
    # dead features / sparsity
    dead_feature_window: int = 1000
    dead_feature_threshold: float = 1e-8
    feature_sampling_window: int = 2000
    # eval / checkpoints
    eval_every_n_steps: int = 0  # 0 = no periodic eval
    n_eval_batches: int = 10
    n_checkpoints: int = 0
    checkpoint_path: Optional[str] = "checkpoints"
    # runtime
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 42
    flush_denormal: bool = True  # flush CPU denormals during steps (see SAETrainer.step)
    # NaN / inf in a batch's inputs, loss or gradient: False = raise NonFiniteError (nothing changes);
    # True = skip the batch (warn, count it in SAETrainer.n_skipped_batches / the skipped_batches metric)
    skip_nonfinite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, saved in the trainer state

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"TrainingConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        for name in (
            "d_in",
            "d_sae",
            "train_batch_size_tokens",
            "training_tokens",
            "dead_feature_window",
            "feature_sampling_window",
            "n_batches_for_norm_estimate",
            "n_eval_batches",
        ):
            _positive_int(name, getattr(self, name))
        for name in (
            "lr_warm_up_steps",
            "lr_decay_steps",
            "l1_warm_up_steps",
            "l0_warm_up_steps",
            "eval_every_n_steps",
            "n_checkpoints",
            "seed",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainingConfig.{name} must be a non-negative int, got {v!r}")
        if not isinstance(self.skip_nonfinite, bool):
            raise ValueError(f"TrainingConfig.skip_nonfinite must be a bool, got {self.skip_nonfinite!r}")
        if self.skip_transcoder:
            self.transcoder = True
        if self.d_out is None:
            self.d_out = self.d_in
        _positive_int("d_out", self.d_out)
        if not self.transcoder and self.d_out != self.d_in:
            raise ValueError(
                f"TrainingConfig.d_out ({self.d_out}) must equal d_in ({self.d_in}) for an SAE; "
                "set transcoder=True for a transcoder"
            )
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.transcoder
        if self.transcoder and self.apply_b_dec_to_input:
            raise ValueError(
                "TrainingConfig.apply_b_dec_to_input must be False for a transcoder "
                "(b_dec lives in the output space [d_out])"
            )
        if self.transcoder and self.architecture == "gated":
            raise ValueError(
                "TrainingConfig.architecture='gated' has no transcoder variant "
                "(neither SAELens nor sparsekern has a gated transcoder class)"
            )
        if self.architecture == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise ValueError(
                    f"TrainingConfig.k must be an int in [1, d_sae={self.d_sae}] for topk, got {self.k!r}"
                )
        if self.architecture == "batchtopk":
            if (
                isinstance(self.k, bool)
                or not isinstance(self.k, (int, float))
                or not 0 < self.k <= self.d_sae
            ):
                raise ValueError(
                    f"TrainingConfig.k must be in (0, d_sae={self.d_sae}] for batchtopk, got {self.k!r}"
                )
        for name in ("lr", "jumprelu_bandwidth", "adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TrainingConfig.{name} must be a positive finite number, got {v!r}")
        if not self.adam_beta1 < 1 or not self.adam_beta2 < 1:
            raise ValueError("TrainingConfig.adam_beta1 / adam_beta2 must be < 1")
        for name in (
            "l1_coefficient",
            "l0_coefficient",
            "aux_loss_coefficient",
            "jumprelu_init_threshold",
            "topk_threshold_lr",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainingConfig.{name} must be a non-negative finite number, got {v!r}")
        if self.lp_norm <= 0:
            raise ValueError(f"TrainingConfig.lp_norm must be > 0, got {self.lp_norm!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainingConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            raise ValueError(
                f"TrainingConfig.decoder_init_norm must be > 0 or None, got {self.decoder_init_norm!r}"
            )
        if self.normalize_activations not in NORMALIZE_MODES:
            raise ValueError(
                f"TrainingConfig.normalize_activations must be one of {NORMALIZE_MODES}, "
                f"got {self.normalize_activations!r}"
            )
        if self.b_dec_init_method not in B_DEC_INIT_METHODS:
            raise ValueError(
                f"TrainingConfig.b_dec_init_method must be one of {B_DEC_INIT_METHODS}, "
                f"got {self.b_dec_init_method!r}"
            )
        if self.lr_scheduler_name.lower() not in LR_SCHEDULERS:
            raise ValueError(
                f"TrainingConfig.lr_scheduler_name must be one of {LR_SCHEDULERS}, "
                f"got {self.lr_scheduler_name!r}"
            )
        if self.lr_end is None:
            self.lr_end = self.lr / 10
        if self.lr_warm_up_steps + self.lr_decay_steps > self.total_training_steps:
            raise ValueError(
                f"TrainingConfig.lr_warm_up_steps + lr_decay_steps ({self.lr_warm_up_steps} + "
                f"{self.lr_decay_steps}) exceed total_training_steps ({self.total_training_steps})"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"TrainingConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"TrainingConfig.device {self.device!r} is not a device: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainingConfig.device={self.device!r} but CUDA is not available")
        if dev.type == "meta":
            raise ValueError("TrainingConfig.device='meta' cannot train")

    # ---- derived --------------------------------------------------------------------------------
    @property
    def total_training_steps(self) -> int:
        """``training_tokens // train_batch_size_tokens`` (SAELens)."""
        return max(1, self.training_tokens // self.train_batch_size_tokens)

    @property
    def target_hook_name(self) -> str:
        """The hook a transcoder reconstructs: ``hook_name_out``, or ``hook_name`` when unset."""
        return self.hook_name_out or self.hook_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_sae_lens(self) -> Any:
        """The equivalent SAELens ``*TrainingSAEConfig`` (SAEs only; needs ``sae_lens``), e.g. to train
        the same SAE with SAELens's trainer for a comparison."""
        if self.transcoder:
            raise ValueError("SAELens has no training transcoders")
        import sae_lens

        common = dict(
            d_in=self.d_in,
            d_sae=self.d_sae,
            dtype=self.dtype,
            device=self.device,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            decoder_init_norm=self.decoder_init_norm,
            normalize_activations=self.normalize_activations,
        )
        a = self.architecture
        if a in ("topk", "batchtopk"):
            cls = sae_lens.TopKTrainingSAEConfig if a == "topk" else sae_lens.BatchTopKTrainingSAEConfig
            extra = dict(
                k=self.k,
                aux_loss_coefficient=self.aux_loss_coefficient,
                rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
            )
            if a == "batchtopk":
                extra["topk_threshold_lr"] = self.topk_threshold_lr
            return cls(**common, **extra)
        if a == "jumprelu":
            return sae_lens.JumpReLUTrainingSAEConfig(
                **common,
                jumprelu_init_threshold=self.jumprelu_init_threshold,
                jumprelu_bandwidth=self.jumprelu_bandwidth,
                l0_coefficient=self.l0_coefficient,
                l0_warm_up_steps=self.l0_warm_up_steps,
            )
        cls = sae_lens.StandardTrainingSAEConfig if a == "standard" else sae_lens.GatedTrainingSAEConfig
        extra = dict(l1_coefficient=self.l1_coefficient, l1_warm_up_steps=self.l1_warm_up_steps)
        if a == "standard":
            extra["lp_norm"] = self.lp_norm
        return cls(**common, **extra)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"TrainingConfig.{name} must be a positive int, got {v!r}")
