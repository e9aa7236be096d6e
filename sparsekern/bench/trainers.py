"""The two trainers ``sparsekern bench training`` compares, set up alike.

:func:`sk_trainer` builds sparsekern's ``SAETrainer``; :func:`sl_sae` and :class:`SLStepper` build SAELens's
training SAE and its ``SAETrainer``, stepped through the per-step seam of ``fit()``. :func:`pair` builds
both with the same hyper-parameters (every config field the two share is copied from sparsekern's config,
listed in ``info.aligned``) and the same initial weights (:func:`copy_params`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

# ---- the two trainers ----------------------------------------------------------------------
ARCH_EXTRAS = {  # hyper-parameters set on both sides (when sparsekern's config has the field)
    "topk": dict(),
    "jumprelu": dict(l0_coefficient=1e-3, jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05),
}


def _field_names(obj_or_cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj_or_cls)} if dataclasses.is_dataclass(obj_or_cls) else set()


def sk_trainer(arch: str, d_in: int, d_sae: int, k: int, batch: int, lr: float, seed: int,
               device: torch.device, dtype: torch.dtype, total_steps: int = 0):
    """(sparsekern SAETrainer, names of requested extras its config lacks)."""
    from ..training import SAETrainer, TrainingConfig

    kw = dict(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, lr=lr, train_batch_size_tokens=batch,
              seed=seed, device=str(device), dtype=str(dtype).removeprefix("torch."))
    names = _field_names(TrainingConfig)
    if total_steps and "training_tokens" in names:  # the lr schedule's length, as SAELens's
        kw["training_tokens"] = total_steps * batch
    if "checkpoint_path" in names:
        kw["checkpoint_path"] = None
    missing = []
    for key, v in ARCH_EXTRAS[arch].items():
        if not names or key in names:
            kw[key] = v
        else:
            missing.append(key)
    torch.manual_seed(seed)
    return SAETrainer(TrainingConfig(**kw)), missing


def _sl_classes(arch: str):
    import sae_lens

    if arch == "topk":
        return sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig
    if arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig
    raise ValueError(f"no SAELens peer for architecture {arch!r} in this benchmark")


def sl_sae(arch: str, d_in: int, d_sae: int, k: int, device: torch.device, dtype: torch.dtype,
            sk_cfg: Any, aligned: list[str]):
    cls, cfg_cls = _sl_classes(arch)
    kw: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, dtype=str(dtype).removeprefix("torch."),
                              device=str(device))
    if arch == "topk":
        kw["k"] = k
    for key, v in ARCH_EXTRAS[arch].items():
        kw[key] = v
    sk_names = _field_names(sk_cfg)
    own = {"d_in", "d_sae", "dtype", "device", "k", "metadata"}
    for key in sorted(_field_names(cfg_cls) & sk_names - own):
        if getattr(sk_cfg, key) is not None:  # None: "the default", resolved by each library
            kw[key] = getattr(sk_cfg, key)
            aligned.append(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg_cls(**kw))


def copy_params(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Copy ``src``'s parameters into ``dst`` by SAELens name (``log_threshold`` -> ``threshold`` by exp).
    Returns the names copied; raises when a parameter of ``dst`` has no source."""
    s = dict(src.named_parameters())
    done = []
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name in s:
                v = s[name]
            elif name == "threshold" and "log_threshold" in s:
                v = s["log_threshold"].exp()
            elif name == "log_threshold" and "threshold" in s:
                v = s["threshold"].clamp_min(1e-30).log()
            else:
                raise KeyError(f"sparsekern's training SAE has no parameter for SAELens's {name!r} "
                               f"(it has {sorted(s)})")
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{name}: sparsekern {tuple(v.shape)} vs SAELens {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
            done.append(name)
    return done


class SLStepper:
    """SAELens's ``SAETrainer`` stepped as its ``fit()`` does, minus logging/checkpoints."""

    def __init__(self, sae: torch.nn.Module, sk_cfg: Any, batch: int, total_steps: int, lr: float,
                 device: torch.device, aligned: list[str]):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        kw: dict[str, Any] = dict(total_training_samples=total_steps * batch, train_batch_size_samples=batch,
                                  lr=lr, device=str(device))
        skip = set(kw) | {"logger", "checkpoint_path", "n_checkpoints", "save_final_checkpoint"}
        for key in sorted(_field_names(SAETrainerConfig) & _field_names(sk_cfg) - skip):
            if getattr(sk_cfg, key) is not None:
                kw[key] = getattr(sk_cfg, key)
                aligned.append(key)
        if kw.get("lr_end") is None:
            kw["lr_end"] = kw["lr"] / 10  # LanguageModelSAERunnerConfig.__post_init__'s default
        self.trainer = SAETrainer(SAETrainerConfig(**kw), sae, data_provider=iter(()))
        self.sae = sae

    def step(self, x: Tensor) -> Any:
        tr = self.trainer
        tr.maybe_reset_sparsity()
        out = tr.step(x)
        tr.n_training_steps += 1
        return out


def pair(arch: str, d_in: int, d_sae: int, k: int, batch: int, total_steps: int, seed: int,
          device: torch.device, dtype: torch.dtype, lr: float = 3e-4):
    sk, missing = sk_trainer(arch, d_in, d_sae, k, batch, lr, seed, device, dtype, total_steps)
    aligned: list[str] = []
    peer_sae = sl_sae(arch, d_in, d_sae, k, device, dtype, sk.cfg, aligned)
    copied = copy_params(sk.sae, peer_sae)
    sl = SLStepper(peer_sae, sk.cfg, batch, total_steps, lr, device, aligned)
    info = dict(aligned=",".join(aligned), copied=",".join(copied))
    if missing:
        info["not_in_sk_config"] = ",".join(missing)
    return sk, sl, info
