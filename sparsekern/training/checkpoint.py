"""Trainer state on disk: safetensors for tensors, JSON for the rest (never pickle).

A checkpoint folder holds SAELens's disk format (``cfg.json``, ``sae_weights.safetensors``,
``sparsity.safetensors``: the folded inference SAE) plus ``trainer_state.safetensors`` (training
module parameters and buffers under ``sae.``, Adam moments under ``optim.<i>.<key>``, dead-feature
counters, RNG states) and ``trainer_state.json`` (the ``TrainingConfig``, step counters, scaling
factor, Adam hyper-parameters). The folder is written to a temporary sibling and renamed into place,
so a failed save leaves any previous checkpoint at ``path`` intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import TrainingConfig

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adam's ``state_dict`` as ``({"optim.<i>.<key>": tensor}, json-able param_groups)``."""
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for key, v in st.items():
            tensors[f"optim.{i}.{key}"] = (
                v.detach().contiguous() if isinstance(v, Tensor) else torch.tensor(v)
            )
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Load what :func:`optimizer_to_flat` returned into ``opt``."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``path`` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def trainer_state(trainer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of an ``SAETrainer``'s state: module parameters and buffers (``sae.<name>``),
    Adam (``optim.<i>.<key>`` + ``meta["optimizer"]``), dead-feature counters ``[n_latents]``, RNG
    states; ``meta`` (JSON) the config and the step counters."""
    tensors = {f"sae.{k}": v for k, v in trainer.sae.state_dict().items()}
    opt_t, opt_meta = optimizer_to_flat(trainer.optimizer)
    tensors.update(opt_t)
    tensors["n_forward_passes_since_fired"] = trainer.n_forward_passes_since_fired
    tensors["act_freq_scores"] = trainer.act_freq_scores
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    meta = {
        "format": "sparsekern-trainer/1",
        "cfg": trainer.cfg.to_dict(),
        "n_training_steps": trainer.n_training_steps,
        "n_training_tokens": trainer.n_training_tokens,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "n_skipped_batches": trainer.n_skipped_batches,
        "scaling_factor": trainer.scaling_factor,
        "b_dec_initialized": trainer.b_dec_initialized,
        "optimizer": opt_meta,
    }
    return tensors, meta


def load_trainer_state(trainer: Any, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore into ``trainer`` what :func:`trainer_state` returned (a missing entry: ``KeyError``)."""
    dev = trainer.device
    sd = {k[4:]: v.to(dev) for k, v in tensors.items() if k.startswith("sae.")}
    trainer.sae.load_state_dict(sd)
    trainer.optimizer_load(tensors, meta)
    trainer.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"].to(dev)
    trainer.act_freq_scores = tensors["act_freq_scores"].to(dev)
    trainer.n_training_steps = meta["n_training_steps"]
    trainer.n_training_tokens = meta["n_training_tokens"]
    trainer.n_frac_active_samples = meta["n_frac_active_samples"]
    trainer.n_skipped_batches = meta.get("n_skipped_batches", 0)  # absent before skip_nonfinite existed
    trainer.scaling_factor = meta["scaling_factor"]
    trainer.b_dec_initialized = meta["b_dec_initialized"]
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and dev.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], dev)


def save_state(folder: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) as a trainer state into ``folder``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    with open(folder / STATE_JSON, "w") as f:
        json.dump(meta, f, indent=1)


def load_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of the trainer state in ``folder``. Every failure names the file: a missing
    file (``FileNotFoundError``), a truncated or corrupted one, or JSON that is not a trainer state
    (``ValueError``)."""
    folder = Path(folder)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not a sparsekern trainer checkpoint")
    meta = read_state_json(folder / STATE_JSON)
    return read_state_tensors(folder / STATE_TENSORS), meta


def read_state_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a trainer state); a ``ValueError`` naming ``path`` if it is unreadable,
    not JSON, or not an object with a ``cfg``."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the trainer state is truncated or corrupted") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("cfg"), dict):
        raise ValueError(f"{path}: not a sparsekern trainer state (expected a JSON object with a 'cfg')")
    return meta


def read_state_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors in the safetensors file ``path``; a ``ValueError`` naming ``path`` if it cannot be read
    (truncated, corrupted, not safetensors)."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{path}: cannot read the trainer state tensors ({type(e).__name__}: {e}); the file is truncated "
            "or corrupted"
        ) from e


def saved_config(folder: Path, meta: dict[str, Any], device: Any = None) -> TrainingConfig:
    """The ``TrainingConfig`` of the trainer state ``meta`` read from ``folder`` (``device``, when given,
    replaces the saved one); a config that cannot be built raises a ``ValueError`` naming
    ``folder / trainer_state.json``."""
    cfg_d = dict(meta["cfg"])
    if device is not None:
        cfg_d["device"] = device
    return checked(Path(folder) / STATE_JSON, lambda: TrainingConfig.from_dict(cfg_d))


def checked(folder: Path, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a missing entry of the trainer state (``KeyError``) or a bad value in it (``TypeError``
    / ``ValueError``) re-raised as a ``ValueError`` naming the checkpoint ``folder``."""
    try:
        return fn()
    except KeyError as e:
        raise ValueError(f"{folder}: the trainer state has no entry {e}; the checkpoint is incomplete or "
                         "was written by another version") from e
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{folder}: the trainer state does not fit this trainer ({type(e).__name__}: {e})"
        ) from e
