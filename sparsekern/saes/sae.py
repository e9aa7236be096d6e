"""The base of the SAE family: :class:`SAE` = the pipeline (:mod:`.pipeline`) + weight surgery + the
SAELens-named build / load / save classmethods, each a thin call into :mod:`.io`.

sparsekern SAEs have the same classes, parameter names/shapes, config fields, hook points and disk format
as ``sae_lens`` v6; what differs is how the code is computed (see :mod:`.pipeline`). Configs live in
:mod:`.config`, one file per architecture adds its config and class (``standard.py``, ``gated.py``,
``jumprelu.py``, ``topk.py``, ``transcoder.py``). Checkpoint files are read by :mod:`sparsekern.loading`,
which returns plain ``(cfg_dict, state_dict)``; :func:`.io.build_sae` builds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..loading.formats import (
    SPARSIFY_WEIGHTS_FILENAME,
    read_circuit_tracer,
    read_gemma_scope_npz,
    read_sparsify,
)
from . import io
from .config import SAEConfig, SAEMetadata  # noqa: F401  (sparsekern.saes.sae.SAEConfig, as before)
from .pipeline import SAEPipeline
from ..sparse_acts import SparseActs, dense_to_sparse  # noqa: F401  (also sparsekern.sae.dense_to_sparse)

T = TypeVar("T", bound="SAE")


class SAE(SAEPipeline):
    """Base class of every sparsekern SAE / transcoder (the architecture classes subclass it).

    Parameters and hook points: see :class:`~sparsekern.saes.pipeline.SAEPipeline`. The classmethods
    (``from_dict``, ``from_cfg_and_state_dict``, ``load_from_disk``, ``from_pretrained``, ``from_sae_lens``,
    ``load_sparsify``, ``load_circuit_tracer``, ``load_gemma_scope_npz``) return the class named by the
    checkpoint's architecture, and raise ValueError if that is not a ``cls``.
    """

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False):
        if type(self) is SAE:
            raise TypeError("SAE is abstract: use SAE.from_dict(cfg.to_dict()) or an architecture class")
        super().__init__(cfg, use_error_term)

    # ---- weight surgery (as SAELens) ---------------------------------------------------------
    @torch.no_grad()
    def get_W_dec_norm(self) -> Float[Tensor, "d_sae"]:
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> Float[Tensor, "d_sae"]:
        """Unit-norm the decoder rows and scale the encoder columns (and ``b_enc``) to compensate."""
        norms = self.get_W_dec_norm()
        self.W_dec.data.div_(norms.unsqueeze(1))
        self.W_enc.data.mul_(norms.unsqueeze(0))
        if isinstance(getattr(self, "b_enc", None), nn.Parameter):
            self.b_enc.data.mul_(norms)
        return norms

    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder; outputs are unchanged, codes are scaled by the norms."""
        self.fold_and_get_W_dec_norm()

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        self.W_enc.data *= scaling_factor
        self.W_dec.data /= scaling_factor
        self.b_dec.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        pass

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        pass

    def get_name(self) -> str:
        return f"sae_{self.cfg.metadata.model_name}_{self.cfg.metadata.hook_name}_{self.cfg.d_sae}"

    # ---- building (every route is io.build_sae) ----------------------------------------------
    @classmethod
    def from_dict(cls: type[T], config_dict: dict[str, Any]) -> T:
        """A freshly initialised SAE of the architecture named in ``config_dict`` (a cfg.json dict)."""
        cfg = SAEConfig.from_dict(config_dict)
        return io.sae_class_for(cls, cfg.architecture())(cfg)

    @classmethod
    def from_cfg_and_state_dict(
        cls: type[T],
        cfg_dict: dict[str, Any],
        state_dict: dict[str, Tensor],
        *,
        fold_W_dec_norm: bool = False,
        source: Optional[str] = None,
    ) -> T:
        """Build from a cfg.json-style dict and a state dict (tensors are used as-is, not copied).

        A config asking for the ``meta`` device while the tensors hold data is an error (moving them
        there would silently drop every weight). See :func:`sparsekern.saes.io.build_sae`.
        """
        return io.build_sae(cls, cfg_dict, state_dict, fold_W_dec_norm=fold_W_dec_norm, source=source)

    @classmethod
    def from_sae_lens(cls: type[T], sae: Any, *, copy: bool = False) -> T:
        """The sparsekern equivalent of any SAELens SAE / transcoder / training SAE.

        Weights share storage with ``sae`` unless ``copy=True`` (training SAEs are converted to their
        inference form, e.g. BatchTopK -> JumpReLU, via SAELens's own save-for-inference hooks, on a copy).
        """
        return io.from_sae_lens(cls, sae, copy=copy)

    # ---- SAELens folders ---------------------------------------------------------------------
    @classmethod
    def load_from_disk(
        cls: type[T],
        path: Union[str, Path],
        device: str = "cpu",
        dtype: Optional[str] = None,
        converter: Optional[Callable[..., tuple[dict[str, Any], dict[str, Tensor]]]] = None,
        fold_W_dec_norm: bool = False,
        *,
        shard: bool = False,
        group: Any = None,
    ) -> T:
        """Load a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``).

        ``converter`` is an SAELens-style disk loader ``(path, device, cfg_overrides) -> (cfg_dict,
        state_dict)`` for other layouts. ``dtype`` overrides the config's; ``fold_W_dec_norm`` as SAELens.
        ``shard=True``: this rank's :class:`sparsekern.distributed.ShardedSAE` over the process group
        ``group`` (default WORLD); only its slice of the features is read (the loader registered with
        :func:`sparsekern.registry.register_shard_loader`).
        """
        if shard:
            if converter is not None:
                raise ValueError("load_from_disk(shard=True) reads SAELens folders only (no converter)")
            return io.load_sharded(cls, path, device, dtype, group=group, fold_W_dec_norm=fold_W_dec_norm)
        return io.load_sae_lens_dir(cls, path, device, dtype, converter, fold_W_dec_norm)[0]

    @classmethod
    def load_from_pretrained(
        cls: type[T], path: Union[str, Path], device: str = "cpu", dtype: Optional[str] = None
    ) -> T:
        """Deprecated alias of :meth:`load_from_disk` (as in SAELens 6, with its DeprecationWarning)."""
        warnings.warn("Use load_from_disk instead", DeprecationWarning, stacklevel=2)
        return cls.load_from_disk(path, device=device, dtype=dtype)

    @classmethod
    def load_from_disk_with_sparsity(
        cls: type[T],
        path: Union[str, Path],
        device: str = "cpu",
        dtype: Optional[str] = None,
        converter: Optional[Callable[..., tuple[dict[str, Any], dict[str, Tensor]]]] = None,
        fold_W_dec_norm: bool = False,
    ) -> tuple[T, Optional[Float[Tensor, "d_sae"]]]:
        """``load_from_disk`` plus the folder's ``sparsity.safetensors`` tensor (log10 density) or None."""
        return io.load_sae_lens_dir(cls, path, device, dtype, converter, fold_W_dec_norm)

    def save_model(self, path: Union[str, Path], sparsity: Optional[Tensor] = None) -> tuple[Path, Path]:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) as SAELens does.

        Atomic: the arguments and the config are checked first, everything is written to a temporary
        folder next to ``path``, and that folder is renamed into place, so a failed save leaves an
        existing checkpoint at ``path`` as it was (and no temporary folder). Other files already in
        ``path`` are kept; the checkpoint files there are replaced (a stale ``sparsity.safetensors`` too).
        """
        return io.save_sae(self, path, sparsity)

    def _not_sae_lens_loadable(self) -> Optional[str]:
        """Why SAELens would load this checkpoint differently (None if it loads it exactly)."""
        return None

    # ---- SAELens's pretrained registry (local Hugging Face cache only) -------------------------
    @classmethod
    def from_pretrained(
        cls: type[T],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str = "float32",
        force_download: bool = False,
        converter: Optional[Callable[..., Any]] = None,
        fold_W_dec_norm: bool = False,
    ) -> T:
        """An SAELens registry SAE (release, sae_id), read only from the local Hugging Face cache.

        Never touches the network: with the files not cached it raises :class:`PretrainedNotCachedError`
        (a ``FileNotFoundError``) naming the repo, the files and the cache directory to put them in.
        """
        return cls.from_pretrained_with_cfg_and_sparsity(
            release, sae_id, device, dtype, force_download, converter, fold_W_dec_norm
        )[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(
        cls: type[T],
        release: str,
        sae_id: str,
        device: str = "cpu",
        dtype: str = "float32",
        force_download: bool = False,
        converter: Optional[Callable[..., Any]] = None,
        fold_W_dec_norm: bool = False,
    ) -> tuple[T, dict[str, Any], Optional[Tensor]]:
        """``from_pretrained`` plus the cfg dict and the log-sparsity tensor (None if not cached).

        As SAELens: an ``expected_average_only_in`` SAE gets the registry's norm scaling factor folded
        into its weights (``normalize_activations`` becomes ``"none"``), then dtype and ``fold_W_dec_norm``.
        """
        return io.from_pretrained(
            cls, release, sae_id, device, dtype, force_download, converter, fold_W_dec_norm
        )

    # ---- other formats (readers in sparsekern.loading.formats) -------------------------------
    @classmethod
    def load_sparsify(
        cls: type[T],
        path: Union[str, Path],
        *,
        hook_name: Optional[str] = None,
        hook_name_out: Optional[str] = None,
        device: str = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
    ) -> T:
        """An EleutherAI sparsify folder (cfg.json + sae.safetensors) -> ``TopKSAE`` / ``TopKTranscoder`` /
        ``TopKSkipTranscoder`` (see :func:`sparsekern.loading.read_sparsify`). ``dtype`` defaults to the
        file's."""
        read = read_sparsify(path, hook_name=hook_name, hook_name_out=hook_name_out, device=device)
        return io.build_from_reader(cls, read, dtype, Path(path) / SPARSIFY_WEIGHTS_FILENAME)

    @classmethod
    def load_circuit_tracer(
        cls: type[T],
        path: Union[str, Path],
        *,
        hook_name: Optional[str] = None,
        hook_name_out: Optional[str] = None,
        device: str = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
    ) -> T:
        """A circuit-tracer transcoder safetensors file (see :func:`sparsekern.loading.read_circuit_tracer`).
        ``dtype`` defaults to the file's."""
        read = read_circuit_tracer(path, hook_name=hook_name, hook_name_out=hook_name_out, device=device)
        return io.build_from_reader(cls, read, dtype, path)

    @classmethod
    def load_gemma_scope_npz(
        cls: type[T],
        path: Union[str, Path],
        *,
        transcoder: bool = False,
        hook_name: Optional[str] = None,
        hook_name_out: Optional[str] = None,
        device: str = "cpu",
        dtype: Union[str, torch.dtype, None] = None,
    ) -> T:
        """A Gemma Scope ``params.npz`` -> ``JumpReLUSAE``, or ``JumpReLUTranscoder`` with ``transcoder=True``
        (see :func:`sparsekern.loading.read_gemma_scope_npz`). ``dtype`` defaults to the file's."""
        read = read_gemma_scope_npz(
            path, transcoder=transcoder, hook_name=hook_name, hook_name_out=hook_name_out, device=device
        )
        return io.build_from_reader(cls, read, dtype, path)
