"""The SAE pipeline: parameters, hook points and encode / decode on the sparse ops (:class:`SAEPipeline`).

With no hook on ``hook_sae_acts_pre`` / ``hook_sae_acts_post`` the encoder goes straight to a
:class:`SparseActs` (``threshold_encode`` / ``topk_encode``) and the decoder is ``sparse_decode``; nothing of
shape ``[..., d_sae]`` is built except the dense code that ``encode()`` returns. Hooks on those two points get
the dense tensors SAELens gives them.

Architectures (and ``sparsekern.distributed.ShardedSAE``) differ only in the methods of
:data:`SUBCLASS_API`, the pipeline's subclass API: see :class:`SAEPipeline`. Run-time normalisation is
:mod:`.normalize`'s.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Optional, TypeVar, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookedRootModule, HookPoint

from ..constants import dtype_to_str, str_to_dtype
from ..ops import sparse_decode, threshold_encode
from ..sparse_acts import SparseActs, dense_to_sparse
from .config import SAEConfig
from .normalize import NormState, RunTimeNormalization

T = TypeVar("T", bound="SAEPipeline")

# The methods a subclass overrides to change how the code is computed (documented on SAEPipeline). They
# keep their underscore because they are not for callers; a subclass in another package (ShardedSAE)
# overrides these and no other private method of the pipeline (tests/test_sae_seams.py checks).
SUBCLASS_API = (
    "_param_shapes", "_dense_pre", "_dense_act", "_sparse_act", "_code_scale", "_code_slots", "_pre_at",
    "_decode_raw", "_finish_decode",
)


# ---- helpers -------------------------------------------------------------------------------------
def has_hooks(hp: nn.Module) -> bool:
    """True if anything would observe or edit this HookPoint's value: a forward / backward (pre-)hook on
    ``hp`` or a global module hook. The pipeline then builds the dense tensor SAELens would give it."""
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
    norm: NormState  # statistics of the run-time input normalisation (None if none)


# ---- the pipeline --------------------------------------------------------------------------------
class SAEPipeline(RunTimeNormalization, HookedRootModule):
    """The module part of :class:`~sparsekern.saes.sae.SAE`: parameters, hook points, encode / decode.

    Parameters (as SAELens): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` plus the architecture's own. Hook points: ``hook_sae_input``,
    ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_output``, ``hook_sae_recons``,
    ``hook_sae_error``. Subclass :class:`~sparsekern.saes.sae.SAE` (which adds weight surgery and the
    build / load / save classmethods), not this class.

    Subclass API (:data:`SUBCLASS_API`): the methods an architecture overrides, calling ``super()`` for
    the base's behaviour (this base is the ReLU / "standard" SAE). ``xc`` is the input less ``b_dec`` when
    ``cfg.apply_b_dec_to_input``.

    - ``_param_shapes() -> {name: shape}``: every parameter, made by ``initialize_weights`` and checked
      when a state dict is loaded.
    - ``_sparse_act(sae_in [..., d_in], b_in [d_in] | None) -> SparseActs [..., k]``: the code via the
      sparse ops (no hook on ``hook_sae_acts_pre``); ``b_in`` is the bias to subtract from the input.
    - ``_dense_pre(xc [..., d_in]) -> [..., d_sae]`` and ``_dense_act(xc, pre [..., d_sae]) -> [..., d_sae]``:
      SAELens's dense expressions, used only when ``hook_sae_acts_pre`` is hooked (``pre`` may be edited).
    - ``_code_scale() -> [d_sae] | None``: the factor ``decode`` multiplies the code by.
    - ``_code_slots(code) -> bool [..., k]`` (which slots hold a selected feature) and
      ``_pre_at(xc, code) -> [..., k]`` (pre-activations at the code's features): for ``sparse_sink``.
    - ``_decode_raw(f: [..., d_sae] | SparseActs) -> [..., d_out]``: ``f @ W_dec + b_dec``, no hooks.
    - ``_finish_decode(recon, norm, hooks) -> (out, edited)``: ``hook_sae_recons``, de-normalisation,
      hook_z reshape.

    ``_dense_code(f)`` checks a dense code for a ``_decode_raw`` override. A subclass that must know
    whether the code leaves the SAE (``encode`` returns it) or is only decoded (``forward``,
    ``HookedSAETransformer``) overrides the public :meth:`reconstruct`, which both of the latter run.
    """

    cfg: SAEConfig
    _is_transcoder: ClassVar[bool] = False
    # SAELens: an SAE's decode undoes the run-time normalisation and drops its statistics; a transcoder's
    # decode (d_out != d_in) does neither, so they stay readable after its forward
    _decode_undoes_norm: ClassVar[bool] = True
    HOOK_NAMES: ClassVar[tuple[str, ...]] = (
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_output",
        "hook_sae_recons",
        "hook_sae_error",
    )

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False):
        if type(self) is SAEPipeline:
            raise TypeError("SAEPipeline is abstract: use an architecture class or SAE.from_dict(cfg_dict)")
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
        self._norm_state: NormState = None  # set by encode(), consumed by decode() (as SAELens)
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

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "SAEPipeline":
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

    # ---- the subclass API's encode pieces (SUBCLASS_API; this base is the ReLU / "standard" SAE) --
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

    # ---- public seams for code that splices an SAE's code into a model (patching, ablation) ----------
    @property
    def is_transcoder(self) -> bool:
        """Whether the SAE reads ``hook_name`` and writes ``hook_name_out`` (a transcoder)."""
        return self._is_transcoder

    def code_scale(self) -> Optional[Float[Tensor, "d_sae"]]:
        """The per-feature factor ``decode`` multiplies the code by (TopK ``rescale_acts_by_decoder_norm``:
        ``1 / ||W_dec[f]||``); None when the code is decoded as it is."""
        return self._code_scale()

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

    def _process_in(self, x: Tensor, hooks: bool) -> tuple[Tensor, NormState, bool]:
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

    def _encode(self, x: Tensor, hooks: bool = True) -> _Code:
        sae_in, norm, edited = self._process_in(x, hooks)
        b_in = self._input_bias()
        if hooks and has_hooks(self.hook_sae_acts_pre):
            xc = sae_in - b_in if b_in is not None else sae_in
            pre, pre_edited = self._hook("hook_sae_acts_pre", self._dense_pre(xc), True)
            edited = edited or pre_edited
            code: Union[Tensor, SparseActs] = self._dense_act(xc, pre)
        else:  # the point of sparsekern: no [.., d_sae] pre-activations at all
            pre = None
            code = self._sparse_act(sae_in, b_in)
        acts, dense, post_edited = code, None, False
        if hooks and has_hooks(self.hook_sae_acts_post):
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
    @property
    def sparse_sink(self) -> Optional[Callable[[str, SparseActs], None]]:
        """Receiver of the code as :class:`SparseActs` on each hooked encode, or None (the default).

        When set, every encode with hooks calls ``sink("hook_sae_acts_post", code)`` and
        ``sink("hook_sae_acts_pre", pre)`` (``[..., k]``; pre-activations at the code's features only),
        without building any ``[..., d_sae]`` tensor. ``HookedSAETransformer`` sets it for
        ``run_with_cache_with_saes(sparse=True)`` and resets it to None afterwards.
        """
        return self.__dict__.get("_sparse_sink")

    @sparse_sink.setter
    def sparse_sink(self, sink: Optional[Callable[[str, SparseActs], None]]) -> None:
        if sink is not None and not callable(sink):
            raise TypeError(f"sparse_sink must be callable (name, SparseActs) -> None or None, got {sink!r}")
        self._sparse_sink = sink

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
        f = self._dense_code(f)
        if scale is not None:
            f = f * scale
        return f @ self.W_dec + self.b_dec

    def _dense_code(self, f: Any) -> Tensor:
        """``f`` checked to be a dense code ``[..., d_sae]`` (ValueError otherwise), in the SAE's dtype."""
        if not isinstance(f, Tensor) or f.dim() == 0 or f.shape[-1] != self.cfg.d_sae:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"decode expects a dense code [..., d_sae={self.cfg.d_sae}] or SparseActs, got {shape}"
            )
        return f.to(self.dtype)

    def _finish_decode(self, recon: Tensor, norm: NormState, hooks: bool) -> tuple[Tensor, bool]:
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
        norm = self._norm_state
        if self._decode_undoes_norm:
            self._norm_state = None
        return self._finish_decode(self._decode_raw(feature_acts), norm, True)[0]

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """``decode(encode(x))`` (+ the error term if ``use_error_term``), then ``hook_sae_output``.

        With ``use_error_term`` SAELens re-runs the SAE without hooks to get the clean reconstruction;
        here it comes from the same encode, taken before any hook edit (a second hook-free pass happens
        only if a hook edited ``hook_sae_input``/``hook_sae_acts_pre`` or a dense code in place).
        """
        out = self.reconstruct(x, x if self.use_error_term else None, self.hook_sae_error)
        return self._hook("hook_sae_output", out, True)[0]

    def reconstruct(
        self,
        x: Float[Tensor, "*batch d_in"],
        error_target: Optional[Float[Tensor, "*batch d_out"]] = None,
        error_hook: Optional[Callable[[Tensor], Tensor]] = None,
        error_mask: Optional[Tensor] = None,
    ) -> Float[Tensor, "*batch d_out"]:
        """``decode(encode(x))`` with every hook, plus ``error_hook(error_target - clean reconstruction)``
        when ``error_target`` is given (``error_mask``, broadcast over the last dim: no error where true).

        What ``forward`` (``error_target=x``) and ``HookedSAETransformer`` (the activation at the output
        hook) run. No ``hook_sae_output`` and no transcoder skip connection.

        The clean (hook-free) reconstruction is taken from the same encode when no hook edited the code on
        its way (SAELens always runs a second, hook-free pass). When no hook edited anything it *is* the
        returned tensor, so the result is ``out + (error_target - out)``: ``error_target`` up to the
        rounding of that one sum, on any machine (a second decode, even of the same code, may take another
        kernel and round differently).
        """
        c = self._encode(x)
        self._norm_state = None if self._decode_undoes_norm else c.norm  # where SAELens's forward leaves it
        recon = self._decode_raw(c.acts)
        v = _version(recon)
        out, recons_edited = self._finish_decode(recon, c.norm, True)
        if error_target is None:
            return out
        with torch.no_grad():
            if c.clean is None:
                c = self._encode(x, hooks=False)
                clean = self._finish_decode(self._decode_raw(c.acts), c.norm, False)[0]
            elif c.post_edited or (recons_edited and v is not None and _version(recon) != v):
                clean = self._finish_decode(self._decode_raw(c.clean), c.norm, False)[0]
            elif recons_edited:  # hook_sae_recons returned another tensor; recon itself is untouched
                clean = self._finish_decode(recon, c.norm, False)[0]
            else:
                clean = out.detach()  # the very tensor returned: no second computation to round apart
            sae_error = error_target - clean
            if error_mask is not None:
                sae_error = torch.where(error_mask, torch.zeros_like(sae_error), sae_error)
            if error_hook is not None:
                sae_error = error_hook(sae_error)
        return out + sae_error
