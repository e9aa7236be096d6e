"""``SAE.from_pretrained``'s reader: SAELens's registry (release, sae_id) -> files in the local Hugging Face
cache -> ``(cfg_dict, state_dict, log_sparsity)``; ``SAE.from_pretrained_with_cfg_and_sparsity`` builds.

Never downloads and never opens a connection. The release is resolved with SAELens's own registry
(``sae_lens.loading.pretrained_saes_directory``). SAELens-format releases are read here; the others
(Gemma Scope, Llama Scope, transcoders, ...) go through SAELens's own converter with its download
functions swapped for cache look-ups for the duration of the call, so the conversion is SAELens's.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from torch import Tensor

from ..constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from .sae_lens_format import (
    ConfigFields,
    Label,
    check_device,
    handle_config_defaulting,
    read_sae_lens_dir,
    read_sparsity,
)

try:  # so SAELens's loaders, which catch EntryNotFoundError for optional files, treat "not cached" alike
    from huggingface_hub.errors import EntryNotFoundError as _EntryNotFound
except ImportError:  # pragma: no cover
    _EntryNotFound = LookupError  # type: ignore[misc,assignment]


class PretrainedNotCachedError(FileNotFoundError, _EntryNotFound):
    """Files of a pretrained SAE are not in the local Hugging Face cache (sparsekern never downloads)."""

    def __init__(
        self,
        repo_id: str,
        files: Sequence[str],
        cache_dir: Path,
        missing: Optional[Sequence[str]] = None,
        revision: Optional[str] = None,
    ):
        missing = list(missing if missing is not None else files)
        self.repo_id, self.files, self.missing, self.cache_dir = repo_id, list(files), missing, cache_dir
        repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
        msg = (
            f"pretrained SAE files are not in the local Hugging Face cache, and sparsekern never downloads.\n"
            f"  repo id:         {repo_id} (revision {revision or 'main'})\n"
            f"  files needed:    {', '.join(self.files)}\n"
            f"  missing:         {', '.join(missing)}\n"
            f"  cache directory: {cache_dir}\n"
            "Fetch them where there is network "
            f"(e.g. `huggingface-cli download {repo_id} {' '.join(missing)}`) "
            f"and copy that cache here, or place each file at {repo_dir}/snapshots/<commit>/<file> with "
            f"{repo_dir}/refs/{revision or 'main'} containing <commit>. The cache directory comes from "
            "HF_HUB_CACHE, else HF_HOME/hub."
        )
        super().__init__(msg)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, read from the environment now (as huggingface_hub would)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_file(
    repo_id: str,
    filename: str,
    cache_dir: Path,
    revision: Optional[str] = None,
    repo_type: Optional[str] = None,
) -> Optional[str]:
    """Path of ``filename`` in the local cache of ``repo_id`` (a pure file-system look-up), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, filename, cache_dir=str(cache_dir), revision=revision, repo_type=repo_type
    )
    return found if isinstance(found, str) else None


@contextmanager
def _sae_lens_offline(cache_dir: Path) -> Iterator[None]:
    """Swap SAELens's download helpers for cache look-ups (module globals; not thread-safe)."""
    import huggingface_hub.constants as hf_constants
    import sae_lens.loading.pretrained_sae_loaders as L

    def hf_hub_download(
        repo_id: str,
        filename: str,
        *,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        repo_type: Optional[str] = None,
        **_: Any,
    ) -> str:
        name = f"{subfolder}/{filename}" if subfolder else filename
        found = cached_file(repo_id, name, cache_dir, revision, repo_type)
        if found is None:
            raise PretrainedNotCachedError(repo_id, [name], cache_dir, revision=revision)
        return found

    def get_safetensors_tensor_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        from safetensors import safe_open

        with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    def no_network(*_: Any, **__: Any) -> Any:
        raise RuntimeError("sparsekern.from_pretrained makes no network calls")

    patches = {
        "hf_hub_download": hf_hub_download,
        "get_safetensors_tensor_shapes": get_safetensors_tensor_shapes,
        "_get_with_rate_limit_retry": no_network,
    }
    saved = {name: getattr(L, name) for name in patches if hasattr(L, name)}
    offline = hf_constants.HF_HUB_OFFLINE
    try:
        for name, fn in patches.items():
            setattr(L, name, fn)
        hf_constants.HF_HUB_OFFLINE = True  # anything not patched fails fast instead of connecting
        yield
    finally:
        for name in patches:
            if name in saved:
                setattr(L, name, saved[name])
            else:
                delattr(L, name)
        hf_constants.HF_HUB_OFFLINE = offline


def resolve_release(release: str, sae_id: str) -> tuple[str, str, str, dict[str, Any]]:
    """(repo_id, folder, conversion func name, config overrides) via SAELens's registry."""
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides, get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        if "/" not in release:
            raise ValueError(
                f"Release {release!r} not found in SAELens's pretrained SAEs directory, and is not a "
                "Hugging Face repo id (org/name)"
            )
        return release, sae_id, "sae_lens", {}
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        valid = list(lookup.saes_map)
        shown = str(valid[:5])[:-1] + ", ...]" if len(valid) > 5 else str(valid)
        raise ValueError(f"ID {sae_id!r} not found in release {release!r}. Valid IDs are {shown}.")
    return (
        lookup.repo_id,
        lookup.saes_map[sae_id],
        lookup.conversion_func or "sae_lens",
        get_config_overrides(release, sae_id),
    )


def read_pretrained(
    release: str,
    sae_id: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    force_download: bool = False,
    converter: Optional[Callable[..., Any]] = None,
    label: Optional[Label] = None,
    config_fields: Optional[ConfigFields] = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Optional[Tensor]]:
    """(cfg_dict, state_dict, log_sparsity) of a registry SAE, from the local cache only.

    The cfg dict is upgraded by ``handle_config_defaulting`` (``config_fields``: see there; ``label``:
    see ``read_sae_lens_dir``); the SAE-building steps (norm scaling factor, dtype, ``fold_W_dec_norm``)
    are ``SAE.from_pretrained_with_cfg_and_sparsity``'s.
    """
    if force_download:
        raise ValueError(
            "force_download=True is not supported: sparsekern only reads the local Hugging Face cache"
        )
    repo_id, folder, conversion, overrides = resolve_release(release, sae_id)
    check_device(device, f"{release}/{sae_id}")
    overrides = {**overrides, "device": device, "dtype": dtype}
    cache_dir = hf_cache_dir()
    if converter is None and conversion == "sae_lens":
        needed = [f"{folder}/{SAE_CFG_FILENAME}", f"{folder}/{SAE_WEIGHTS_FILENAME}"]
        found = {f: cached_file(repo_id, f, cache_dir) for f in needed}
        missing = [f for f, p in found.items() if p is None]
        if missing:
            raise PretrainedNotCachedError(
                repo_id, [*needed, f"{folder}/{SPARSITY_FILENAME} (optional)"], cache_dir, missing
            )
        folder_path = Path(found[needed[0]]).parent
        if Path(found[needed[1]]).parent != folder_path:
            raise ValueError(f"cached {needed[0]} and {needed[1]} of {repo_id} belong to different snapshots")
        cfg_dict, state_dict = read_sae_lens_dir(folder_path, device, overrides, label=label)
        sparsity_file = cached_file(repo_id, f"{folder}/{SPARSITY_FILENAME}", cache_dir)
        log_sparsity = read_sparsity(sparsity_file, device) if sparsity_file else None
    else:
        from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

        loader = converter or NAMED_PRETRAINED_SAE_LOADERS.get(conversion)
        if loader is None:
            raise ValueError(
                f"release {release!r} uses conversion {conversion!r}, unknown to this SAELens version"
            )
        with _sae_lens_offline(cache_dir):
            cfg_dict, state_dict, log_sparsity = loader(
                repo_id=repo_id,
                folder_name=folder,
                device=device,
                force_download=False,
                cfg_overrides=overrides,
            )
    return handle_config_defaulting(cfg_dict, config_fields), state_dict, log_sparsity


def pretrained_source(release: str, sae_id: str) -> str:
    """``repo_id/folder`` of a registry SAE, for messages."""
    repo_id, folder, _, _ = resolve_release(release, sae_id)
    return f"{repo_id}/{folder}"


def norm_scaling_factor(release: str, sae_id: str) -> Optional[float]:
    """SAELens's registry ``norm_scaling_factor`` of an ``expected_average_only_in`` SAE (None if unknown)."""
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    return get_norm_scaling_factor(release, sae_id)


def load_pretrained(cls: type, release: str, sae_id: str, **kwargs: Any) -> tuple[Any, dict[str, Any], Any]:
    """Old entry point, kept: ``cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, **kwargs)``."""
    return cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, **kwargs)
