"""SAE configuration: ``SAEMetadata`` (free-form, SAELens's) and ``SAEConfig`` (the fields every
architecture shares; each architecture file subclasses it with its own fields and ``architecture()`` name).

``SAEConfig.from_dict`` builds the config class a cfg.json dict names (through :mod:`sparsekern.registry`);
upgrading pre-6.0 SAELens dicts first is :func:`sparsekern.saes.io.config_from_dict`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..constants import NORMALIZE_MODES, dtype_to_str, str_to_dtype
from ..constants import sae_lens_version as _sae_lens_version
from ..registry import get_sae_class


class SAEMetadata:
    """Free-form metadata (``hook_name``, ``hook_name_out``, ``model_name``, ...), as SAELens's.

    Missing attributes read as ``None``; dict-style access works; ``to_dict``/``from_dict`` round-trip.
    """

    def __init__(self, **kwargs: Any):
        self.sae_lens_version = kwargs.pop("sae_lens_version", _sae_lens_version())
        self.sae_lens_training_version = kwargs.pop("sae_lens_training_version", _sae_lens_version())
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep copy/pickle protocols working
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):
        return self.__dict__.keys()

    def values(self):
        return self.__dict__.values()

    def items(self):
        return self.__dict__.items()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEMetadata":
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEMetadata) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"SAEMetadata({self.__dict__})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


SPARSEKERN_ONLY_FIELDS = ("apply_relu",)  # not in SAELens: omitted from to_dict() at their default


@dataclass
class SAEConfig:
    """Fields shared by every architecture (same names and defaults as SAELens's ``SAEConfig``)."""

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    @classmethod
    def architecture(cls) -> str:
        raise NotImplementedError(f"{cls.__name__} is abstract; use an architecture's config class")

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {v!r}")
        self.dtype = self.dtype if isinstance(self.dtype, str) else dtype_to_str(self.dtype)
        str_to_dtype(self.dtype)  # validate early
        self.device = str(self.device)
        if self.normalize_activations is None:
            self.normalize_activations = "none"
        if self.normalize_activations not in NORMALIZE_MODES:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZE_MODES}, got {self.normalize_activations!r}"
            )
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(
                f"reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}"
            )
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``architecture``; ``metadata`` as a dict (the cfg.json layout).

        sparsekern-only fields (``apply_relu``) are left out while at their default, so the dict of an
        SAELens-compatible config is exactly SAELens's.
        """
        res = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not (f.name in SPARSEKERN_ONLY_FIELDS and getattr(self, f.name) == f.default)
        }
        res["metadata"] = self.metadata.to_dict()
        res["architecture"] = self.architecture()
        return res

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "SAEConfig":
        """Build the config class named by ``config_dict["architecture"]`` (unknown keys are ignored)."""
        arch = config_dict.get("architecture")
        cfg_cls = get_sae_class(arch)[1] if arch is not None else cls
        if not issubclass(cfg_cls, cls):
            raise ValueError(f"config architecture {arch!r} ({cfg_cls.__name__}) is not a {cls.__name__}")
        names = {f.name for f in fields(cfg_cls)} - {"metadata"}
        res = cfg_cls(**{k: v for k, v in config_dict.items() if k in names})
        if "metadata" in config_dict:
            res.metadata = SAEMetadata(**(config_dict["metadata"] or {}))
        return res

