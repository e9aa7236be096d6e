"""Building, loading and saving SAEs. The one way from a config and a state dict to a module is
:func:`build_sae`; every build / load classmethod of :class:`~sparsekern.saes.sae.SAE` delegates here.

The readers in :mod:`sparsekern.loading` return plain ``(cfg_dict, state_dict[, log_sparsity])`` and know
no SAE class; what needs one happens here: the architecture's class and config (through
:mod:`sparsekern.registry`), pre-6.0 SAELens configs trimmed to the config's fields, the class name in a
shape error. ``load_from_disk(shard=True)`` goes to the registry's shard loader
(:func:`sparsekern.registry.register_shard_loader`): this package never imports ``sparsekern.distributed``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

import torch
from torch import Tensor

from ..constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, dtype_to_str, str_to_dtype
from ..loading import sae_lens_format
from ..loading.pretrained import norm_scaling_factor, pretrained_source, read_pretrained
from ..loading.sae_lens_format import check_dtype, read_sae_lens_dir, read_sparsity
from ..registry import get_sae_class, shard_loader
from .atomic import atomic_folder
from .config import SAEConfig

if TYPE_CHECKING:
    from .sae import SAE

S = TypeVar("S", bound="SAE")
CfgAndState = tuple[dict[str, Any], dict[str, Tensor]]
# what a Python module is built with: (the architecture's SAE class, its config on the meta device) -> SAE
Factory = Callable[[type, SAEConfig], "SAE"]
CHECKPOINT_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)


# ---- classes and configs -------------------------------------------------------------------------
def sae_class_for(cls: type[S], architecture: str) -> type[S]:
    """The registered SAE class of ``architecture``; ValueError unless it is ``cls`` or a subclass."""
    sae_cls = get_sae_class(architecture)[0]
    if not issubclass(sae_cls, cls):
        raise ValueError(f"Loaded SAE is not of type {cls.__name__}. Use {sae_cls.__name__} instead")
    return sae_cls


def check_class(cls: type[S], sae: "SAE") -> S:
    """``sae`` if it is a ``cls``; else the ValueError ``sae_class_for`` raises."""
    if not isinstance(sae, cls):
        raise ValueError(f"Loaded SAE is not of type {cls.__name__}. Use {type(sae).__name__} instead")
    return sae


def class_label(architecture: str) -> str:
    """The class name of ``architecture`` for error messages (``'name' SAE`` if it is unknown)."""
    try:
        return get_sae_class(architecture)[0].__name__
    except (ValueError, TypeError):
        return f"{architecture!r} SAE"


def config_fields(architecture: str) -> set[str]:
    """Field names of the config class of ``architecture`` (what SAELens keeps of a pre-6.0 config)."""
    return {f.name for f in fields(get_sae_class(architecture)[1])}


def handle_config_defaulting(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """SAELens's ``handle_config_defaulting``: a pre-6.0 cfg dict upgraded to the 6.x layout and trimmed
    to its architecture's config fields; a 6.x dict passes through."""
    return sae_lens_format.handle_config_defaulting(cfg_dict, config_fields)


def config_from_dict(cfg_dict: dict[str, Any], *, upgrade: bool = True) -> SAEConfig:
    """The config a cfg.json-style dict describes (its ``architecture``'s config class).

    ``upgrade``: first upgrade a pre-6.0 SAELens dict (:func:`handle_config_defaulting`), as the loaders
    do; a dict of unknown version counts as pre-6.0 there.
    """
    raw = handle_config_defaulting(dict(cfg_dict)) if upgrade else dict(cfg_dict)
    return SAEConfig.from_dict(raw)


# ---- the one build -------------------------------------------------------------------------------
def build_sae(
    cls: type[S],
    cfg: Union[dict[str, Any], SAEConfig],
    state_dict: dict[str, Tensor],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    fold_W_dec_norm: bool = False,
    source: Union[str, Path, None] = None,
    factory: Optional[Factory] = None,
) -> S:
    """An SAE of the class ``cfg`` names (a ``cls``) holding ``state_dict``'s tensors.

    ``cfg``: a cfg.json-style dict (upgraded as :func:`config_from_dict`) or a config object (used as
    given, and edited). Tensors are used as they are (``load_state_dict(assign=True)`` after
    ``process_state_dict_for_loading``), then moved / cast to ``cfg.device`` / ``cfg.dtype``; nothing is
    allocated for the freshly built module (it is made on the ``meta`` device). ``dtype`` overrides the
    config's; ``fold_W_dec_norm`` as SAELens. ``source`` (a file) is named in errors. ``factory(sae_cls,
    meta_cfg)`` makes the module (default ``sae_cls(meta_cfg)``), e.g. a sharded twin of ``sae_cls``.

    Raises ValueError when the class is not a ``cls``, the weights do not fit the config, or the config
    asks for the ``meta`` device while the tensors hold data (that would silently drop every weight).
    """
    where = f" in {source}" if source else ""
    if isinstance(cfg, dict):
        cfg_dict = dict(cfg)
        if dtype is not None:
            cfg_dict["dtype"] = dtype_to_str(check_dtype(dtype, source or "the config"))
        cfg = config_from_dict(cfg_dict)
    elif dtype is not None:
        cfg.dtype = dtype_to_str(check_dtype(dtype, source or "the config"))
    if torch.device(cfg.device).type == "meta" and any(
        isinstance(t, Tensor) and not t.is_meta for t in state_dict.values()
    ):
        raise ValueError(
            f"the config{where} asks for the 'meta' device, which holds no data: loading there would "
            "discard every weight; use 'cpu' or an accelerator"
        )
    sae_cls = sae_class_for(cls, cfg.architecture())
    device = cfg.device
    cfg.device = "meta"  # allocate nothing; load_state_dict(assign=True) brings the real tensors
    sae = factory(sae_cls, cfg) if factory is not None else sae_cls(cfg)
    sae.cfg.device = device
    sae.process_state_dict_for_loading(state_dict)
    try:
        sae.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        extra = sae.extra_repr()
        raise ValueError(
            f"weights{where} do not fit a {type(sae).__name__}{f' ({extra})' if extra else ''} with "
            f"d_in={cfg.d_in}, d_sae={cfg.d_sae} (expected tensors {dict(sae._param_shapes())}): {e}"
        ) from None
    sae = sae.to(dtype=str_to_dtype(cfg.dtype), device=device)
    if fold_W_dec_norm:
        sae.fold_W_dec_norm()
    return sae


# ---- the sources ---------------------------------------------------------------------------------
def load_sae_lens_dir(
    cls: type[S],
    path: Union[str, Path],
    device: str = "cpu",
    dtype: Optional[str] = None,
    converter: Optional[Callable[..., CfgAndState]] = None,
    fold_W_dec_norm: bool = False,
) -> tuple[S, Optional[Tensor]]:
    """(SAE, log-sparsity tensor [d_sae] or None) of a SAELens folder, or of ``converter``'s layout
    (an SAELens-style disk loader ``(path, device, cfg_overrides) -> (cfg_dict, state_dict)``)."""
    overrides = {"dtype": dtype} if dtype is not None else None
    if converter is None:
        cfg_dict, state_dict = read_sae_lens_dir(path, device, overrides, label=class_label)
    else:
        cfg_dict, state_dict = converter(path, device, cfg_overrides=overrides)
    sae = build_sae(cls, cfg_dict, state_dict, fold_W_dec_norm=fold_W_dec_norm, source=str(path))
    return sae, read_sparsity(Path(path) / SPARSITY_FILENAME, device)


def load_sharded(
    cls: type[S],
    path: Union[str, Path],
    device: str = "cpu",
    dtype: Optional[str] = None,
    *,
    group: Any = None,
    fold_W_dec_norm: bool = False,
) -> S:
    """This rank's shard of a SAELens folder, from the registered shard loader (see the module doc)."""
    loader = shard_loader()
    return check_class(cls, loader(path, device, dtype, group=group, fold_W_dec_norm=fold_W_dec_norm))


def build_from_reader(
    cls: type[S], read: CfgAndState, dtype: Union[str, torch.dtype, None], source: Union[str, Path]
) -> S:
    """A reader's ``(cfg_dict, state_dict)`` (sparsify, circuit-tracer, Gemma Scope) -> SAE, in ``dtype``
    if given, else the file's (checked to be a floating-point dtype either way)."""
    cfg_dict, state_dict = read
    dtype = dtype if dtype is not None else cfg_dict.get("dtype", "float32")
    return build_sae(cls, cfg_dict, state_dict, dtype=dtype, source=source)


def from_sae_lens(cls: type[S], sae: Any, *, copy: bool = False) -> S:
    """The sparsekern twin of an SAELens SAE / transcoder / training SAE (see ``SAE.from_sae_lens``)."""
    sd = dict(sae.state_dict())
    if hasattr(sae.cfg, "get_inference_sae_cfg_dict"):  # a TrainingSAE
        cfg_dict = sae.cfg.get_inference_sae_cfg_dict()
        sd = {k: v.clone() for k, v in sd.items()}  # its processing edits tensors in place
        sae.process_state_dict_for_saving_inference(sd)
    else:
        cfg_dict = sae.cfg.to_dict()
        if copy:
            sd = {k: v.clone() for k, v in sd.items()}
        sae.process_state_dict_for_saving(sd)
    cfg_dict = {**cfg_dict, "device": str(sae.W_dec.device), "dtype": dtype_to_str(sae.W_dec.dtype)}
    out = build_sae(cls, cfg_dict, sd)
    out.use_error_term = bool(getattr(sae, "use_error_term", False))
    if getattr(sae, "hook_z_reshaping_mode", False) and not out.hook_z_reshaping_mode:
        out.turn_on_forward_pass_hook_z_reshaping()
    return out


def from_pretrained(
    cls: type[S],
    release: str,
    sae_id: str,
    device: str = "cpu",
    dtype: str = "float32",
    force_download: bool = False,
    converter: Optional[Callable[..., Any]] = None,
    fold_W_dec_norm: bool = False,
) -> tuple[S, dict[str, Any], Optional[Tensor]]:
    """(SAE, cfg dict, log sparsity) of a registry SAE read from the local Hugging Face cache, as
    SAELens's ``from_pretrained_with_cfg_and_sparsity`` (norm scaling folded, dtype, ``fold_W_dec_norm``)."""
    cfg_dict, state_dict, log_sparsity = read_pretrained(
        release, sae_id, device=device, dtype=dtype, force_download=force_download, converter=converter,
        label=class_label, config_fields=config_fields,
    )
    sae = build_sae(cls, cfg_dict, state_dict, source=pretrained_source(release, sae_id))
    if cfg_dict.get("normalize_activations") == "expected_average_only_in":
        factor = norm_scaling_factor(release, sae_id)
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
            cfg_dict["normalize_activations"] = "none"
        else:
            warnings.warn(
                f"norm_scaling_factor not found for {release} and {sae_id}, but normalize_activations is "
                "'expected_average_only_in'. Skipping normalization folding.",
                stacklevel=3,
            )
    sae = sae.to(dtype=str_to_dtype(dtype), device=device)
    if fold_W_dec_norm:
        sae.fold_W_dec_norm()
    return sae, cfg_dict, log_sparsity


# ---- saving --------------------------------------------------------------------------------------
def save_sae(sae: "SAE", path: Union[str, Path], sparsity: Optional[Tensor] = None) -> tuple[Path, Path]:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) atomically (see
    ``SAE.save_model``); returns (weights path, config path)."""
    from safetensors.torch import save_file  # looked up per call (tests patch it to fail mid-write)

    path = Path(path)
    if sparsity is not None and (
        not isinstance(sparsity, Tensor)
        or not sparsity.is_floating_point()
        or tuple(sparsity.shape) != (sae.cfg.d_sae,)
    ):
        t = sparsity
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"sparsity must be a float tensor [d_sae={sae.cfg.d_sae}], got {got}")
    try:
        cfg_json = json.dumps(sae.cfg.to_dict())
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot save {type(sae).__name__} to {path}: its config is not JSON-serialisable ({e}); "
            "nothing was written"
        ) from None
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save an SAE to {path}: it exists and is not a folder")
    extra = sae._not_sae_lens_loadable()
    if extra:
        warnings.warn(f"{type(sae).__name__} saved to {path}: {extra}", stacklevel=3)
    state_dict = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving(state_dict)
    with atomic_folder(path, CHECKPOINT_FILES) as tmp:
        save_file(state_dict, str(tmp / SAE_WEIGHTS_FILENAME))
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().contiguous()}, str(tmp / SPARSITY_FILENAME))
        (tmp / SAE_CFG_FILENAME).write_text(cfg_json)
    return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
