"""``sparsekern.HookedSAETransformer``: SAELens's ``HookedSAETransformer`` running sparsekern SAEs.

Same interface as ``sae_lens.HookedSAETransformer`` (``add_sae``, ``reset_saes``, ``saes()``,
``run_with_saes``, ``run_with_cache_with_saes``, ``run_with_hooks_with_saes``, ``acts_to_saes``,
``use_error_term``, ``exclude_special_tokens``) and the same cache keys
(``blocks.L.hook_resid_post.hook_sae_acts_post``, ...). Differences, all on purpose:

* SAELens SAEs given to it are converted to sparsekern SAEs sharing their weights
  (:meth:`sparsekern.SAE.from_sae_lens`), so every SAE runs on the sparse ops;
  ``acts_to_saes`` still returns the objects you passed. So are Dunefsky's ``transcoder_circuits``
  transcoders (:mod:`sparsekern.compat.transcoder_circuits`; the folded ``b_enc`` is a copy, rebuilt
  when the weights it comes from are edited in place before the next ``add_sae``).
* With ``use_error_term`` the SAE runs once, not twice (the clean reconstruction comes from the same
  encode unless a hook edited the code).
* ``run_with_cache_with_saes(..., sparse=True)`` stores ``hook_sae_acts_pre``/``hook_sae_acts_post`` as
  :class:`SparseActs` instead of dense ``[batch, pos, d_sae]`` tensors, and never builds the dense ones.

As in SAELens, a transcoder's output at its output hook is ``decode(encode(input))`` — its skip
connection (``W_skip``) is not added there; with ``use_error_term`` the error term restores the
model's own output exactly either way.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from .saes import SAE
from .sparse_acts import SparseActs

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                       "decoder_start_token_id")
SPARSE_HOOKS = ("hook_sae_acts_pre", "hook_sae_acts_post")
AnySAE = Any  # a sparsekern.SAE or a sae_lens SAE / transcoder

# sae_lens / Dunefsky SAE -> (its sparsekern twin, what it was built from: see _source_key)
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, tuple[SAE, list]]" = weakref.WeakKeyDictionary()


def _is_dunefsky(sae: Any) -> bool:
    from .compat.transcoder_circuits import SparseAutoencoder

    return isinstance(sae, SparseAutoencoder)


def _source_key(sae: nn.Module) -> list:
    """The parameter storages; for a Dunefsky transcoder also the versions of the tensors its folded
    ``b_enc`` is computed from (the twin's copy goes stale when they are edited in place)."""
    key: list = [p.data_ptr() for p in sae.parameters()]
    if _is_dunefsky(sae) and sae.b_dec_out is not None:
        key += [None if p.is_inference() else p._version for p in (sae.W_enc, sae.b_enc, sae.b_dec)]
    return key


def as_sparsekern_sae(sae: AnySAE) -> SAE:
    """``sae`` itself if it is a sparsekern SAE, else its sparsekern twin (shared weights, cached).

    Converts SAELens SAEs / transcoders (:meth:`SAE.from_sae_lens`) and Dunefsky's
    ``transcoder_circuits`` ``SparseAutoencoder`` (:meth:`~sparsekern.compat.transcoder_circuits.
    SparseAutoencoder.to_sparsekern` with ``share_weights=True``); anything else is a ``TypeError``.
    """
    if isinstance(sae, SAE):
        return sae
    dunefsky = _is_dunefsky(sae)
    if not dunefsky and not (
        isinstance(sae, nn.Module)
        and hasattr(sae, "cfg")
        and hasattr(sae, "W_dec")
        and hasattr(sae, "process_state_dict_for_saving")  # what from_sae_lens relies on
    ):
        raise TypeError(
            "expected a sparsekern.SAE or a sae_lens SAE/transcoder (or Dunefsky's "
            f"sparsekern.compat.transcoder_circuits.SparseAutoencoder), got {type(sae).__name__}"
        )
    key = _source_key(sae)
    hit = _CONVERTED.get(sae)
    if hit is None or hit[1] != key:
        twin = sae.to_sparsekern(share_weights=True) if dunefsky else SAE.from_sae_lens(sae)
        hit = (twin, key)
        _CONVERTED[sae] = hit
    hit[0].use_error_term = bool(getattr(sae, "use_error_term", False))
    return hit[0]


def _path_set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(root.get_submodule(parent), last, value)


def _add_mlp_hook_in(mlp: nn.Module) -> None:
    # as SAELens: a HookPoint on the MLP's input, so transcoders can read blocks.L.mlp.hook_in
    if hasattr(mlp, "hook_in"):
        return
    mlp.hook_in = HookPoint()
    forward = mlp.forward
    mlp.forward = lambda x, *a, **kw: forward(mlp.hook_in(x), *a, **kw)  # type: ignore[method-assign]


class SAEWrapper(nn.Module):
    """What sits at an SAE's output hook: runs the SAE (or transcoder) in place of the activation.

    The SAE's own hook points are attributes of the wrapper (so cache keys read
    ``<hook>.hook_sae_acts_post``, not ``<hook>.sae.hook_sae_acts_post``); the SAE itself is kept out of
    the module tree for the same reason. ``hook_sae_error``/``hook_sae_output`` belong to the wrapper.
    """

    def __init__(self, sae: SAE, original: AnySAE, use_error_term: bool,
                 exclude_special_tokens: Union[bool, list[int]] = False):
        super().__init__()
        self.__dict__["sae"] = sae
        self.__dict__["original"] = original
        for name, hp in sae.hook_dict.items():
            if name not in ("hook_sae_error", "hook_sae_output"):
                setattr(self, name, hp)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = use_error_term
        self.exclude_special_tokens = exclude_special_tokens
        self.captured_input: Optional[Tensor] = None  # transcoders: read at the input hook
        self.token_mask: Optional[Tensor] = None  # [batch, pos], True = leave the activation alone

    def capture(self, x: Tensor, hook: Any = None) -> Tensor:
        self.captured_input = x
        return x

    def forward(self, act: Tensor) -> Tensor:
        x = self.captured_input if self.captured_input is not None else act
        self.captured_input = None
        mask = self.token_mask
        if mask is not None:
            mask = mask.reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        out = self.sae.reconstruct(x, act if self.use_error_term else None, self.hook_sae_error, mask)
        if mask is not None:
            out = torch.where(mask, act, out)
        return self.hook_sae_output(out)


class HookedSAETransformer(HookedTransformer):
    """A TransformerLens ``HookedTransformer`` that can splice SAEs / transcoders into its forward pass.

    Build it like a ``HookedTransformer`` (``HookedSAETransformer(cfg)`` or ``.from_pretrained(...)``).
    Every block's MLP gets ``mlp.hook_in`` as in SAELens.
    """

    def __init__(self, *model_args: Any, **model_kwargs: Any):
        super().__init__(*model_args, **model_kwargs)
        for block in self.blocks:
            if hasattr(block, "mlp"):
                _add_mlp_hook_in(block.mlp)
        self.setup()
        self._acts_to_saes: dict[str, SAEWrapper] = {}
        self._output_hooks: dict[str, str] = {}  # transcoders: input hook -> output hook

    # ---- attaching -------------------------------------------------------------------------
    @property
    def acts_to_saes(self) -> dict[str, AnySAE]:
        """Input hook name -> the SAE object attached there (as you passed it)."""
        return {name: w.original for name, w in self._acts_to_saes.items()}

    @property
    def attached_hooks(self) -> dict[str, str]:
        """Every hook point an attached SAE occupies -> the input hook it is attached at (the key to pass to
        :meth:`reset_saes`): the input hook itself and, for a transcoder, its output hook."""
        return {**{h: h for h in self._acts_to_saes}, **{o: i for i, o in self._output_hooks.items()}}

    @property
    def sae_wrappers(self) -> dict[str, SAEWrapper]:
        """Input hook name -> the :class:`SAEWrapper` running the attached SAE there."""
        return dict(self._acts_to_saes)

    def _has_hook(self, name: str) -> bool:
        return (name in self.hook_dict or name in self._acts_to_saes
                or name in self._output_hooks.values())

    def add_sae(self, sae: AnySAE, use_error_term: Optional[bool] = None,
                exclude_special_tokens: Union[bool, list[int]] = False) -> None:
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` (a transcoder writes to ``hook_name_out``).

        Replaces any SAE already there. ``use_error_term=None`` keeps the SAE's own setting;
        ``exclude_special_tokens`` (True: the tokenizer's BOS/EOS/PAD/SEP/decoder-start ids, or a list
        of ids) leaves those positions' activations untouched. Unknown hook names raise ``ValueError``
        (SAELens only logs a warning and skips).
        """
        ours = as_sparsekern_sae(sae)
        meta = ours.cfg.metadata
        hook_in = meta.hook_name
        hook_out = getattr(meta, "hook_name_out", None) or hook_in
        for role, name in (("hook_name", hook_in), ("hook_name_out", hook_out)):
            if not name or not self._has_hook(name):
                raise ValueError(
                    f"cannot attach {type(sae).__name__}: cfg.metadata.{role}={name!r} is not a hook of "
                    f"this model (see model.hook_dict, e.g. 'blocks.0.hook_resid_pre')"
                )
        if hook_in in self._acts_to_saes:
            self._reset_sae(hook_in)
        uet = ours.use_error_term if use_error_term is None else bool(use_error_term)
        wrapper = SAEWrapper(ours, sae, uet, exclude_special_tokens)
        if hook_in != hook_out:
            hp = self.get_submodule(hook_in)
            hp.add_hook(wrapper.capture, dir="fwd", is_permanent=True)
            self._output_hooks[hook_in] = hook_out
        self._acts_to_saes[hook_in] = wrapper
        _path_set(self, hook_out, wrapper)
        self.setup()

    def _reset_sae(self, hook_in: str, previous: Optional[SAEWrapper] = None) -> None:
        if hook_in not in self._acts_to_saes:
            return
        hook_out = self._output_hooks.pop(hook_in, hook_in)
        if hook_out != hook_in:
            hp = self.get_submodule(hook_in)
            if isinstance(hp, HookPoint):
                hp.remove_hooks(dir="fwd", including_permanent=True)
        _path_set(self, hook_out, HookPoint())
        del self._acts_to_saes[hook_in]
        self.setup()
        if previous is not None:
            self.add_sae(previous.original, previous.use_error_term, previous.exclude_special_tokens)

    def reset_saes(self, act_names: Union[str, list[str], None] = None) -> None:
        """Detach the SAEs at ``act_names`` (input hook names; default: all)."""
        names = [act_names] if isinstance(act_names, str) else list(act_names or self._acts_to_saes)
        for name in names:
            self._reset_sae(name)
        self.setup()

    @contextlib.contextmanager
    def saes(self, saes: Union[AnySAE, Sequence[AnySAE]] = (), reset_saes_end: bool = True,
             use_error_term: Optional[bool] = None,
             exclude_special_tokens: Union[bool, list[int]] = False) -> Iterator["HookedSAETransformer"]:
        """Attach ``saes`` for the body of the ``with``; then restore what was attached before."""
        restore: list[tuple[str, Optional[SAEWrapper]]] = []
        try:
            for sae in _as_list(saes):
                name = as_sparsekern_sae(sae).cfg.metadata.hook_name
                restore.append((name, self._acts_to_saes.get(name)))
                self.add_sae(sae, use_error_term, exclude_special_tokens)
            yield self
        finally:
            if reset_saes_end:
                for name, previous in reversed(restore):
                    self._reset_sae(name, previous)
                self.setup()

    # ---- running ---------------------------------------------------------------------------
    def _special_ids(self, spec: Union[bool, list[int]]) -> list[int]:
        if isinstance(spec, (list, tuple)):
            return list(spec)
        if self.tokenizer is None:
            raise ValueError(
                "exclude_special_tokens=True needs a tokenizer on the model to find special tokens; "
                "pass the token ids to exclude as a list instead"
            )
        ids = {getattr(self.tokenizer, a, None) for a in SPECIAL_TOKEN_ATTRS}
        return sorted(i for i in ids if i is not None)

    @contextlib.contextmanager
    def _token_masks(self, input: Any, kwargs: dict[str, Any]) -> Iterator[None]:
        wrappers = [w for w in self._acts_to_saes.values() if w.exclude_special_tokens is not False]
        if wrappers:
            if isinstance(input, Tensor) and input.is_floating_point():  # a residual: start_at_layer
                tokens = kwargs.get("tokens")
                if tokens is None:
                    raise ValueError("exclude_special_tokens needs the tokens: with start_at_layer, pass "
                                     "tokens=[batch, pos] alongside the residual input")
            else:
                tokens = input if isinstance(input, Tensor) else self.to_tokens(
                    input, prepend_bos=kwargs.get("prepend_bos"), padding_side=kwargs.get("padding_side"))
            for w in wrappers:
                ids = torch.tensor(self._special_ids(w.exclude_special_tokens), device=tokens.device)
                w.token_mask = torch.isin(tokens, ids)
        try:
            yield
        finally:
            for w in wrappers:
                w.token_mask = None

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        with self._token_masks(input, kwargs):
            return super().forward(input, *args, **kwargs)

    def run_with_saes(self, *model_args: Any, saes: Union[AnySAE, Sequence[AnySAE]] = (),
                      reset_saes_end: bool = True, use_error_term: Optional[bool] = None,
                      exclude_special_tokens: Union[bool, list[int]] = False, **model_kwargs: Any) -> Any:
        """One forward pass with ``saes`` attached (then detached unless ``reset_saes_end=False``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_hooks_with_saes(
        self, *model_args: Any, saes: Union[AnySAE, Sequence[AnySAE]] = (), reset_saes_end: bool = True,
        exclude_special_tokens: Union[bool, list[int]] = False, fwd_hooks: list = [],  # noqa: B006
        bwd_hooks: list = [], reset_hooks_end: bool = True, clear_contexts: bool = False,  # noqa: B006
        **model_kwargs: Any,
    ) -> Any:
        """``run_with_hooks`` with ``saes`` attached."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts,
                                       **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Union[AnySAE, Sequence[AnySAE]] = (), reset_saes_end: bool = True,
        use_error_term: Optional[bool] = None, exclude_special_tokens: Union[bool, list[int]] = False,
        return_cache_object: bool = True, remove_batch_dim: bool = False, sparse: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Union[ActivationCache, dict[str, Any]]]:
        """``run_with_cache`` with ``saes`` attached: ``(output, cache)``, SAELens's cache keys.

        ``sparse=True``: ``<hook>.hook_sae_acts_pre`` / ``<hook>.hook_sae_acts_post`` are
        :class:`SparseActs` ``[batch, pos, k]`` (values + int64 feature indices;
        ``.to_dense(d_sae)`` gives SAELens's tensor for ``acts_post``) and no ``[batch, pos, d_sae]``
        tensor is built. ``acts_pre`` keeps the pre-activations at the code's features only (for
        ReLU/JumpReLU SAEs these equal the code values). Not with ``incl_bwd=True``.
        """
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            if not sparse:
                return self.run_with_cache(*model_args, return_cache_object=return_cache_object,
                                           remove_batch_dim=remove_batch_dim, **kwargs)
            return self._run_with_sparse_cache(model_args, return_cache_object, remove_batch_dim, kwargs)

    def _run_with_sparse_cache(self, model_args: tuple, return_cache_object: bool, remove_batch_dim: bool,
                               kwargs: dict[str, Any]) -> tuple[Any, Union[ActivationCache, dict[str, Any]]]:
        if kwargs.get("incl_bwd"):
            raise ValueError("run_with_cache_with_saes(sparse=True) does not support incl_bwd=True; "
                             "use sparse=False for backward caches")
        wanted = _names_filter(kwargs.pop("names_filter", None))
        captured: dict[str, SparseActs] = {}
        sinks: list[SAE] = []
        sparse_names: set[str] = set()
        for hook_in, w in self._acts_to_saes.items():
            prefix = self._output_hooks.get(hook_in, hook_in)  # where the wrapper sits
            names = {h: f"{prefix}.{h}" for h in SPARSE_HOOKS}
            sparse_names.update(names.values())
            names = {h: n for h, n in names.items() if wanted(n)}
            if names:
                w.sae.sparse_sink = _sink(captured, names)
                sinks.append(w.sae)
        try:
            out, cache = self.run_with_cache(
                *model_args, return_cache_object=False, remove_batch_dim=remove_batch_dim,
                names_filter=lambda n: wanted(n) and n not in sparse_names, **kwargs)
        finally:
            for sae in sinks:
                sae.sparse_sink = None
        if remove_batch_dim:
            captured = {k: SparseActs(v.values[0], v.indices[0]) for k, v in captured.items()}
        merged = _in_run_order(dict(cache), captured)
        if return_cache_object:
            return out, ActivationCache(merged, self, has_batch_dim=not remove_batch_dim)
        return out, merged


def _in_run_order(cache: dict[str, Any], sparse: dict[str, SparseActs]) -> dict[str, Any]:
    """Insert the sparse entries where TransformerLens would have cached them (after
    ``<prefix>.hook_sae_input``, before ``<prefix>.hook_sae_recons``), keeping the cache in run order."""
    after = ("hook_sae_recons", "hook_sae_error", "hook_sae_output")
    pos = {name: float(i) for i, name in enumerate(cache)}
    for j, name in enumerate(sparse):
        prefix, _, hook = name.rpartition(".")
        nxt = [pos[f"{prefix}.{h}"] for h in after if f"{prefix}.{h}" in pos]
        base = min(nxt) - 0.5 if nxt else pos.get(f"{prefix}.hook_sae_input", float(len(cache))) + 0.5
        pos[name] = base + (0.1 if hook.endswith("post") else 0.0) + 1e-3 * j
    merged = {**cache, **sparse}
    return dict(sorted(merged.items(), key=lambda kv: pos[kv[0]]))


def _as_list(saes: Union[AnySAE, Sequence[AnySAE]]) -> list[AnySAE]:
    return list(saes) if isinstance(saes, (list, tuple)) else [saes]


def _names_filter(f: Union[None, str, Sequence[str], Callable[[str], bool]]) -> Callable[[str], bool]:
    """TransformerLens's ``names_filter`` forms as one predicate."""
    if f is None:
        return lambda name: True
    if isinstance(f, str):
        return lambda name: name == f
    if callable(f):
        return f
    names = set(f)
    return lambda name: name in names


def _sink(store: dict[str, SparseActs], names: dict[str, str]) -> Callable[[str, SparseActs], None]:
    def put(hook: str, acts: SparseActs) -> None:
        if hook in names:
            store[names[hook]] = SparseActs(acts.values.detach(), acts.indices.detach())

    return put


__all__ = ["HookedSAETransformer", "SAEWrapper", "as_sparsekern_sae"]
