"""The base of the SAE family: ``SAEMetadata``, ``SAEConfig`` and ``SAE`` (shared pipeline, weight surgery,
and every build / load / save classmethod).

sparsekern SAEs have the same classes, parameter names/shapes, config fields, hook points and disk format
as ``sae_lens`` v6. What differs is how the code is computed: with no hook on ``hook_sae_acts_pre``/
``hook_sae_acts_post`` the encoder goes straight to a :class:`SparseActs` (``threshold_encode``/
``topk_encode``) and the decoder is ``sparse_decode``; nothing of shape ``[..., d_sae]`` is built except
the dense code that ``encode()`` returns. Hooks on those two points get the dense tensors SAELens gives them.

Architectures (``standard.py``, ``gated.py``, ``jumprelu.py``, ``topk.py``, ``transcoder.py``) differ only
in four small methods (``_dense_pre``/``_dense_act``: SAELens's own dense expressions, used when
``hook_sae_acts_pre`` is hooked; ``_sparse_act``: the op call; ``_code_scale``). Checkpoint files are read
by :mod:`sparsekern.loading`, which returns plain ``(cfg_dict, state_dict)``; the classmethods here build.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, Optional, TypeVar, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule, HookPoint

from ..constants import (
    NORMALIZE_MODES,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
    dtype_to_str,
    str_to_dtype,
)
from ..constants import sae_lens_version as _sae_lens_version
from ..registry import get_sae_class
from ..loading.formats import (
    SPARSIFY_WEIGHTS_FILENAME,
    read_circuit_tracer,
    read_gemma_scope_npz,
    read_sparsify,
)
from ..loading.pretrained import norm_scaling_factor, pretrained_source, read_pretrained
from ..loading.sae_lens_format import (
    check_dtype,
    handle_config_defaulting,
    read_sae_lens_dir,
    read_sparsity,
)
from ..ops import sparse_decode, threshold_encode
from ..sparse_acts import SparseActs, dense_to_sparse  # noqa: F401  (also sparsekern.sae.dense_to_sparse)

T = TypeVar("T", bound="SAE")


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


# ---- configs -----------------------------------------------------------------------------------
_SPARSEKERN_ONLY_FIELDS = ("apply_relu",)  # not in SAELens: omitted from to_dict() at their default


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
            if not (f.name in _SPARSEKERN_ONLY_FIELDS and getattr(self, f.name) == f.default)
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


# ---- helpers -------------------------------------------------------------------------------------
def _has_hooks(hp: nn.Module) -> bool:
    """True if anything would observe or edit this HookPoint's value (so it must be dense)."""
    from torch.nn.modules import module as _m

    return bool(
        hp._forward_hooks
        or hp._forward_pre_hooks
        or hp._backward_hooks
        or hp._backward_pre_hooks
        or _m._global_forward_hooks
        or _m._global_forward_pre_hooks
        or _m._global_backward_hooks
    )


def _version(t: Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


def _identity(x: Tensor) -> Tensor:
    return x


def _identity_out(x: Tensor, d_head: Optional[int]) -> Tensor:
    return x


def _unflatten_heads(x: Tensor, d_head: int) -> Tensor:
    return x.unflatten(-1, (-1, d_head))


class _Code(NamedTuple):
    acts: Union[Tensor, SparseActs]  # the code after hook_sae_acts_post (what decode sees)
    dense: Optional[Tensor]  # the dense code hook_sae_acts_post returned, if it is hooked
    clean: Union[Tensor, SparseActs, None]  # the code before any hook edit; None if a hook edited it
    post_edited: bool
    norm: Any  # statistics of the run-time input normalisation (None if none)


# ---- the SAE -------------------------------------------------------------------------------------
class SAE(HookedRootModule):
    """Base class of every sparsekern SAE / transcoder (the architecture classes subclass it).

    Parameters (as SAELens): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` plus the architecture's own. Hook points: ``hook_sae_input``,
    ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_output``, ``hook_sae_recons``,
    ``hook_sae_error``. The classmethods (``from_dict``, ``load_from_disk``, ``from_pretrained``,
    ``from_sae_lens``, ``load_sparsify``, ``load_circuit_tracer``, ``load_gemma_scope_npz``) return the
    class named by the checkpoint's architecture.
    """

    cfg: SAEConfig
    _is_transcoder: ClassVar[bool] = False
    HOOK_NAMES: ClassVar[tuple[str, ...]] = (
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_output",
        "hook_sae_recons",
        "hook_sae_error",
    )

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False):
        if type(self) is SAE:
            raise TypeError("SAE is abstract: use SAE.from_dict(cfg.to_dict()) or an architecture class")
        super().__init__()
        self.cfg = cfg
        self.dtype = str_to_dtype(cfg.dtype)
        self.device = torch.device(cfg.device)
        self.use_error_term = use_error_term
        self.initialize_weights()
        for name in self.HOOK_NAMES:
            setattr(self, name, HookPoint())
        if cfg.reshape_activations == "hook_z":
            self.turn_on_forward_pass_hook_z_reshaping()
        else:
            self.turn_off_forward_pass_hook_z_reshaping()
        self._norm_state: Any = None  # set by encode(), consumed by decode() (as SAELens)
        self._sparse_sink: Optional[Callable[[str, SparseActs], None]] = None
        self.setup()

    # ---- parameters ------------------------------------------------------------------------
    @property
    def _d_out(self) -> int:
        return self.cfg.d_in

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        return {
            "W_enc": (c.d_in, c.d_sae),
            "b_enc": (c.d_sae,),
            "W_dec": (c.d_sae, self._d_out),
            "b_dec": (self._d_out,),
        }

    def initialize_weights(self) -> None:
        """Zeros everywhere except a kaiming-uniform decoder (encoder = its transpose when square)."""
        kw = {"dtype": self.dtype, "device": self.device}
        for name, shape in self._param_shapes().items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, **kw)))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            if self._d_out == self.cfg.d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:
                nn.init.kaiming_uniform_(self.W_enc)

    # ---- SAELens switches ---------------------------------------------------------------------
    @property
    def _use_error_term(self) -> bool:  # SAELens's private name, read by some callers
        return self.use_error_term

    @_use_error_term.setter
    def _use_error_term(self, value: bool) -> None:
        self.use_error_term = value

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        """Accept ``[..., n_heads, d_head]`` input (flattened to ``d_in``) and reshape outputs back."""
        hook_name = self.cfg.metadata.hook_name
        if hook_name is not None and not hook_name.endswith("_z"):
            raise ValueError("This method should only be called for hook_z SAEs.")

        # bound methods, not closures: copy.deepcopy / pickle rebind them to the copy
        self.reshape_fn_in = self._flatten_heads
        self.reshape_fn_out = _unflatten_heads
        self.hook_z_reshaping_mode = True

    def _flatten_heads(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"hook_z SAE expects input [..., n_heads, d_head], got {tuple(x.shape)}")
        self.d_head = x.shape[-1]
        return x.flatten(-2)

    def turn_off_forward_pass_hook_z_reshaping(self) -> None:
        self.reshape_fn_in = _identity
        self.reshape_fn_out = _identity_out
        self.d_head = None
        self.hook_z_reshaping_mode = False

    def to(self: T, *args: Any, **kwargs: Any) -> T:
        """``nn.Module.to`` that also updates ``cfg.device`` / ``cfg.dtype`` (as SAELens)."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            if isinstance(a, (torch.device, str)):
                device = a
            elif isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, Tensor):
                device, dtype = a.device, a.dtype
        if device is not None:
            self.device = torch.device(device)
            self.cfg.device = str(self.device)
        if dtype is not None:
            self.dtype = str_to_dtype(dtype)
            self.cfg.dtype = dtype_to_str(dtype)
        return super().to(*args, **kwargs)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "SAE":
        """Every cast / move (``.to``, ``.double()``, ``.half()``, ``.cuda()``, a parent module's ``.to``)
        goes through here: afterwards ``dtype`` / ``device`` and ``cfg.dtype`` / ``cfg.device`` follow the
        parameters, as in SAELens, so the SAE keeps casting its input to the dtype its weights have."""
        out = super()._apply(fn, recurse)
        self._follow_params()
        return out

    def _follow_params(self) -> None:
        p = self._parameters.get("W_dec")
        if p is None:
            return
        if p.dtype != self.dtype:
            self.dtype = p.dtype
            self.cfg.dtype = str(p.dtype).removeprefix("torch.")
        dev = self.device
        # keep the name .to() was given ("cuda" rather than "cuda:0") when it is the same device
        if p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index):
            self.device = p.device
            self.cfg.device = str(p.device)

    # ---- the four architecture-specific pieces (this base is the ReLU / "standard" SAE) ---------
    def _dense_pre(self, xc: Tensor) -> Tensor:
        """Dense pre-activations exactly as SAELens computes them (only when acts_pre is hooked)."""
        return xc @ self.W_enc + self.b_enc

    def _dense_act(self, xc: Tensor, pre: Tensor) -> Tensor:
        """Dense activation of a (possibly hook-edited) dense ``pre``, as SAELens."""
        return pre.relu()

    def _sparse_act(self, sae_in: Tensor, b_in: Optional[Tensor]) -> SparseActs:
        """The same code via the sparse ops; ``b_in`` is the bias subtracted from the input, if any."""
        return threshold_encode(sae_in, self.W_enc, self.b_enc, 0.0, b_dec=b_in)

    def _code_scale(self) -> Optional[Tensor]:
        """Per-feature factor applied to the code before decoding (TopK decoder-norm rescaling)."""
        return None

    # ---- shared pipeline -------------------------------------------------------------------------
    def _hook(self, name: str, t: Tensor, hooks: bool) -> tuple[Tensor, bool]:
        """Run a hook point; also report whether a hook replaced or edited the tensor in place."""
        if not hooks:
            return t, False
        v = _version(t)
        out = getattr(self, name)(t)
        return out, (out is not t or (v is not None and _version(out) != v))

    def _input_bias(self) -> Optional[Tensor]:
        return self.b_dec if self.cfg.apply_b_dec_to_input and not self._is_transcoder else None

    def _process_in(self, x: Tensor, hooks: bool) -> tuple[Tensor, Any, bool]:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor input, got {type(x).__name__}")
        if x.device != self.W_enc.device:
            raise ValueError(
                f"input is on {x.device} but {type(self).__name__}'s weights are on {self.W_enc.device}; "
                "move one of them (sae.to(device) or x.to(device))"
            )
        sae_in = x.to(self.dtype)  # SAELens casts the input to the SAE dtype
        if not self._is_transcoder:
            sae_in = self.reshape_fn_in(sae_in)
        if sae_in.dim() == 0 or sae_in.shape[-1] != self.cfg.d_in:
            z = " (or [..., n_heads, d_head] with n_heads*d_head = d_in for this hook_z SAE)"
            raise ValueError(
                f"{type(self).__name__} expects input of shape [..., d_in={self.cfg.d_in}]"
                f"{z if self.hook_z_reshaping_mode and not self._is_transcoder else ''}, got {tuple(x.shape)}"
            )
        sae_in, edited = self._hook("hook_sae_input", sae_in, hooks)
        sae_in, norm = self._norm_in(sae_in)
        return sae_in, norm, edited

    def _norm_in(self, x: Tensor) -> tuple[Tensor, Any]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, ("scale", coeff)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), ("ln", mu, std)
        return x, None

    def _norm_out(self, x: Tensor, norm: Any) -> Tensor:
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if norm is None:
                raise RuntimeError(
                    f"decode() of a normalize_activations={self.cfg.normalize_activations!r} SAE needs the "
                    "statistics of the encode() call that produced the code; call encode() first"
                )
            return x / norm[1] if norm[0] == "scale" else x * norm[2] + norm[1]
        return x

    def _encode(self, x: Tensor, hooks: bool = True) -> _Code:
        sae_in, norm, edited = self._process_in(x, hooks)
        b_in = self._input_bias()
        if hooks and _has_hooks(self.hook_sae_acts_pre):
            xc = sae_in - b_in if b_in is not None else sae_in
            pre, pre_edited = self._hook("hook_sae_acts_pre", self._dense_pre(xc), True)
            edited = edited or pre_edited
            code: Union[Tensor, SparseActs] = self._dense_act(xc, pre)
        else:  # the point of sparsekern: no [.., d_sae] pre-activations at all
            pre = None
            code = self._sparse_act(sae_in, b_in)
        acts, dense, post_edited = code, None, False
        if hooks and _has_hooks(self.hook_sae_acts_post):
            dense = code if isinstance(code, Tensor) else code.to_dense(self.cfg.d_sae)
            v = _version(dense)
            dense, post_edited = self._hook("hook_sae_acts_post", dense, True)
            # a dense code edited in place is gone; a sparse code is untouched by edits of its to_dense copy
            if isinstance(code, Tensor) and dense is code and v is not None and _version(code) != v:
                edited = True
            if post_edited:
                acts = dense  # else keep decoding the (sparse) code itself
        sink = getattr(self, "_sparse_sink", None) if hooks else None
        if sink is not None:
            self._emit_sparse(sink, acts, pre, sae_in, b_in)
        return _Code(acts, dense, None if edited else code, post_edited, norm)

    # ---- sparse activation capture (HookedSAETransformer.run_with_cache_with_saes(sparse=True)) ----
    def _emit_sparse(
        self, sink: Callable[[str, SparseActs], None], acts: Union[Tensor, SparseActs],
        pre: Optional[Tensor], sae_in: Tensor, b_in: Optional[Tensor],
    ) -> None:
        """Give ``sink`` the code (``hook_sae_acts_post``) and its pre-activations (``..._pre``), sparse.

        The pre-activations are kept only at the code's features: the values there are exact (from the
        dense pre-activations if a hook made them, else recomputed for just those features).
        """
        post = acts if isinstance(acts, SparseActs) else dense_to_sparse(acts)
        if pre is not None:
            pre_vals = pre.gather(-1, post.indices)
        else:
            xc = sae_in - b_in if b_in is not None else sae_in
            pre_vals = self._pre_at(xc, post)
        if pre_vals is not post.values:
            # padding slots (value 0, not a feature the code selected) stay 0 in both
            slots = post.values != 0 if isinstance(acts, Tensor) else self._code_slots(post)
            pre_vals = torch.where(slots, pre_vals, torch.zeros_like(pre_vals))
        sink("hook_sae_acts_post", post)
        sink("hook_sae_acts_pre", post if pre_vals is post.values else SparseActs(pre_vals, post.indices))

    def _code_slots(self, code: SparseActs) -> Tensor:
        """Which slots of a sparse code hold selected features (threshold codes pad with zeros)."""
        return code.values != 0

    def _pre_at(self, xc: Tensor, code: SparseActs) -> Tensor:
        """Pre-activations at the code's features. ReLU/JumpReLU: an active feature's code value *is*
        its pre-activation, so the code's values are returned as they are."""
        return code.values

    def _gather_pre(self, xc: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``(xc @ W + bias)[..., indices]`` for just those features, in row chunks (no [.., d_sae])."""
        flat_x, flat_i = xc.reshape(-1, xc.shape[-1]), indices.reshape(-1, indices.shape[-1])
        out = torch.empty(flat_i.shape, dtype=xc.dtype, device=xc.device)
        k = max(1, flat_i.shape[1])
        step = max(1, (1 << 21) // (k * xc.shape[-1]))
        with torch.no_grad():
            for r in range(0, flat_x.shape[0], step):
                cols = W[:, flat_i[r : r + step]]  # [d_in, rows, k]
                out[r : r + step] = torch.einsum("rd,drk->rk", flat_x[r : r + step], cols)
            if bias is not None:
                out += bias[flat_i]
        return out.view(indices.shape)

    def _decode_raw(self, f: Union[Tensor, SparseActs]) -> Tensor:
        """``f @ W_dec + b_dec`` (dense f) or ``sparse_decode`` (SparseActs); no hooks."""
        scale = self._code_scale()
        if isinstance(f, SparseActs):
            values = f.values.to(self.dtype)
            if scale is not None:
                values = values * scale[f.indices]
            return sparse_decode(values, f.indices, self.W_dec, self.b_dec)
        if not isinstance(f, Tensor) or f.dim() == 0 or f.shape[-1] != self.cfg.d_sae:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"decode expects a dense code [..., d_sae={self.cfg.d_sae}] or SparseActs, got {shape}"
            )
        f = f.to(self.dtype)
        if scale is not None:
            f = f * scale
        return f @ self.W_dec + self.b_dec

    def _finish_decode(self, recon: Tensor, norm: Any, hooks: bool) -> tuple[Tensor, bool]:
        out, edited = self._hook("hook_sae_recons", recon, hooks)
        return self.reshape_fn_out(self._norm_out(out, norm), self.d_head), edited

    # ---- public API --------------------------------------------------------------------------
    def process_sae_in(self, sae_in: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """Cast, reshape (hook_z), ``hook_sae_input``, normalise, subtract ``b_dec`` -- as SAELens."""
        x, norm, _ = self._process_in(sae_in, True)
        self._norm_state = norm
        b_in = self._input_bias()
        return x - b_in if b_in is not None else x

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Dense feature activations ``[..., d_sae]`` (SAELens's ``encode``), built from the sparse code."""
        c = self._encode(x)
        self._norm_state = c.norm
        if c.dense is not None:
            return c.dense
        return c.acts if isinstance(c.acts, Tensor) else c.acts.to_dense(self.cfg.d_sae)

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseActs:
        """The code as :class:`SparseActs` ``[..., k]``; ``encode_sparse(x).to_dense(d_sae) == encode(x)``.

        Hooks fire as in ``encode``; if a hook on ``hook_sae_acts_post`` edits the code, the edited dense
        code is converted back (k = its largest row L0).
        """
        c = self._encode(x)
        self._norm_state = c.norm
        return c.acts if isinstance(c.acts, SparseActs) else dense_to_sparse(c.acts)

    def decode(
        self, feature_acts: Union[Float[Tensor, "*batch d_sae"], SparseActs]
    ) -> Float[Tensor, "*batch d_in"]:
        """Reconstruction ``[..., d_in]`` of a dense code (matmul) or :class:`SparseActs` (``sparse_decode``).

        Then ``hook_sae_recons``, run-time de-normalisation and hook_z reshaping, as SAELens.
        """
        norm, self._norm_state = self._norm_state, None
        return self._finish_decode(self._decode_raw(feature_acts), norm, True)[0]

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """``decode(encode(x))`` (+ the error term if ``use_error_term``), then ``hook_sae_output``.

        With ``use_error_term`` SAELens re-runs the SAE without hooks to get the clean reconstruction;
        here it comes from the same encode, taken before any hook edit (a second hook-free pass happens
        only if a hook edited ``hook_sae_input``/``hook_sae_acts_pre`` or a dense code in place).
        """
        out = self._reconstruct(x, x if self.use_error_term else None, self.hook_sae_error)
        return self._hook("hook_sae_output", out, True)[0]

    def _reconstruct(
        self,
        x: Tensor,
        error_target: Optional[Tensor] = None,
        error_hook: Optional[Callable[[Tensor], Tensor]] = None,
        error_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``decode(encode(x))`` with hooks; plus ``error_hook(error_target - clean reconstruction)``.

        The clean (hook-free) reconstruction is taken from the same encode when no hook edited the
        code on its way (SAELens always runs a second, hook-free pass). ``error_mask`` (broadcast over
        the last dim) zeroes the error where true. Shared by ``forward`` and HookedSAETransformer.
        """
        c = self._encode(x)
        recon = self._decode_raw(c.acts)
        v = _version(recon)
        out, recons_edited = self._finish_decode(recon, c.norm, True)
        if error_target is None:
            return out
        with torch.no_grad():
            if c.clean is None:
                c = self._encode(x, hooks=False)
                clean = self._decode_raw(c.acts)
            elif c.post_edited or (recons_edited and v is not None and _version(recon) != v):
                clean = self._decode_raw(c.clean)
            else:
                clean = recon
            clean = self._finish_decode(clean, c.norm, False)[0]
            sae_error = error_target - clean
            if error_mask is not None:
                sae_error = torch.where(error_mask, torch.zeros_like(sae_error), sae_error)
            if error_hook is not None:
                sae_error = error_hook(sae_error)
        return out + sae_error

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

    # ---- construction / IO (readers live in sparsekern.loading; building happens here) -----------
    @classmethod
    def _class_for(cls: type[T], architecture: str) -> type[T]:
        sae_cls = get_sae_class(architecture)[0]
        if not issubclass(sae_cls, cls):
            raise ValueError(f"Loaded SAE is not of type {cls.__name__}. Use {sae_cls.__name__} instead")
        return sae_cls

    @classmethod
    def from_dict(cls: type[T], config_dict: dict[str, Any]) -> T:
        """A freshly initialised SAE of the architecture named in ``config_dict`` (a cfg.json dict)."""
        cfg = SAEConfig.from_dict(config_dict)
        return cls._class_for(cfg.architecture())(cfg)

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
        there would silently drop every weight).
        """
        where = f" in {source}" if source else ""
        cfg = SAEConfig.from_dict(handle_config_defaulting(dict(cfg_dict)))
        if torch.device(cfg.device).type == "meta" and any(
            isinstance(t, Tensor) and not t.is_meta for t in state_dict.values()
        ):
            raise ValueError(
                f"the config{where} asks for the 'meta' device, which holds no data: loading there would "
                "discard every weight; use 'cpu' or an accelerator"
            )
        sae_cls = cls._class_for(cfg.architecture())
        device = cfg.device
        cfg.device = "meta"  # allocate nothing; load_state_dict(assign=True) brings the real tensors
        sae = sae_cls(cfg)
        sae.cfg.device = device
        sae.process_state_dict_for_loading(state_dict)
        try:
            sae.load_state_dict(state_dict, assign=True)
        except RuntimeError as e:
            raise ValueError(
                f"weights{where} do not fit a {sae_cls.__name__} with d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                f" (expected tensors {dict(sae._param_shapes())}): {e}"
            ) from None
        sae = sae.to(dtype=str_to_dtype(cfg.dtype), device=device)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae

    @classmethod
    def _build(
        cls: type[T],
        cfg_dict: dict[str, Any],
        state_dict: dict[str, Tensor],
        dtype: Union[str, torch.dtype, None],
        source: Union[str, Path],
    ) -> T:
        """A reader's ``(cfg_dict, state_dict)`` -> SAE, in ``dtype`` if given (else the file's)."""
        cfg_dict = dict(cfg_dict)
        if dtype is not None:
            cfg_dict["dtype"] = dtype_to_str(check_dtype(dtype, source))
        else:
            check_dtype(cfg_dict.get("dtype", "float32"), source)
        state = {k: v.contiguous() for k, v in state_dict.items()}
        return _check_cls(cls, SAE.from_cfg_and_state_dict(cfg_dict, state, source=str(source)))

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
        ``group`` (default WORLD); only its slice of the features is read.
        """
        if shard:
            if converter is not None:
                raise ValueError("load_from_disk(shard=True) reads SAELens folders only (no converter)")
            from ..distributed import ShardedSAE

            return _check_cls(cls, ShardedSAE.load_from_disk(path, device, dtype, group=group,
                                                             fold_W_dec_norm=fold_W_dec_norm))
        return cls.load_from_disk_with_sparsity(path, device, dtype, converter, fold_W_dec_norm)[0]

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
        overrides = {"dtype": dtype} if dtype is not None else None
        if converter is None:
            cfg_dict, state_dict = read_sae_lens_dir(path, device, overrides)
        else:
            cfg_dict, state_dict = converter(path, device, cfg_overrides=overrides)
        sae = cls.from_cfg_and_state_dict(
            cfg_dict, state_dict, fold_W_dec_norm=fold_W_dec_norm, source=str(path)
        )
        return sae, read_sparsity(Path(path) / SPARSITY_FILENAME, device)

    def save_model(self, path: Union[str, Path], sparsity: Optional[Tensor] = None) -> tuple[Path, Path]:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) as SAELens does.

        Atomic: the arguments and the config are checked first, everything is written to a temporary
        folder next to ``path``, and that folder is renamed into place, so a failed save leaves an
        existing checkpoint at ``path`` as it was (and no temporary folder). Other files already in
        ``path`` are kept; the checkpoint files there are replaced (a stale ``sparsity.safetensors`` too).
        """
        from safetensors.torch import save_file

        path = Path(path)
        if sparsity is not None and (
            not isinstance(sparsity, Tensor)
            or not sparsity.is_floating_point()
            or tuple(sparsity.shape) != (self.cfg.d_sae,)
        ):
            t = sparsity
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"sparsity must be a float tensor [d_sae={self.cfg.d_sae}], got {got}")
        try:
            cfg_json = json.dumps(self.cfg.to_dict())
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"cannot save {type(self).__name__} to {path}: its config is not JSON-serialisable ({e}); "
                "nothing was written"
            ) from None
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"cannot save an SAE to {path}: it exists and is not a folder")
        extra = self._not_sae_lens_loadable()
        if extra:
            warnings.warn(f"{type(self).__name__} saved to {path}: {extra}", stacklevel=2)
        state_dict = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving(state_dict)
        target = Path(os.path.realpath(path))  # a symlinked folder: replace what it points to
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_folder(target, "saving")
        try:
            save_file(state_dict, str(tmp / SAE_WEIGHTS_FILENAME))
            if sparsity is not None:
                save_file({"sparsity": sparsity.detach().contiguous()}, str(tmp / SPARSITY_FILENAME))
            (tmp / SAE_CFG_FILENAME).write_text(cfg_json)
            _swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already if the swap succeeded
        return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME

    def _not_sae_lens_loadable(self) -> Optional[str]:
        """Why SAELens would load this checkpoint differently (None if it loads it exactly)."""
        return None

    @classmethod
    def from_sae_lens(cls: type[T], sae: Any, *, copy: bool = False) -> T:
        """The sparsekern equivalent of any SAELens SAE / transcoder / training SAE.

        Weights share storage with ``sae`` unless ``copy=True`` (training SAEs are converted to their
        inference form, e.g. BatchTopK -> JumpReLU, via SAELens's own save-for-inference hooks, on a copy).
        """
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
        out = cls.from_cfg_and_state_dict(cfg_dict, sd)
        out.use_error_term = bool(getattr(sae, "use_error_term", False))
        if getattr(sae, "hook_z_reshaping_mode", False) and not out.hook_z_reshaping_mode:
            out.turn_on_forward_pass_hook_z_reshaping()
        return out

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
        cfg_dict, state_dict, log_sparsity = read_pretrained(
            release, sae_id, device=device, dtype=dtype, force_download=force_download, converter=converter
        )
        sae = cls.from_cfg_and_state_dict(cfg_dict, state_dict, source=pretrained_source(release, sae_id))
        if cfg_dict.get("normalize_activations") == "expected_average_only_in":
            factor = norm_scaling_factor(release, sae_id)
            if factor is not None:
                sae.fold_activation_norm_scaling_factor(factor)
                cfg_dict["normalize_activations"] = "none"
            else:
                warnings.warn(
                    f"norm_scaling_factor not found for {release} and {sae_id}, but normalize_activations is "
                    "'expected_average_only_in'. Skipping normalization folding.",
                    stacklevel=2,
                )
        sae = sae.to(dtype=str_to_dtype(dtype), device=device)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae, cfg_dict, log_sparsity

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
        cfg, state = read_sparsify(path, hook_name=hook_name, hook_name_out=hook_name_out, device=device)
        return cls._build(cfg, state, dtype, Path(path) / SPARSIFY_WEIGHTS_FILENAME)

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
        cfg, state = read_circuit_tracer(
            path, hook_name=hook_name, hook_name_out=hook_name_out, device=device
        )
        return cls._build(cfg, state, dtype, path)

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
        cfg, state = read_gemma_scope_npz(
            path, transcoder=transcoder, hook_name=hook_name, hook_name_out=hook_name_out, device=device
        )
        return cls._build(cfg, state, dtype, path)


def _check_cls(cls: type, sae: SAE) -> SAE:
    if not isinstance(sae, cls):
        raise ValueError(f"Loaded SAE is not of type {cls.__name__}. Use {type(sae).__name__} instead")
    return sae


_CHECKPOINT_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)


def _new_folder(target: Path, what: str) -> Path:
    """A new empty hidden folder next to ``target`` (``os.mkdir``, so the umask applies, unlike mkdtemp)."""
    for _ in range(100):
        folder = target.parent / f".{target.name}.{what}-{uuid.uuid4().hex[:12]}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a temporary folder next to {target}")


def _swap_in(new: Path, target: Path) -> None:
    """Make the finished folder ``new`` be ``target``, with renames only (same file system).

    Entries of an existing ``target`` other than the checkpoint files are moved into ``new`` first;
    on any failure everything is moved back, so ``target`` is left as it was.
    """
    if not target.exists():
        os.rename(new, target)
        return
    moved: list[str] = []
    old: Optional[Path] = None
    try:
        for name in os.listdir(target):
            if name not in _CHECKPOINT_FILES:
                os.rename(target / name, new / name)
                moved.append(name)
        shutil.copymode(target, new)
        old = _new_folder(target, "old")
        os.rename(target, old)  # replaces the empty placeholder folder
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    except BaseException:
        for name in reversed(moved):
            os.rename(new / name, target / name)
        if old is not None and old.exists() and not any(old.iterdir()):
            old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
