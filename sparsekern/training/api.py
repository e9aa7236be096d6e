"""One-call entry points: ``train_sae`` (one SAE / transcoder) and ``train_saes`` (several, one forward)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import Tensor

from .activations import ActivationStore, check_hooks
from .config import TrainingConfig
from .multi import MultiSAETrainer, hooks_of
from .trainer import SAETrainer


def with_model_info(cfg: TrainingConfig, model: Any, tokens: Any) -> TrainingConfig:
    """``cfg`` with what the model and the tokens tell: ``model_name`` (from ``model.cfg.model_name``,
    if ``cfg`` has the default ``"unknown"``) and ``context_size`` (``tokens.shape[1]`` of a
    ``[n_seq, ctx]`` tensor, if unset). A copy when anything changes; ``cfg`` itself otherwise."""
    upd: dict[str, Any] = {}
    name = getattr(getattr(model, "cfg", None), "model_name", None)
    if cfg.model_name == "unknown" and name:
        upd["model_name"] = name
    shape = getattr(tokens, "shape", None)
    if cfg.context_size is None and shape is not None and len(shape) == 2:
        upd["context_size"] = int(shape[1])
    return dataclasses.replace(cfg, **upd) if upd else cfg


_with_model_info = with_model_info  # deprecated private name, kept for old imports


def train_sae(
    model: Any,
    tokens: Any,
    hook_name: str,
    cfg: TrainingConfig,
    *,
    progress: bool = True,
    **store_kwargs: Any,
):
    """Train one SAE on the activations of ``model`` at ``hook_name`` over ``tokens`` (tensor
    ``[n_seq, ctx]``, iterable of such, or a ``.npy`` / ``.safetensors`` token file) and return the
    inference SAE. A transcoder (``cfg.transcoder``) reconstructs ``cfg.hook_name_out`` (default
    ``hook_name``).

    Hooks, and token sequences no longer than the model's ``n_ctx``, are checked before anything runs
    (an iterable of token batches: as each batch arrives, before the model sees it). ``store_kwargs``
    go to :class:`ActivationStore` (``store_batch_size_prompts``, ``buffer_size_tokens``,
    ``exclude_special_tokens``, ...).
    """
    cfg = with_model_info(dataclasses.replace(cfg, hook_name=hook_name), model, tokens)
    hooks = hooks_of([cfg])
    check_hooks(model, hooks)
    store = ActivationStore(
        model,
        tokens,
        hooks,
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        seed=cfg.seed,
        device=cfg.device,
        dtype=cfg.torch_dtype,
        **store_kwargs,
    )
    trainer = SAETrainer(cfg)

    def inputs(batches):  # (x, y) for transcoders, also when both hooks are the same one
        for b in batches:
            parts = (b,) if isinstance(b, Tensor) else b
            x = parts[hooks.index(cfg.hook_name)]
            yield (x, parts[hooks.index(cfg.target_hook_name)]) if cfg.transcoder else x

    return trainer.fit(inputs(store.batches(cfg.total_training_steps)), progress=progress)


def train_saes(
    model: Any, tokens: Any, cfgs: Sequence[TrainingConfig], *, progress: bool = True, **store_kwargs: Any
) -> list:
    """Train several SAEs / transcoders (any hooks, widths, architectures) from one forward pass per
    batch of tokens; returns their inference SAEs in ``cfgs`` order."""
    cfgs = [with_model_info(c, model, tokens) for c in cfgs]
    hooks = hooks_of(cfgs)
    check_hooks(model, hooks)
    multi = MultiSAETrainer(cfgs, hooks)
    c0 = cfgs[0]
    store = ActivationStore(
        model,
        tokens,
        hooks,
        train_batch_size_tokens=c0.train_batch_size_tokens,
        seed=c0.seed,
        device=c0.device,
        dtype=c0.torch_dtype,
        **store_kwargs,
    )
    n = max(c.total_training_steps for c in cfgs)
    return multi.fit(store.batches(n), n_steps=n, progress=progress)
