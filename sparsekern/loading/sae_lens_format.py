"""SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors`` [+ ``sparsity.safetensors``]).

Readers return plain data (``(cfg_dict, state_dict)``); ``sparsekern.SAE`` builds the module. They raise
clear errors naming the file (missing, not JSON, truncated/corrupt safetensors, a config that does not fit
the tensors, a device that is not there) instead of whatever the parser throws, and check the config
against the tensor shapes in the safetensors header before reading any tensor. ``handle_config_defaulting``
upgrades pre-6.0 SAELens configs as SAELens does.

Nothing here knows the SAE classes: where a step needs them (the class name in an error, the fields of an
architecture's config) the caller passes a function (``label``, ``config_fields``);
:mod:`sparsekern.saes.io` passes the registry's. A caller that passes neither gets the defaults set by
:func:`set_class_info`: the package root sets the registry's there (looked up on first use), so the public
readers name classes and trim old configs as SAELens does, while ``loading/`` imports no SAE module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Union

import torch
from torch import Tensor

from ..constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, str_to_dtype

# architecture name -> what to call it in an error message (e.g. its class name, "StandardSAE")
Label = Callable[[str], str]
# architecture name -> the field names of its config class
ConfigFields = Callable[[str], Collection[str]]

_DEFAULTS: dict[str, Optional[Callable[[str], Any]]] = {"label": None, "config_fields": None}


def set_class_info(label: Optional[Label], config_fields: Optional[ConfigFields]) -> None:
    """Set what the readers use when a caller passes no ``label`` / ``config_fields`` (None: the
    class-free behaviour: ``'<architecture>' SAE`` in errors, every key of an old config kept)."""
    for name, fn in (("label", label), ("config_fields", config_fields)):
        if fn is not None and not callable(fn):
            raise TypeError(f"set_class_info: {name} must be callable or None, got {type(fn).__name__}")
    _DEFAULTS.update(label=label, config_fields=config_fields)


# top-level keys of a pre-6.0 cfg.json that SAELens moves into ``metadata``
LLM_METADATA_KEYS = {
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
}


def read_json(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"config file {path} must hold a JSON object, got {type(out).__name__}")
    return out


def check_device(device: Any, source: Union[str, Path]) -> torch.device:
    """``torch.device(device)`` if tensors can be loaded there; else a ValueError naming ``source``.

    Refuses the ``meta`` device (it would keep the shapes and silently drop every weight) and an
    accelerator this machine does not have (instead of the loader's misleading "corrupt file").
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: unknown device {device!r} ({e})") from None
    if dev.type == "meta":
        raise ValueError(
            f"{source}: cannot load onto the 'meta' device (it holds no data, so every weight would be "
            "discarded); load on 'cpu' or an accelerator"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source}: device {device!r} requested, but CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{source}: device {device!r} requested, but MPS is not available on this machine")
    return dev


def check_dtype(dtype: Any, source: Union[str, Path]) -> torch.dtype:
    """The floating-point ``torch.dtype`` named by ``dtype``; else a ValueError naming ``source``."""
    try:
        dt = str_to_dtype(dtype)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None
    if not dt.is_floating_point:
        raise ValueError(f"{source}: dtype {dtype!r} is not a floating-point dtype")
    return dt


def _positive_int(cfg: dict[str, Any], key: str, source: Union[str, Path]) -> int:
    if key not in cfg:
        raise ValueError(f"{source} has no {key!r}")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{source}: {key} must be a positive int, got {v!r}")
    return v


def check_cfg(cfg_dict: dict[str, Any], source: Union[str, Path]) -> None:
    """Check the fields every SAE config needs (``d_in``, ``d_sae``, ``dtype``, ``device``); errors name
    ``source``."""
    _positive_int(cfg_dict, "d_in", source)
    _positive_int(cfg_dict, "d_sae", source)
    if "d_out" in cfg_dict and cfg_dict["d_out"] is not None:
        _positive_int(cfg_dict, "d_out", source)
    check_dtype(cfg_dict.get("dtype", "float32"), source)
    check_device(cfg_dict.get("device", "cpu"), source)


def safetensors_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (reads no tensor data)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ValueError(
            f"could not read safetensors file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


def check_shapes(
    cfg_dict: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    source: Union[str, Path],
    label: Optional[Label] = None,
) -> None:
    """``W_enc`` must be ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_out]`` (``d_out`` = ``d_in`` for an SAE).

    ``label(architecture)`` names the architecture in the error (default: ``'<architecture>' SAE``).
    """
    d_in, d_sae = cfg_dict["d_in"], cfg_dict["d_sae"]
    d_out = cfg_dict.get("d_out") or d_in
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out)}
    bad = {k: v for k, v in shapes.items() if k in want and tuple(v) != want[k]}
    if bad:
        arch = cfg_dict.get("architecture") or "standard"
        label = label if label is not None else _DEFAULTS["label"]
        name = label(arch) if label is not None else f"{arch!r} SAE"
        raise ValueError(
            f"weights in {source} do not fit a {name} with d_in={d_in}, d_sae={d_sae}"
            f"{f', d_out={d_out}' if 'd_out' in cfg_dict else ''}: expected {want}, found {bad}"
        )


def read_safetensors(
    path: Union[str, Path], device: str = "cpu", dtype: Union[str, torch.dtype, None] = None
) -> dict[str, Tensor]:
    """All tensors of a safetensors file (cast to ``dtype`` if given); clear errors for bad files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    dt = check_dtype(dtype, path) if dtype is not None else None
    check_device(device, path)
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118
                t = f.get_tensor(k)
                out[k] = t.to(dt) if dt is not None else t
        return out
    except Exception as e:  # safetensors raises its own error types (header, size, dtype, ...)
        raise ValueError(
            f"could not read safetensors file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


def read_sparsity(path: Union[str, Path], device: str = "cpu") -> Optional[Tensor]:
    """The ``sparsity`` tensor of a ``sparsity.safetensors`` file, or None if there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    tensors = read_safetensors(path, device)
    if "sparsity" not in tensors:
        raise ValueError(f"{path} has no 'sparsity' tensor (found {sorted(tensors)})")
    return tensors["sparsity"]


def read_sae_lens_dir(
    path: Union[str, Path],
    device: str = "cpu",
    cfg_overrides: Optional[dict[str, Any]] = None,
    *,
    label: Optional[Label] = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg_dict, state_dict) of a SAELens folder, like SAELens's ``sae_lens_disk_loader``.

    ``label`` names the architecture in a shape-mismatch error (see :func:`check_shapes`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"SAE folder not found: {path} "
            f"(expected a folder with {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})"
        )
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    cfg_dict = read_json(cfg_path)
    cfg_dict["device"] = device
    if cfg_overrides:
        cfg_dict.update(cfg_overrides)
    check_cfg(cfg_dict, cfg_path)  # before touching the weights: nothing is allocated for a bad config
    check_shapes(cfg_dict, safetensors_shapes(weights_path), weights_path, label)
    dtype = cfg_dict.get("dtype", "float32")
    state_dict = read_safetensors(weights_path, device, dtype)
    if "scaling_factor" in state_dict:  # pre-6 "finetuning scaling factor": SAELens drops it if all ones
        sf = state_dict.pop("scaling_factor")
        if not torch.allclose(sf, torch.ones_like(sf)):
            raise ValueError(
                f"{path / SAE_WEIGHTS_FILENAME} has a non-trivial finetuning 'scaling_factor', which "
                "sparsekern does not support"
            )
    return cfg_dict, state_dict


def handle_config_defaulting(
    cfg_dict: dict[str, Any], config_fields: Optional[ConfigFields] = None
) -> dict[str, Any]:
    """Upgrade a pre-6.0 SAELens cfg dict (flat ``hook_name`` etc.) to the 6.x layout; 6.x passes through.

    As SAELens, the upgraded dict keeps only the fields of the architecture's config class, named by
    ``config_fields(architecture)`` (default: :func:`set_class_info`'s, the registry's after
    ``import sparsekern``); with neither, every key is kept (the config classes ignore unknown keys).
    """
    from packaging.version import InvalidVersion, Version

    version = cfg_dict.get("sae_lens_version") or (cfg_dict.get("metadata") or {}).get("sae_lens_version")
    try:
        old = not version or Version(str(version)) < Version("6.0.0-rc.0")
    except InvalidVersion:
        old = True
    config_fields = config_fields if config_fields is not None else _DEFAULTS["config_fields"]
    return _pre_6_0_config(cfg_dict, config_fields) if old else cfg_dict


def _pre_6_0_config(cfg_dict: dict[str, Any], config_fields: Optional[ConfigFields]) -> dict[str, Any]:
    # mirrors sae_lens.loading.pretrained_sae_loaders.handle_pre_6_0_config
    rename = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    cfg = {rename.get(k, k): v for k, v in cfg_dict.items()}
    cfg.setdefault("prepend_bos", True)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("reshape_activations", "hook_z" if "hook_z" in (cfg.get("hook_name") or "") else "none")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    cfg.setdefault("device", "cpu")
    keep = set(config_fields(cfg["architecture"])) if config_fields is not None else None
    out = {k: v for k, v in cfg.items() if (keep is None or k in keep) and k != "metadata"}
    # keep a metadata dict that is already there, so running this twice changes nothing
    out["metadata"] = {
        **(cfg.get("metadata") or {}),
        **{k: v for k, v in cfg.items() if k in LLM_METADATA_KEYS},
    }
    out["architecture"] = cfg["architecture"]
    return out
