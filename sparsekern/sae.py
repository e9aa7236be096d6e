"""SAELens-compatible SAEs (``sparsekern.SAE``) whose encode/decode run on the sparse ops.

Same classes, parameter names/shapes, config fields, hook points and disk format as ``sae_lens`` v6
(``StandardSAE``, ``GatedSAE``, ``JumpReLUSAE``, ``TopKSAE``; transcoders in ``transcoder.py``).
What differs is how the code is computed: with no hook on ``hook_sae_acts_pre``/``hook_sae_acts_post``
the encoder goes straight to a :class:`SparseActs` (``threshold_encode``/``topk_encode``) and the
decoder is ``sparse_decode``; nothing of shape ``[..., d_sae]`` is built except the dense code that
``encode()`` returns. Hooks on those two points get the dense tensors SAELens gives them.

Architectures differ only in four small methods (``_dense_pre``/``_dense_act``: SAELens's own dense
expressions, used when ``hook_sae_acts_pre`` is hooked; ``_sparse_act``: the op call; ``_code_scale``);
everything else is shared in :class:`SAE`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple, Optional, TypeVar, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule, HookPoint

from .ops import sparse_decode, threshold_encode, topk_encode
from .sparse_acts import SparseActs, dense_to_sparse  # noqa: F401  (also sparsekern.sae.dense_to_sparse)

T = TypeVar("T", bound="SAE")

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

NORMALIZE_MODES = (
    "none",
    "expected_average_only_in",  # folded into the weights by from_pretrained; identity at inference
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",  # folded at save time by SAELens; identity at inference
)
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def str_to_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``"float32"`` / ``"torch.float32"`` / ``torch.float32`` -> ``torch.float32`` (as SAELens)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_to_str(dtype: Union[str, torch.dtype]) -> str:
    return str(str_to_dtype(dtype)).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def _sae_lens_version() -> str:
    # SAELens reads metadata.sae_lens_version to decide whether a cfg.json predates v6
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"


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


# ---- architecture registry ---------------------------------------------------------------------
_REGISTRY: dict[str, tuple[type["SAE"], type["SAEConfig"]]] = {}


def register_sae_class(architecture: str, sae_cls: type["SAE"], cfg_cls: type["SAEConfig"]) -> None:
    """Register an architecture name (the ``architecture`` key of cfg.json) -> (SAE class, config class)."""
    _REGISTRY[architecture] = (sae_cls, cfg_cls)


def get_sae_class(architecture: str) -> tuple[type["SAE"], type["SAEConfig"]]:
    """(SAE class, config class) for an architecture name; ValueError listing the known ones."""
    from . import transcoder  # noqa: F401  (registers the transcoder architectures)

    if architecture not in _REGISTRY:
        hint = (
            " (BatchTopK / Matryoshka checkpoints are saved for inference as 'jumprelu')"
            if "batchtopk" in str(architecture)
            else ""
        )
        raise ValueError(
            f"unknown SAE architecture {architecture!r}{hint}; known architectures: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[architecture]


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


@dataclass
class StandardSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "standard"


@dataclass
class GatedSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "gated"


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu"


@dataclass
class TopKSAEConfig(SAEConfig):
    """``k`` active features; ``rescale_acts_by_decoder_norm`` ranks ``pre * ||W_dec[f]||``."""

    k: int = 100
    rescale_acts_by_decoder_norm: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"TopK k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}")


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
        """Give ``sink`` the code (``hook_sae_acts_post``) and its pre-activations (``..._pre``) as SparseActs.

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

    # ---- construction / IO (formats live in sparsekern.loading) ------------------------------
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
        """Build from a cfg.json-style dict and a state dict (tensors are used as-is, not copied)."""
        from .loading.sae_lens_format import handle_config_defaulting

        cfg = SAEConfig.from_dict(handle_config_defaulting(dict(cfg_dict)))
        sae_cls = cls._class_for(cfg.architecture())
        device = cfg.device
        cfg.device = "meta"  # allocate nothing; load_state_dict(assign=True) brings the real tensors
        sae = sae_cls(cfg)
        sae.cfg.device = device
        sae.process_state_dict_for_loading(state_dict)
        try:
            sae.load_state_dict(state_dict, assign=True)
        except RuntimeError as e:
            where = f" in {source}" if source else ""
            raise ValueError(
                f"weights{where} do not fit a {sae_cls.__name__} with d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                f" (expected tensors {dict(sae._param_shapes())}): {e}"
            ) from None
        sae = sae.to(dtype=str_to_dtype(cfg.dtype), device=device)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae

    @classmethod
    def load_from_disk(
        cls: type[T],
        path: Union[str, Path],
        device: str = "cpu",
        dtype: Optional[str] = None,
        converter: Optional[Callable[..., tuple[dict[str, Any], dict[str, Tensor]]]] = None,
        fold_W_dec_norm: bool = False,
    ) -> T:
        """Load a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``).

        ``converter`` is an SAELens-style disk loader ``(path, device, cfg_overrides) -> (cfg_dict,
        state_dict)`` for other layouts. ``dtype`` overrides the config's; ``fold_W_dec_norm`` as SAELens.
        """
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
        from .loading.sae_lens_format import read_sae_lens_dir, read_sparsity

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
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) as SAELens does."""
        from safetensors.torch import save_file

        extra = self._not_sae_lens_loadable()
        if extra:
            warnings.warn(f"{type(self).__name__} saved to {path}: {extra}", stacklevel=2)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        self.process_state_dict_for_saving(state_dict)
        weights_path, cfg_path = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
        save_file(state_dict, str(weights_path))
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().contiguous()}, str(path / SPARSITY_FILENAME))
        with open(cfg_path, "w") as f:
            json.dump(self.cfg.to_dict(), f)
        return weights_path, cfg_path

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
        """``from_pretrained`` plus the cfg dict and the log-sparsity tensor (None if not cached)."""
        from .loading.pretrained import load_pretrained

        return load_pretrained(
            cls,
            release,
            sae_id,
            device=device,
            dtype=dtype,
            force_download=force_download,
            converter=converter,
            fold_W_dec_norm=fold_W_dec_norm,
        )

    @classmethod
    def load_sparsify(cls, path: Union[str, Path], **kwargs: Any) -> "SAE":
        """EleutherAI sparsify folder (cfg.json + sae.safetensors); see ``loading.load_sparsify``."""
        from .loading.formats import load_sparsify

        return _check_cls(cls, load_sparsify(path, **kwargs))

    @classmethod
    def load_circuit_tracer(cls, path: Union[str, Path], **kwargs: Any) -> "SAE":
        """circuit-tracer transcoder safetensors; see :func:`sparsekern.loading.load_circuit_tracer`."""
        from .loading.formats import load_circuit_tracer

        return _check_cls(cls, load_circuit_tracer(path, **kwargs))

    @classmethod
    def load_gemma_scope_npz(cls, path: Union[str, Path], **kwargs: Any) -> "SAE":
        """Gemma Scope ``params.npz`` (JumpReLU); see :func:`sparsekern.loading.load_gemma_scope_npz`."""
        from .loading.formats import load_gemma_scope_npz

        return _check_cls(cls, load_gemma_scope_npz(path, **kwargs))


def _check_cls(cls: type, sae: SAE) -> SAE:
    if not isinstance(sae, cls):
        raise ValueError(f"Loaded SAE is not of type {cls.__name__}. Use {type(sae).__name__} instead")
    return sae


# ---- activation mixins (shared by SAEs and transcoders) ------------------------------------------
class _JumpReLU:
    """``relu(pre) * (pre > threshold)`` (SAELens); with ``cfg.apply_relu=False`` (circuit-tracer
    transcoders) ``pre * (pre > threshold)``. Adds ``threshold [d_sae]``."""

    def _param_shapes(self):
        return {**super()._param_shapes(), "threshold": (self.cfg.d_sae,)}

    def _dense_act(self, xc, pre):
        mask = (pre > self.threshold).to(pre.dtype)
        return (pre.relu() if getattr(self.cfg, "apply_relu", True) else pre) * mask

    def _sparse_act(self, sae_in, b_in):
        # relu(pre) * (pre > t) keeps exactly pre > max(t, 0)
        thr = self.threshold.detach()
        thr = thr.clamp_min(0) if getattr(self.cfg, "apply_relu", True) else thr
        return threshold_encode(sae_in, self.W_enc, self.b_enc, thr, b_dec=b_in)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        self.threshold.data = self.threshold.data * self.fold_and_get_W_dec_norm()

    def process_state_dict_for_loading(self, state_dict):
        if "log_threshold" in state_dict:  # older SAELens checkpoints
            state_dict["threshold"] = torch.exp(state_dict.pop("log_threshold")).detach().contiguous()


class _TopK:
    """Top-``k`` of ``pre`` (times ``||W_dec[f]||`` if ``rescale_acts_by_decoder_norm``), then ReLU."""

    def _dense_act(self, xc, pre):
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)
        values = values.relu() if getattr(self.cfg, "apply_relu", True) else values
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _sparse_act(self, sae_in, b_in):
        W, b = self.W_enc, self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            # (x W + b) * n == x (W * n) + b * n: fold the norms into the encoder columns for the op
            n = self.W_dec.norm(dim=-1)
            W, b = W * n, b * n
        return topk_encode(sae_in, W, b, self.cfg.k, b_dec=b_in, relu=getattr(self.cfg, "apply_relu", True))

    def _code_scale(self):
        return 1 / self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def _code_slots(self, code):
        return torch.ones_like(code.values, dtype=torch.bool)  # all k selected, even if ReLU zeroed one

    def _pre_at(self, xc, code):
        return self._gather_pre(xc, code.indices, self.W_enc, self.b_enc)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "Folding W_dec_norm is not safe for TopKSAEs when rescale_acts_by_decoder_norm is False, "
                "as this may change the topk activations"
            )
        super().fold_W_dec_norm()


class StandardSAE(SAE):
    """ReLU SAE: ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec``."""

    cfg: StandardSAEConfig


class JumpReLUSAE(_JumpReLU, SAE):
    """JumpReLU SAE (also BatchTopK / Matryoshka checkpoints, which SAELens saves as JumpReLU)."""

    cfg: JumpReLUSAEConfig


class TopKSAE(_TopK, SAE):
    """TopK SAE (``cfg.k``; ``cfg.rescale_acts_by_decoder_norm`` as SAELens)."""

    cfg: TopKSAEConfig


class GatedSAE(SAE):
    """Gated SAE: gate ``x W_enc + b_gate > 0``, magnitude ``relu(x (W_enc * exp(r_mag)) + b_mag)``, no b_enc.

    Sparse path: ``threshold_encode`` on the gate path gives the active set and ``g = x W_enc + b_gate``
    there; the magnitude of an active feature is ``(g - b_gate) * exp(r_mag) + b_mag`` (same weights),
    so only active features are ever computed. Gradients match SAELens (none through the gate).
    """

    cfg: GatedSAEConfig

    def __init__(self, cfg: GatedSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.b_enc = None  # as SAELens

    def _param_shapes(self):
        shapes = super()._param_shapes()
        del shapes["b_enc"]
        return {**shapes, "b_gate": (self.cfg.d_sae,), "r_mag": (self.cfg.d_sae,), "b_mag": (self.cfg.d_sae,)}

    def _dense_pre(self, xc):
        return xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def _dense_act(self, xc, pre):
        active = (xc @ self.W_enc + self.b_gate > 0).to(self.dtype)
        return active * pre.relu()

    def _sparse_act(self, sae_in, b_in):
        gate = threshold_encode(sae_in, self.W_enc, self.b_gate, 0.0, b_dec=b_in)
        i = gate.indices
        mag = ((gate.values - self.b_gate[i]) * self.r_mag.exp()[i] + self.b_mag[i]).relu()
        live = gate.values > 0  # padding slots hold value 0 (index 0); active gates are > 0
        return SparseActs(torch.where(live, mag, torch.zeros_like(mag)), i)

    def _pre_at(self, xc, code):
        # the magnitude pre-activation (what hook_sae_acts_pre sees); slots with value 0 are dropped
        i = code.indices
        return self._gather_pre(xc, i, self.W_enc, None) * self.r_mag.exp()[i] + self.b_mag[i]

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.fold_and_get_W_dec_norm()
        self.b_gate.data.mul_(norms)
        self.b_mag.data.mul_(norms)


register_sae_class("standard", StandardSAE, StandardSAEConfig)
register_sae_class("gated", GatedSAE, GatedSAEConfig)
register_sae_class("jumprelu", JumpReLUSAE, JumpReLUSAEConfig)
register_sae_class("topk", TopKSAE, TopKSAEConfig)
