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


def save_state(folder: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    with open(folder / STATE_JSON, "w") as f:
        json.dump(meta, f, indent=1)


def load_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    folder = Path(folder)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not a sparsekern trainer checkpoint")
    with open(folder / STATE_JSON) as f:
        meta = json.load(f)
    return load_file(str(folder / STATE_TENSORS)), meta
