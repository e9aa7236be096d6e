"""Jacob Dunefsky's ``transcoder_circuits`` ``SparseAutoencoder``, on sparsekern kernels.

Drop-in for ``sae_training.sparse_autoencoder.SparseAutoencoder`` from
github.com/jacobdunefsky/transcoder_circuits (the GPT-2 small transcoders of "Transcoders Find
Interpretable LLM Feature Circuits", distributed as ``pchlenski/gpt2-transcoders``)::

    from sparsekern.compat.transcoder_circuits import (
        SparseAutoencoder, live_features, load_log_feature_sparsity)
    stem = "final_sparse_autoencoder_gpt2-small_blocks.8.ln2.hook_normalized_24576"
    tc = SparseAutoencoder.load_from_pretrained(f"{stem}.pt").eval()
    feature_acts = tc(x)[1]                     # x: [..., d_in] at tc.cfg.hook_point
    live = live_features(load_log_feature_sparsity(f"{stem}_log_feature_sparsity.pt"))

Differences from his class, all deliberate:

* Loading needs neither his package nor wandb and never runs pickled code
  (:func:`sparsekern.loading.safe_pickle.safe_load`); ``cfg`` is an inert
  :class:`LanguageModelSAERunnerConfig` stand-in holding the pickled attributes.
* Tensors are loaded to CPU first and then placed on ``device`` (default ``cfg.device``, or CPU
  with a warning when that device is unavailable -- his loader fails there instead).
* It is a plain ``nn.Module``, not a TransformerLens ``HookedRootModule``: no ``hook_sae_in`` /
  ``hook_hidden_pre`` / ``hook_hidden_post`` / ``hook_sae_out`` hook points. ``state_dict()``
  keys are his (hook points hold no state).
* ``dtype`` / ``device`` are properties that follow ``.to()`` (his are frozen at construction).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from ..loading.safe_pickle import ConfigStandIn, CorruptCheckpointError, safe_load
from ..loading.sae_lens_format import check_device
from ..ops import sparse_decode, threshold_encode
from ..sparse_acts import SparseActs

__all__ = [
    "LanguageModelSAERunnerConfig",
    "SparseAutoencoder",
    "live_features",
    "load_log_feature_sparsity",
]

PathLike = Union[str, "os.PathLike[str]"]


class LanguageModelSAERunnerConfig(ConfigStandIn):
    """Stand-in for ``sae_training.config.LanguageModelSAERunnerConfig`` (no wandb, no prints).

    Unpickling only copies the pickled attributes (his ``__post_init__`` already ran when the
    file was written, so ``d_sae`` etc. are stored). Class attributes below are his dataclass
    defaults for the fields this module reads, used only if a file lacks them. Can also be built
    directly: ``LanguageModelSAERunnerConfig(d_in=768, d_sae=24576, is_transcoder=True, ...)``.
    """

    model_name: str = "gelu-2l"
    hook_point: str = "blocks.0.hook_mlp_out"
    hook_point_layer: int = 0
    hook_point_head_index: Optional[int] = None
    d_in: int = 512
    expansion_factor: int = 4
    device: Any = "cpu"
    dtype: Any = torch.float32
    is_transcoder: bool = False
    out_hook_point: Optional[str] = None
    out_hook_point_layer: Optional[int] = None
    d_out: Optional[int] = None
    l1_coefficient: float = 1e-3
    use_ghost_grads: Any = False


# the only non-torch global his files contain, admitted under its pickled name
_CONFIG_GLOBALS = {"sae_training.config.LanguageModelSAERunnerConfig": LanguageModelSAERunnerConfig}


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"cfg.dtype must be a torch.dtype (or its name), got {dtype!r}")


def _usable_device(device: Any, *, what: str) -> torch.device:
    """``torch.device(device)``, or CPU (with a warning) when that accelerator is absent."""
    dev = torch.device(device)
    available = {
        "cuda": torch.cuda.is_available,
        "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }.get(dev.type, lambda: True)()
    if not available:
        warnings.warn(f"{what}: device {dev} is not available here; loading on cpu instead", stacklevel=3)
        return torch.device("cpu")
    return dev


def _check_cfg_against_weights(cfg: Any, state_dict: Mapping[str, Tensor], name: str) -> None:
    """The sizes ``SparseAutoencoder(cfg)`` would allocate must be positive ints matching the tensors."""

    def size(what: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: cfg {what} must be a positive int, got {value!r}")
        return value

    d_in = size("d_in", cfg.d_in)
    d_sae = getattr(cfg, "d_sae", None)
    if d_sae is None or d_sae == 0:  # his rule: d_sae or d_in * expansion_factor
        d_sae = size("expansion_factor", getattr(cfg, "expansion_factor", None)) * d_in
    d_sae = size("d_sae", d_sae)
    d_out = d_in
    if cfg.is_transcoder and getattr(cfg, "d_out", None) is not None:
        d_out = size("d_out", cfg.d_out)
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_in,)}
    if cfg.is_transcoder:
        want["b_dec_out"] = (d_out,)
    got = {k: tuple(state_dict[k].shape) for k in want if k in state_dict}
    if got != want:
        raise ValueError(
            f"{name}: weights do not match the file's cfg (d_in={d_in}, d_sae={d_sae}, d_out={d_out}): "
            f"expected {want}, found {got}"
        )


class SparseAutoencoder(nn.Module):
    """Dunefsky's SAE / transcoder: ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out``.

    Parameters (names, shapes and ``state_dict()`` keys as his):
        W_enc:     [d_in, d_sae]
        b_enc:     [d_sae]
        W_dec:     [d_sae, d_out]
        b_dec:     [d_in]   input pre-bias, subtracted before encoding (the output bias too
                            when ``cfg.is_transcoder`` is false)
        b_dec_out: [d_out]  output bias; ``None`` (absent from ``state_dict()``) for a plain SAE

    ``cfg`` fields read: ``d_in``, ``d_sae`` (or ``d_in * expansion_factor``), ``d_out``,
    ``is_transcoder``, ``l1_coefficient``, ``dtype``, ``device``, ``use_ghost_grads``; analysis
    code also reads ``hook_point``, ``hook_point_layer``, ``out_hook_point``, ``out_hook_point_layer``.
    """

    b_dec_out: Optional[nn.Parameter]

    def __init__(self, cfg: Any, *, init_weights: bool = True) -> None:
        """Build from a config object (his dataclass, our stand-in, or anything with the fields).

        ``init_weights=False`` skips his kaiming init (``load_from_pretrained`` overwrites it).
        """
        super().__init__()
        self.cfg = cfg
        self.d_in = cfg.d_in
        if not isinstance(self.d_in, int):
            raise ValueError(f"d_in must be an int but was {self.d_in=}; {type(self.d_in)=}")
        self.d_sae = int(getattr(cfg, "d_sae", None) or cfg.d_in * cfg.expansion_factor)
        self.l1_coefficient = cfg.l1_coefficient
        # his rule: d_out defaults to d_in unless a transcoder names one
        self.d_out = self.d_in
        if cfg.is_transcoder and getattr(cfg, "d_out", None) is not None:
            self.d_out = int(cfg.d_out)
        dtype, device = _as_dtype(cfg.dtype), torch.device(cfg.device)

        def empty(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        self.W_enc = nn.Parameter(empty(self.d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(empty(self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dtype, device=device))
        if cfg.is_transcoder:
            self.b_dec_out = nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=device))
        else:
            self.register_parameter("b_dec_out", None)
        if init_weights:
            with torch.no_grad():  # his init: kaiming-uniform, unit-norm decoder rows
                nn.init.kaiming_uniform_(self.W_enc)
                nn.init.kaiming_uniform_(self.W_dec)
                self.W_dec /= torch.norm(self.W_dec, dim=1, keepdim=True)

    # ---- properties that follow .to() ------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def _out_bias(self) -> Tensor:
        return self.b_dec_out if self.b_dec_out is not None else self.b_dec

    # ---- compute ---------------------------------------------------------------------------
    def get_sparse_acts(self, x: Float[Tensor, "*batch d_in"]) -> SparseActs:
        """Active features of ``relu((x - b_dec) @ W_enc + b_enc)`` as ``SparseActs [..., k]``.

        ``x`` is cast to the model dtype as in his ``forward``. Differentiable.
        """
        return threshold_encode(x.to(self.dtype), self.W_enc, self.b_enc, 0.0, b_dec=self.b_dec)

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseActs:
        """:meth:`get_sparse_acts` under the name sparsekern SAEs use (``top_activating_examples`` etc.)."""
        return self.get_sparse_acts(x)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Dense ``feature_acts [..., d_sae]`` (= ``self(x)[1]`` without the losses)."""
        return self.get_sparse_acts(x).to_dense(self.d_sae)

    def decode_sparse(self, acts: SparseActs) -> Float[Tensor, "*batch d_out"]:
        """``acts @ W_dec + b_dec_out`` (``+ b_dec`` for a plain SAE), from a sparse code."""
        return sparse_decode(acts.values, acts.indices, self.W_dec, self._out_bias)

    def forward(
        self,
        x: Float[Tensor, "*batch d_in"],
        dead_neuron_mask: Optional[Bool[Tensor, "d_sae"]] = None,
        mse_target: Optional[Float[Tensor, "*batch d_out"]] = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """His 6-tuple ``(sae_out, feature_acts, loss, mse_loss, l1_loss, mse_loss_ghost_resid)``.

        Same signature as his. ``sae_out [..., d_out]`` and dense ``feature_acts [..., d_sae]``
        come from ``threshold_encode`` (threshold 0 = ReLU, ``b_dec`` as pre-bias) and
        ``sparse_decode``. The losses replicate his code term by term, quirks included:

        * ``mse_loss = mean((sae_out - t)**2 / ||t||_2)``, the norm per row over the last dim
          (not squared), ``t = mse_target`` if given else ``x`` -- also for a transcoder, where
          his training loop passes ``mse_target=mlp_out``; without it the number compares the
          output with the input, exactly as his code does. (If ``x`` and ``sae_out`` differ in
          shape, where his code would crash, ``mse_loss`` is NaN.)
        * ``l1_loss = l1_coefficient * |feature_acts|.sum(dim=1).mean(dim=0)``: a scalar for
          ``[batch, d_in]`` input, but a ``[d_sae]`` vector for ``[batch, pos, d_in]`` input
          (his dim=1 sums over positions); 1-D input (his code crashes) sums everything.
        * ``mse_loss_ghost_resid``: 0 unless ``cfg.use_ghost_grads`` is truthy, the module is in
          training mode and ``dead_neuron_mask`` selects a feature; then his ghost-grad term
          (residual taken against ``x``, not ``mse_target``, as in his code).
        * ``loss = mse_loss + l1_loss + mse_loss_ghost_resid``.
        """
        x = x.to(self.dtype)
        acts = self.get_sparse_acts(x)
        sae_out = self.decode_sparse(acts)
        feature_acts = acts.to_dense(self.d_sae)

        target = x if mse_target is None else mse_target
        if target.shape == sae_out.shape:
            norm = (target**2).sum(dim=-1, keepdim=True).sqrt()
            per_item_mse = torch.pow(sae_out - target.float(), 2) / norm
        else:
            per_item_mse = torch.full_like(sae_out, float("nan"))

        ghost = torch.tensor(0.0, dtype=self.dtype, device=self.device)
        # his gate (truthiness included: his dataclass default `use_ghost_grads: bool = False,`
        # is the tuple (False,), which is truthy)
        if (
            getattr(self.cfg, "use_ghost_grads", False)
            and self.training
            and dead_neuron_mask is not None
            and dead_neuron_mask.sum() > 0
        ):
            ghost = self._ghost_grad_loss(x, sae_out, per_item_mse, dead_neuron_mask)

        mse_loss_ghost_resid = ghost.mean()
        mse_loss = per_item_mse.mean()
        if feature_acts.dim() >= 2:
            sparsity = torch.abs(feature_acts).sum(dim=1).mean(dim=(0,))
        else:
            sparsity = torch.abs(feature_acts).sum()
        l1_loss = self.l1_coefficient * sparsity
        loss = mse_loss + l1_loss + mse_loss_ghost_resid
        return sae_out, feature_acts, loss, mse_loss, l1_loss, mse_loss_ghost_resid

    def _ghost_grad_loss(
        self, x: Tensor, sae_out: Tensor, per_item_mse: Tensor, dead_neuron_mask: Tensor
    ) -> Tensor:
        """His ghost-grad term, per item (``[..., d_out]``); averaged by the caller."""
        if dead_neuron_mask.shape != (self.d_sae,) or dead_neuron_mask.dtype != torch.bool:
            raise ValueError(
                f"dead_neuron_mask must be a bool [d_sae]={self.d_sae} tensor, got "
                f"{dead_neuron_mask.dtype} {tuple(dead_neuron_mask.shape)}"
            )
        if x.shape != sae_out.shape:
            raise ValueError(
                "ghost grads take the residual x - sae_out (as his code does), which needs d_in == d_out; "
                f"got x {tuple(x.shape)} and sae_out {tuple(sae_out.shape)}"
            )
        residual = x - sae_out
        l2_norm_residual = torch.norm(residual, dim=-1)
        # pre-activations of the dead features only (his hidden_pre[:, dead_neuron_mask])
        hidden_pre_dead = (x - self.b_dec) @ self.W_enc[:, dead_neuron_mask] + self.b_enc[dead_neuron_mask]
        ghost_out = torch.exp(hidden_pre_dead) @ self.W_dec[dead_neuron_mask, :]
        l2_norm_ghost_out = torch.norm(ghost_out, dim=-1)
        norm_scaling_factor = l2_norm_residual / (1e-6 + l2_norm_ghost_out * 2)
        ghost_out = ghost_out * norm_scaling_factor[..., None].detach()
        ghost = torch.pow(ghost_out - residual.detach().float(), 2) / (residual.detach() ** 2).sum(
            dim=-1, keepdim=True
        ).sqrt()
        mse_rescaling_factor = (per_item_mse / (ghost + 1e-6)).detach()
        return mse_rescaling_factor * ghost

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load_from_pretrained(
        cls,
        path: PathLike,
        *,
        device: Union[None, str, torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "SparseAutoencoder":
        """Load his ``.pt`` (``torch.save``), ``.pkl`` (pickle) or ``.pkl.gz`` (gzip'd pickle).

        The file holds ``{"cfg": LanguageModelSAERunnerConfig(...), "state_dict": {...}}``.
        Read with :func:`~sparsekern.loading.safe_pickle.safe_load`: his package and wandb are
        not imported, ``cfg`` becomes a :class:`LanguageModelSAERunnerConfig` stand-in, and any
        other non-tensor global raises ``UnsafePickleError`` before anything runs.

        Args:
            path: the checkpoint (format sniffed from content, so a misnamed file still loads).
            device: where to put the weights; default ``cfg.device``, falling back to CPU with
                a warning if that accelerator is absent. ``cfg.device`` is updated to match.
            dtype: parameter dtype; default ``cfg.dtype`` (his ``load_state_dict`` also casts
                to it). ``cfg.dtype`` is updated to match.

        Raises:
            FileNotFoundError, UnsafePickleError, CorruptCheckpointError (message names the
            file), ValueError (file is not his layout or the weights do not match the cfg).
        """
        name = os.fspath(path)
        obj = safe_load(name, extra_globals=_CONFIG_GLOBALS, map_location="cpu")
        if not isinstance(obj, Mapping) or "cfg" not in obj or "state_dict" not in obj:
            keys = f" with keys {list(obj)!r}" if isinstance(obj, Mapping) else ""
            raise ValueError(
                f"{name}: the loaded state dictionary must contain 'cfg' and 'state_dict' keys "
                f"(got {type(obj).__name__}{keys})"
            )
        cfg, state_dict = obj["cfg"], obj["state_dict"]
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise ValueError(f"{name}: 'state_dict' must map parameter names to tensors")
        for field in ("d_in", "is_transcoder", "l1_coefficient"):
            if not hasattr(cfg, field):
                raise ValueError(f"{name}: cfg ({type(cfg).__name__}) has no {field!r}")

        # everything is checked before the module allocates its parameters
        if device is not None:
            cfg.device = check_device(device, name)
        else:
            try:
                cfg.device = _usable_device(getattr(cfg, "device", "cpu"), what=name)
            except (RuntimeError, TypeError, ValueError) as e:
                bad = getattr(cfg, "device", None)
                raise ValueError(f"{name}: cfg.device {bad!r} is not a device: {e}") from None
            check_device(cfg.device, name)  # the meta device would drop every weight
        try:
            dt = _as_dtype(dtype if dtype is not None else getattr(cfg, "dtype", torch.float32))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if not dt.is_floating_point:
            raise ValueError(f"{name}: dtype {dt} is not a floating-point dtype")
        cfg.dtype = dt
        _check_cfg_against_weights(cfg, state_dict, name)
        instance = cls(cfg, init_weights=False)
        try:
            # like his load_state_dict: strict keys, values copied into cfg.dtype on cfg.device
            instance.load_state_dict(dict(state_dict))
        except RuntimeError as e:
            raise ValueError(f"{name}: weights do not match the file's cfg: {e}") from None
        return instance

    # ---- conversion ------------------------------------------------------------------------
    def _folded_transcoder(
        self, transcoder_cls: Any, config_cls: Any, metadata_cls: Any, share_weights: bool = False
    ) -> nn.Module:
        """Build a sae_lens-style Transcoder with the input pre-bias folded into ``b_enc``.

        ``relu((x - b_dec) @ W_enc + b_enc) = relu(x @ W_enc + (b_enc - b_dec @ W_enc))``, so the
        target needs no input bias (``apply_b_dec_to_input=False``); its ``b_dec`` is our
        ``b_dec_out``. The fold is computed in float64. ``share_weights``: ``W_enc``, ``W_dec`` and
        ``b_dec`` are this module's own Parameters (the folded ``b_enc`` is always a new tensor).
        """
        if self.b_dec_out is None:
            raise ValueError(
                "only a transcoder (cfg.is_transcoder=True) converts to a Transcoder; this is a plain SAE"
            )
        cfg = self.cfg
        tc_cfg = config_cls(
            d_in=self.d_in,
            d_sae=self.d_sae,
            d_out=self.d_out,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            apply_b_dec_to_input=False,
            metadata=metadata_cls(
                hook_name=cfg.hook_point,
                hook_name_out=getattr(cfg, "out_hook_point", None),
                hook_layer=getattr(cfg, "hook_point_layer", None),
            ),
        )
        with torch.no_grad():
            b_enc = (self.b_enc.double() - self.b_dec.double() @ self.W_enc.double()).to(self.dtype)
        if share_weights:
            shared = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec_out}
            shared["b_enc"] = nn.Parameter(b_enc, requires_grad=self.b_enc.requires_grad)
            return self._with_params(transcoder_cls, tc_cfg, shared)
        tc = transcoder_cls(tc_cfg)
        tc.load_state_dict(
            {
                "W_enc": self.W_enc.detach().clone(),
                "b_enc": b_enc,
                "W_dec": self.W_dec.detach().clone(),
                "b_dec": self.b_dec_out.detach().clone(),
            }
        )
        return tc

    def _with_params(self, sae_cls: Any, sae_cfg: Any, params: dict[str, nn.Parameter]) -> nn.Module:
        """A sparsekern SAE whose parameters are ``params`` (the objects themselves, not copies)."""
        device = sae_cfg.device
        sae_cfg.device = "meta"  # allocate nothing: every parameter is replaced below
        sae = sae_cls(sae_cfg)
        for name, p in params.items():
            setattr(sae, name, p)
        return sae.to(device)  # sets cfg.device back; the parameters are already there

    def to_sparsekern(self, *, share_weights: bool = False) -> nn.Module:
        """Equivalent sparsekern module: a ``Transcoder`` (input pre-bias folded into ``b_enc``), or
        for a plain SAE (``cfg.is_transcoder`` false) a ``StandardSAE`` (same four weights).

        ``share_weights=True`` reuses this module's Parameters instead of copies -- all four for a
        plain SAE; for a transcoder all but the folded ``b_enc``, which is recomputed from ``b_enc``,
        ``b_dec`` and ``W_enc`` at conversion (``HookedSAETransformer.add_sae`` converts this way).
        """
        from .. import saes as sk  # lazy: the SAE family imports transformer_lens
        if self.b_dec_out is not None:
            return self._folded_transcoder(
                sk.Transcoder, sk.TranscoderConfig, sk.SAEMetadata, share_weights
            )
        cfg = self.cfg
        sae_cfg = sk.StandardSAEConfig(
            d_in=self.d_in,
            d_sae=self.d_sae,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            apply_b_dec_to_input=True,  # his b_dec is both the input pre-bias and the output bias
            metadata=sk.SAEMetadata(
                hook_name=cfg.hook_point, hook_layer=getattr(cfg, "hook_point_layer", None)
            ),
        )
        names = ("W_enc", "b_enc", "W_dec", "b_dec")
        if share_weights:
            return self._with_params(sk.StandardSAE, sae_cfg, {n: getattr(self, n) for n in names})
        sae = sk.StandardSAE(sae_cfg)
        sae.load_state_dict({n: getattr(self, n).detach().clone() for n in names})
        return sae

    def to_sae_lens(self) -> nn.Module:
        """Equivalent ``sae_lens.Transcoder`` (needs sae-lens >= 6; same folding as :meth:`to_sparsekern`)."""
        from sae_lens import Transcoder, TranscoderConfig
        from sae_lens.saes.sae import SAEMetadata

        return self._folded_transcoder(Transcoder, TranscoderConfig, SAEMetadata)

    def get_name(self) -> str:
        """His naming: ``sparse_autoencoder_{model_name}_{hook_point}_{d_sae}``."""
        return f"sparse_autoencoder_{self.cfg.model_name}_{self.cfg.hook_point}_{self.cfg.d_sae}"


# ---- companion feature-frequency file ----------------------------------------------------------
def load_log_feature_sparsity(
    path: PathLike, *, map_location: Union[str, torch.device] = "cpu"
) -> Float[Tensor, "d_sae"]:
    """His ``*_log_feature_sparsity.pt``: ``log10(firing_freq + 1e-10)`` per feature, ``[d_sae]``.

    A plain ``torch.save``'d tensor, so ``torch.load(weights_only=True)`` reads it safely.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"No file found at specified path: {name}")
    try:
        t = torch.load(name, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure, reported with the file name
        raise CorruptCheckpointError(
            f"{name}: could not load log feature sparsity: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 1-D float tensor [d_sae], got {desc}")
    return t


def live_features(
    log_sparsity: Float[Tensor, "d_sae"], threshold: float = -4.0
) -> Bool[Tensor, "d_sae"]:
    """Mask of features firing more often than ``10**threshold`` (his "live": log10 freq > -4)."""
    return log_sparsity > threshold
