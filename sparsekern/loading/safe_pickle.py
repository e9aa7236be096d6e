"""Load pickled third-party checkpoints without executing pickled code.

Research checkpoints are often a pickled ``dict`` holding tensors *and* an instance of the
trainer's own config class (e.g. ``sae_training.config.LanguageModelSAERunnerConfig``). Loading
them with ``pickle.load`` / ``torch.load(weights_only=False)`` imports that package (and whatever
it imports, e.g. wandb) and runs any ``__reduce__`` payload the file carries. :func:`safe_load`
instead admits an explicit allowlist of globals and maps the trainer's config classes to inert
stand-ins (subclasses of :class:`ConfigStandIn`) that only store attributes.

Formats (detected from the file's first bytes, not its extension):

* ``torch.save`` zip (and the legacy non-zip ``torch.save`` format): loaded with torch's own
  hardened ``weights_only=True`` unpickler; the stand-ins are admitted for that call only via
  ``torch.serialization.safe_globals``.
* plain pickle, optionally gzip'd (``.pkl`` / ``.pkl.gz``): loaded with :class:`RestrictedUnpickler`,
  whose ``find_class`` is the only way a pickle can reach a callable.

A refused global raises :class:`UnsafePickleError` (a ``pickle.UnpicklingError``) naming it,
before anything is called; an unreadable file raises :class:`CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any, Optional, Union

import torch

__all__ = [
    "ConfigStandIn",
    "CorruptCheckpointError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "safe_load",
]

PathLike = Union[str, "os.PathLike[str]"]
MapLocation = Union[None, str, torch.device, Callable, Mapping]

_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
# legacy (pre-1.6) torch.save: starts with pickle protocol 2 + LONG1 of torch's MAGIC_NUMBER
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist; nothing was executed.

    Attributes: ``global_name`` (``"module.name"`` as the pickle spelled it, or None if the
    refusal came from torch without a name) and ``path`` (the file, when known).
    """

    def __init__(self, message: str, *, global_name: Optional[str] = None, path: Optional[str] = None):
        super().__init__(message)
        self.global_name = global_name
        self.path = path


class CorruptCheckpointError(OSError):
    """The file could not be read as a checkpoint (truncated, not a pickle, bad zip, ...)."""


class ConfigStandIn:
    """Inert replacement for a trainer's pickled config class: a bag of attributes.

    Unpickling creates it with ``object.__new__`` and :meth:`__setstate__` copies the pickled
    ``__dict__`` onto it. Nothing else runs: no ``__post_init__``, no import of the original
    package. Subclasses may declare class-level defaults for fields older files lack.
    """

    def __init__(self, **fields: Any) -> None:
        self.__setstate__(fields)

    def __setstate__(self, state: Any) -> None:
        # pickle BUILD passes the instance __dict__, or (dict, slotstate) for classes with slots
        if state is None:
            return
        if isinstance(state, tuple) and len(state) == 2:
            dict_state, slot_state = state
            items = list((dict_state or {}).items()) + list((slot_state or {}).items())
        elif isinstance(state, dict):
            items = list(state.items())
        else:
            raise UnsafePickleError(
                f"{type(self).__name__}: pickled state must be a dict of attributes, "
                f"got {type(state).__name__}"
            )
        for key, value in items:
            # dunders (__class__, __dict__, ...) and names of our own methods could change
            # behaviour rather than data: refuse them
            if not isinstance(key, str) or not key.isidentifier() or key.startswith("__"):
                raise UnsafePickleError(f"{type(self).__name__}: refused pickled attribute name {key!r}")
            if callable(getattr(type(self), key, None)):
                raise UnsafePickleError(
                    f"{type(self).__name__}: pickled attribute {key!r} would shadow a method"
                )
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The stored attributes (a copy of the instance ``__dict__``)."""
        return dict(vars(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # mutable, like the dataclasses it stands in for

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({body})"


# ---- plain pickles -------------------------------------------------------------------------
def _dtype_globals() -> dict[str, Any]:
    # every torch.dtype, as pickle spells them (dtype.__reduce__ -> "torch.float32")
    return {f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


def _latin1_encode(s: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); admit that codec only
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"_codecs.encode: refused encoding {encoding!r}", global_name="_codecs.encode"
        )
    return s.encode("latin1")


def _base_globals() -> dict[str, Any]:
    """What a pickled ``{str: tensor | dtype | device | OrderedDict}`` needs, and nothing more.

    ``torch.storage._load_from_bytes`` is deliberately *not* admitted as itself: it calls
    ``torch.load(weights_only=False)`` on its argument. :class:`RestrictedUnpickler` maps it to
    a weights-only equivalent instead.
    """
    allowed: dict[str, Any] = {
        # how pickle.dumps(tensor) / state_dict() tensors and parameters are rebuilt
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.device": torch.device,
        "collections.OrderedDict": OrderedDict,  # state_dict() container and tensor hook dicts
        "_codecs.encode": _latin1_encode,
    }
    allowed.update(_dtype_globals())
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only an explicit allowlist.

    ``find_class`` is how every GLOBAL / STACK_GLOBAL / EXT opcode resolves a callable or class,
    so a pickle can only call, instantiate or ``__setstate__`` what is listed here. Persistent ids
    are refused by the base class (no ``persistent_load``).

    Args:
        file: binary stream holding a plain pickle.
        extra_globals: ``{"module.name": object}`` to admit besides tensors/dtypes/devices/
            OrderedDict, e.g. a trainer's config class mapped to a :class:`ConfigStandIn`.
        map_location: where tensors pickled via ``torch.storage._load_from_bytes`` are put.
    """

    def __init__(
        self,
        file: IO[bytes],
        *,
        extra_globals: Optional[Mapping[str, Any]] = None,
        map_location: MapLocation = "cpu",
    ) -> None:
        super().__init__(file)
        self._allowed = _base_globals()
        self._allowed["torch.storage._load_from_bytes"] = self._load_from_bytes
        self._allowed.update(extra_globals or {})
        self._extra = dict(extra_globals or {})
        self._map_location = map_location

    def _load_from_bytes(self, data: bytes) -> Any:
        # same job as torch.storage._load_from_bytes (a legacy torch.save'd storage), but through
        # torch's weights-only unpickler so the nested pickle is policed too
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafePickleError(
                "torch.storage._load_from_bytes: expected bytes", global_name="torch.storage._load_from_bytes"
            )
        return _torch_weights_only(io.BytesIO(bytes(data)), self._extra, self._map_location, name=None)

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        try:
            return self._allowed[full]
        except KeyError:
            raise UnsafePickleError(
                f"refused to unpickle global {full!r}: not in the allowlist (tensors, torch dtypes, "
                "torch.device, OrderedDict, and known config classes); nothing was executed",
                global_name=full,
            ) from None


# ---- torch.save files ----------------------------------------------------------------------
_TORCH_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_TORCH_FUNC_RE = re.compile(r"unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE)


def _torch_weights_only(
    f: Union[str, IO[bytes]], extra: Mapping[str, Any], map_location: MapLocation, *, name: Optional[str]
) -> Any:
    """``torch.load(weights_only=True)`` with ``extra`` admitted under their pickled names."""
    try:
        with torch.serialization.safe_globals([(obj, full) for full, obj in extra.items()]):
            return torch.load(f, map_location=map_location, weights_only=True)
    except UnsafePickleError:
        raise
    except pickle.UnpicklingError as e:
        # torch's message says which global it refused; it drops the "builtins." prefix
        msg = str(e)
        m = _TORCH_GLOBAL_RE.search(msg) or _TORCH_FUNC_RE.search(msg)
        glob = m.group(1).strip() if m else None
        if glob and "." not in glob:
            glob = f"builtins.{glob}"
        where = f"{name}: " if name else ""
        what = f"global {glob!r}" if glob else "the pickle"
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        raise UnsafePickleError(
            f"{where}refused to unpickle {what} (torch weights-only unpickler); nothing was executed. "
            f"torch said: {first}",
            global_name=glob,
            path=name,
        ) from None


# ---- entry point ---------------------------------------------------------------------------
def safe_load(
    path: PathLike,
    *,
    extra_globals: Optional[Mapping[str, Any]] = None,
    map_location: MapLocation = "cpu",
) -> Any:
    """Load a ``torch.save`` / pickle / gzip'd-pickle file without executing pickled code.

    Args:
        path: the file. Its format is sniffed from its first bytes (zip -> ``torch.save``,
            gzip -> gunzip then sniff again, legacy ``torch.save`` magic, else plain pickle).
        extra_globals: ``{"module.qualname": object}`` admitted besides tensors, torch dtypes,
            ``torch.device`` and ``OrderedDict``. Map a trainer's config class to a
            :class:`ConfigStandIn` subclass here; never map it to anything that runs code.
        map_location: passed to ``torch.load`` for every tensor (default CPU, so files saved
            from CUDA load anywhere).

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle references a global outside the allowlist (message and
            ``.global_name`` name it). Raised when the global is *looked up*, before any call.
        CorruptCheckpointError: truncated / corrupt / not a pickle (message names the file).
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"No file found at specified path: {name}")
    extra = dict(extra_globals or {})
    try:
        with open(name, "rb") as fh:
            head = fh.read(len(_TORCH_LEGACY_MAGIC))
            fh.seek(0)
            if head.startswith(_GZIP_MAGIC):
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    inner = gz.peek(len(_TORCH_LEGACY_MAGIC))[: len(_TORCH_LEGACY_MAGIC)]
                    if inner.startswith((_ZIP_MAGIC, _TORCH_LEGACY_MAGIC)):
                        # torch.load needs a seekable stream
                        return _torch_weights_only(io.BytesIO(gz.read()), extra, map_location, name=name)
                    return RestrictedUnpickler(gz, extra_globals=extra, map_location=map_location).load()
            if head.startswith((_ZIP_MAGIC, _TORCH_LEGACY_MAGIC)):
                return _torch_weights_only(name, extra, map_location, name=name)
            return RestrictedUnpickler(fh, extra_globals=extra, map_location=map_location).load()
    except UnsafePickleError as e:
        if e.path is None:
            e.path = name
            e.args = (f"{name}: {e.args[0]}",) + e.args[1:]
        raise
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, UnicodeDecodeError, MemoryError) as e:
        # everything here is "the bytes are not a well-formed checkpoint"; refused globals were
        # handled above, so no pickled code ran
        raise CorruptCheckpointError(
            f"{name}: could not load checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
