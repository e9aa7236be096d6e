"""``ShardedSAE``: an SAE whose features are split across the ranks of a process group.

Rank ``r`` of ``R`` holds the contiguous, balanced slice ``[feature_offset, feature_offset + d_sae_local)``
of the features (:func:`shard_range`): columns of ``W_enc``, rows of ``W_dec``, entries of ``b_enc`` /
``threshold`` / ``b_gate`` / ``r_mag`` / ``b_mag``. ``b_dec`` (and a transcoder's ``W_skip``) is replicated.

* TopK encode: the local ``topk_encode`` (no ReLU yet) gives ``k`` candidates per row; every rank's
  candidates (values + GLOBAL indices) are all-gathered and merged by a stable descending sort, in
  rank order. Equal values therefore keep the lower global index, the tie rule of ``topk_encode``, so
  the merged code equals the single-process one (indices bitwise). ReLU comes after the merge, as in
  the op: it must not turn the choice among negative candidates into ties.
* Threshold codes (JumpReLU, standard, gated): no merge. ``forward`` (nothing observing the code)
  decodes each rank's local code directly: no communication in the encode. ``encode_sparse`` / hooks
  gather each rank's code and compact it to the single-process layout (ascending features, 0/0
  padding, K = max row L0).
* Decode: the slots a rank owns go through the local ``sparse_decode``; the partial outputs are summed
  with an all-reduce; ``b_dec`` is added once.

Every rank gets the full (global) code and the full output. Gradients: see :mod:`._autograd`; every
rank must run the same forward and ``backward`` on the same loss. Parameter gradients are then those
of the single-process SAE restricted to the rank's slice (replicated ones identical on every rank).
Hooks on ``hook_sae_acts_pre`` (e.g. ``run_with_cache``) get the dense ``[..., d_sae]`` pre-activations,
gathered from every rank (that path builds them, as the unsharded SAE does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..ops import topk_encode
from ..saes import SAE, SAEConfig, TopKMixin, build_sae, handle_config_defaulting, has_hooks
from ..saes.io import class_label
from ..sparse_acts import SparseActs
from . import _comm
from ._autograd import copy_to_group, gather_last, pick, reduce_from_group

# which dim of a parameter runs over the features (absent: replicated)
FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0, "log_threshold": 0,
               "b_gate": 0, "r_mag": 0, "b_mag": 0}
_CLASSES: dict[type, type] = {}


def shard_range(d_sae: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s features: contiguous, sizes differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if d_sae < world:
        raise ValueError(f"cannot shard d_sae={d_sae} features over {world} ranks (need d_sae >= ranks)")
    return _comm.split_range(d_sae, rank, world)


def merge_topk(
    v_loc: Tensor, i_glob: Tensor, k: int, group: _comm.Group = None
) -> tuple[Tensor, Tensor]:
    """Exact global top-``k`` from each rank's ``[N, k_loc]`` candidates (sorted by value desc, ties by
    index asc; ``i_glob`` global indices). Returns ``[N, k]`` values (differentiable in ``v_loc``) and
    indices, ordered by (value desc, global index asc)."""
    _check_code("merge_topk", v_loc, i_glob)
    if isinstance(k, bool) or not isinstance(k, int) or not k >= max(1, v_loc.shape[1]):
        raise ValueError(f"merge_topk: k must be an int >= 1 and >= the candidates per row "
                         f"({v_loc.shape[1]}), got {k!r}")
    rank, _ = _comm.rank_world(group)
    n, kl = v_loc.shape
    if kl < k:  # a rank with fewer than k features: pads are never chosen (the ranks hold >= k in all)
        v_pad = torch.cat([v_loc.detach(), v_loc.new_full((n, k - kl), float("-inf"))], 1)
        i_pad = torch.cat([i_glob, i_glob.new_full((n, k - kl), torch.iinfo(torch.int64).max)], 1)
    else:
        v_pad, i_pad = v_loc.detach(), i_glob
    V = torch.cat(_comm.all_gather(v_pad, group, "all_gather (top-k merge values)"), 1)
    Idx = torch.cat(_comm.all_gather(i_pad, group, "all_gather (top-k merge indices)"), 1)
    # rank blocks are in global-index order and each block is (value desc, index asc): a stable sort
    # keeps the lower global index first among equal values
    order = torch.sort(V, dim=1, descending=True, stable=True).indices[:, :k]
    return pick(v_loc, V, order, rank, k), Idx.gather(1, order)


def _check_code(fn: str, values: Tensor, indices: Tensor) -> None:
    if not isinstance(values, Tensor) or values.dim() != 2 or not values.is_floating_point():
        got = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{fn}: values must be a float tensor [N, k], got {got}")
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64 or indices.shape != values.shape:
        got = (f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, Tensor)
               else type(indices).__name__)
        raise ValueError(f"{fn}: indices must be int64 [N, k] = {tuple(values.shape)}, got {got}")
    if indices.device != values.device:
        raise ValueError(f"{fn}: indices are on {indices.device}, values on {values.device}")


def _live_slots(idx: Tensor, val: Tensor) -> Tensor:
    """Which slots of a threshold code ``[N, K]`` (ascending features, 0/0 padding at the end) are live.

    A live slot's feature is above the previous slot's; slot 0 is live if it is not 0/0 or slot 1 is
    live. (Feature 0 alive with value exactly 0 and nothing after reads as padding: the decode is the
    same either way.)"""
    live = torch.ones_like(idx, dtype=torch.bool)
    if idx.shape[1] > 1:
        live[:, 1:] = idx[:, 1:] > idx[:, :-1]
    if idx.shape[1]:
        after = live[:, 1] if idx.shape[1] > 1 else torch.zeros_like(live[:, 0])
        live[:, 0] = (idx[:, 0] != 0) | (val[:, 0] != 0) | after
    return live


def gather_threshold_code(v: Tensor, idx_loc: Tensor, offset: int, group: _comm.Group = None):
    """Concatenate every rank's threshold code ``[N, K_r]`` (local indices) into the single-process
    layout ``[N, K]``. Returns (values differentiable in ``v``, global indices)."""
    _check_code("gather_threshold_code", v, idx_loc)
    rank, _ = _comm.rank_world(group)
    n, kl = v.shape
    width = int(max(t.item() for t in _comm.all_gather(
        torch.tensor([kl], device=v.device), group, "all_gather (code widths)")))
    live = _live_slots(idx_loc, v.detach())
    i_glob = torch.where(live, idx_loc + offset, torch.full_like(idx_loc, -1))  # -1 marks padding
    v_pad = torch.cat([v.detach(), v.new_zeros(n, width - kl)], 1)
    i_pad = torch.cat([i_glob, i_glob.new_full((n, width - kl), -1)], 1)
    V = torch.cat(_comm.all_gather(v_pad, group, "all_gather (code values)"), 1)
    Idx = torch.cat(_comm.all_gather(i_pad, group, "all_gather (code indices)"), 1)
    L = Idx >= 0
    k = int(L.sum(1).max()) if n else 0
    order = torch.sort((~L).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # live first, in order
    keep = L.gather(1, order)
    values = pick(v, V, order, rank, width)
    values = torch.where(keep, values, torch.zeros_like(values))
    return values, torch.where(keep, Idx.gather(1, order), torch.zeros_like(order))


def _sharded_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Sharded{base.__name__}", (ShardedSAE, base), {"__module__": __name__})
    return _CLASSES[base]


class ShardedSAE(SAE):
    """Feature-sharded twin of a sparsekern SAE / transcoder (see the module docstring).

    Build with :meth:`from_sae` (every rank holds the full SAE first) or :meth:`load_from_disk` (each
    rank reads only its slice). The object is also an instance of the original architecture's class
    (``ShardedTopKSAE`` subclasses ``TopKSAE``) and plugs into ``HookedSAETransformer``.
    Attributes: ``group``, ``feature_offset``, ``d_sae_local``, ``rank``, ``world_size``.
    """

    def __init__(self, cfg: Any, *, group: _comm.Group, start: int, stop: int, use_error_term: bool = False):
        if type(self) is ShardedSAE:
            raise TypeError("use ShardedSAE.from_sae(sae, group) or ShardedSAE.load_from_disk(path, ...)")
        rank, world = _comm.rank_world(group)
        for name, v in (("group", group), ("feature_offset", start), ("d_sae_local", stop - start),
                        ("rank", rank), ("world_size", world)):
            object.__setattr__(self, name, v)  # needed by _param_shapes during SAE.__init__
        super().__init__(cfg, use_error_term)

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, shape in super()._param_shapes().items():
            dim = FEATURE_DIM.get(name)
            out[name] = shape if dim is None else (*shape[:dim], self.d_sae_local, *shape[dim + 1:])
        return out

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_sae(cls, sae: SAE, group: _comm.Group = None, *, check_weights: bool = True) -> "ShardedSAE":
        """This rank's shard of ``sae`` (every rank passes the same SAE; the shards are copies).

        ``check_weights``: all ranks also compare a checksum of every parameter, so ranks holding
        different SAEs (say, each initialised with its own seed) raise instead of silently mixing.
        """
        if not isinstance(sae, SAE):
            raise TypeError(f"ShardedSAE.from_sae expects a sparsekern SAE, got {type(sae).__name__}")
        if isinstance(sae, ShardedSAE):
            raise TypeError("ShardedSAE.from_sae: the SAE is already sharded")
        rank, world = _comm.rank_world(group)
        start, stop = shard_range(sae.cfg.d_sae, rank, world)
        sd = {k: v.detach() for k, v in sae.state_dict().items()}
        agree: dict[str, Any] = {"cfg": _cfg_key(sae.cfg.to_dict()), "class": type(sae).__name__,
                                 "params": {k: list(v.shape) for k, v in sd.items()}}
        if check_weights:
            # float64 accumulation without a float64 copy of the weights
            agree["checksums"] = {k: float(v.sum(dtype=torch.float64)).hex() for k, v in sd.items()}
        _comm.check_agree("the SAE to shard (config, parameter shapes, weights)", agree, group)
        local = {k: _slice(k, v, start, stop).clone() for k, v in sd.items()}
        out = cls._build(type(sae), sae.cfg.to_dict(), local, group, str(sae.W_dec.device))
        out.use_error_term = sae.use_error_term
        if sae.hook_z_reshaping_mode and not out.hook_z_reshaping_mode:
            out.turn_on_forward_pass_hook_z_reshaping()
        return out

    @classmethod
    def from_local_state_dict(
        cls, cfg_dict: dict[str, Any], local: dict[str, Tensor], group: _comm.Group = None
    ) -> "ShardedSAE":
        """A shard from this rank's slice of every parameter (see :func:`shard_range`)."""
        base = type(SAE.from_dict({**cfg_dict, "device": "meta"}))
        _comm.check_agree("the SAE config", {"cfg": _cfg_key(cfg_dict)}, group)
        return cls._build(base, cfg_dict, local, group, str(cfg_dict.get("device", "cpu")))

    @classmethod
    def _build(cls, base: type, cfg_dict: dict[str, Any], local: dict[str, Tensor], group: _comm.Group,
               device: str) -> "ShardedSAE":
        # the SAE family's one build (saes.io.build_sae), with a factory making the sharded twin of `base`;
        # the config is taken as given (no pre-6.0 upgrade: these dicts come from configs, not files)
        rank, world = _comm.rank_world(group)
        cfg = SAEConfig.from_dict({**cfg_dict, "device": device})
        start, stop = shard_range(cfg.d_sae, rank, world)

        def make(sae_cls: type, meta_cfg: SAEConfig) -> "ShardedSAE":
            return _sharded_class(base)(meta_cfg, group=group, start=start, stop=stop)

        return build_sae(SAE, cfg, local, factory=make)

    @classmethod
    def load_from_disk(  # type: ignore[override]
        cls, path: Union[str, Path], device: str = "cpu", dtype: Optional[str] = None, *,
        group: _comm.Group = None, fold_W_dec_norm: bool = False,
    ) -> "ShardedSAE":
        """This rank's shard of a SAELens-format folder; only the slice is read from the file."""
        from safetensors import safe_open

        from ..constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
        from ..loading.sae_lens_format import (
            check_cfg, check_dtype, check_shapes, read_json, safetensors_shapes)

        path = Path(path)
        cfg_dict = read_json(path / SAE_CFG_FILENAME)
        cfg_dict["device"] = device
        if dtype is not None:
            cfg_dict["dtype"] = dtype
        check_cfg(cfg_dict, path / SAE_CFG_FILENAME)
        wpath = path / SAE_WEIGHTS_FILENAME
        check_shapes(cfg_dict, safetensors_shapes(wpath), wpath, class_label)
        cfg_dict = handle_config_defaulting(cfg_dict)
        dt = check_dtype(cfg_dict.get("dtype", "float32"), wpath)
        rank, world = _comm.rank_world(group)
        start, stop = shard_range(int(cfg_dict["d_sae"]), rank, world)
        local = {}
        with safe_open(str(wpath), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118
                sl, dim = f.get_slice(name), FEATURE_DIM.get(name)
                t = sl[:] if dim is None else (sl[start:stop] if dim == 0 else sl[:, start:stop])
                local[name] = t.to(dt).contiguous()
        sf = local.pop("scaling_factor", None)
        if sf is not None and not torch.allclose(sf, torch.ones_like(sf)):
            raise ValueError(f"{wpath} has a non-trivial finetuning 'scaling_factor' (not supported)")
        out = cls.from_local_state_dict(cfg_dict, local, group)
        if fold_W_dec_norm:
            out.fold_W_dec_norm()
        return out

    # ---- gathering back --------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded state dict, on every rank (all-gathers the sharded parameters)."""
        out = {}
        for name, t in self.state_dict().items():
            dim = FEATURE_DIM.get(name)
            if dim is None:
                out[name] = t.detach().clone()
                continue
            pad = shard_range(self.cfg.d_sae, 0, self.world_size)[1] - self.d_sae_local  # rank 0 is largest
            t = t.detach()
            if pad:
                t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim)
            parts = _comm.all_gather(t, self.group, f"all_gather ({name})")
            sizes = [b - a for a, b in (shard_range(self.cfg.d_sae, r, self.world_size)
                                        for r in range(self.world_size))]
            out[name] = torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)
        return out

    def to_sae(self) -> SAE:
        """The unsharded SAE (same class as the one sharded), built on every rank."""
        base = next(c for c in type(self).__mro__[1:] if c is not ShardedSAE and issubclass(c, SAE))
        cfg = self.cfg.to_dict()
        out = base.from_cfg_and_state_dict(cfg, self.full_state_dict())
        out.use_error_term = self.use_error_term
        return out

    def save_model(self, path: Union[str, Path], sparsity: Optional[Tensor] = None) -> tuple[Path, Path]:
        """Gather the weights and write the usual SAELens folder from rank 0 (collective: all ranks call)."""
        full = self.to_sae()
        if self.rank == 0:
            full.save_model(path, sparsity)
        _comm.collective("barrier (save_model)", lambda: torch.distributed.barrier(self.group))
        from ..constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

        return Path(path) / SAE_WEIGHTS_FILENAME, Path(path) / SAE_CFG_FILENAME

    # ---- the sharded pipeline: overrides of the pipeline's subclass API (saes.pipeline.SUBCLASS_API) ------
    def _sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in (shard_range(self.cfg.d_sae, r, self.world_size)
                                        for r in range(self.world_size)))

    # dense path (only when hook_sae_acts_pre is hooked, e.g. run_with_cache): gathered [..., d_sae]
    def _dense_pre(self, xc: Tensor) -> Tensor:
        return gather_last(super()._dense_pre(copy_to_group(xc, self.group)), self.group, self._sizes(),
                           self.rank)

    def _dense_act(self, xc: Tensor, pre: Tensor) -> Tensor:
        if isinstance(self, TopKMixin):  # the top-k runs over every feature: on the gathered pre
            if self.cfg.rescale_acts_by_decoder_norm:
                n = gather_last(self.W_dec.norm(dim=-1), self.group, self._sizes(), self.rank)
                pre = pre * n
            values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)
            values = values.relu() if getattr(self.cfg, "apply_relu", True) else values
            return torch.zeros_like(pre).scatter_(-1, indices, values)
        # the other activations are per feature: this rank's slice, then gathered
        a = self.feature_offset
        local = super()._dense_act(copy_to_group(xc, self.group), pre[..., a: a + self.d_sae_local])
        return gather_last(local, self.group, self._sizes(), self.rank)

    def _sparse_act(self, sae_in: Tensor, b_in: Optional[Tensor]) -> SparseActs:
        x = copy_to_group(sae_in, self.group)
        b = copy_to_group(b_in, self.group) if b_in is not None else None
        lead = x.shape[:-1]
        if isinstance(self, TopKMixin):
            W, bias = self.W_enc, self.b_enc
            if self.cfg.rescale_acts_by_decoder_norm:
                n = self.W_dec.norm(dim=-1)
                W, bias = W * n, bias * n
            k = self.cfg.k
            loc = topk_encode(x, W, bias, min(k, self.d_sae_local), b_dec=b, relu=False)
            kl = loc.values.shape[-1]
            v, i = merge_topk(loc.values.reshape(-1, kl), loc.indices.reshape(-1, kl) + self.feature_offset,
                              k, self.group)
            if getattr(self.cfg, "apply_relu", True):
                v = v.relu()  # after the merge, as topk_encode(relu=True) does after selection
        elif self._decode_only:  # threshold codes need no merge: decode the local code as it is
            loc = super()._sparse_act(x, b)
            return SparseActs(loc.values, loc.indices + self.feature_offset)
        else:
            loc = super()._sparse_act(x, b)
            kl = loc.values.shape[-1]
            v, i = gather_threshold_code(loc.values.reshape(-1, kl), loc.indices.reshape(-1, kl),
                                         self.feature_offset, self.group)
        return SparseActs(v.reshape(*lead, v.shape[-1]), i.reshape(*lead, i.shape[-1]))

    _decode_only = False

    def reconstruct(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """As :meth:`SAE.reconstruct` (what ``forward`` and ``HookedSAETransformer`` run). If nothing looks
        at the code (no hook on ``hook_sae_acts_post``, no ``sparse_sink``), a threshold code stays local
        (global indices, this rank's features only): the encode then needs no communication at all, and
        the decode's all-reduce sums the ranks' parts."""
        self._decode_only = not has_hooks(self.hook_sae_acts_post) and self.sparse_sink is None
        try:
            return super().reconstruct(x, *args, **kwargs)
        finally:
            self._decode_only = False

    def _owned(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(mask of the slots this rank owns, their local indices; 0 elsewhere)."""
        a = self.feature_offset
        own = (indices >= a) & (indices < a + self.d_sae_local)
        return own, torch.where(own, indices - a, torch.zeros_like(indices))

    def _pre_at(self, xc: Tensor, code: SparseActs) -> Tensor:
        own, loc = self._owned(code.indices)
        vals = torch.where(own, code.values, torch.zeros_like(code.values))
        loc_code = SparseActs(vals, loc)
        pre = super()._pre_at(xc, loc_code)
        if pre is loc_code.values:  # the architecture's code values are its pre-activations
            return code.values
        with torch.no_grad():
            return _comm.all_reduce_(torch.where(own, pre, torch.zeros_like(pre)), self.group)

    def _decode_raw(self, f: Union[Tensor, SparseActs]) -> Tensor:
        scale = self._code_scale()  # local [d_sae_local] (TopK decoder-norm rescaling) or None
        if isinstance(f, SparseActs):
            from ..ops import sparse_decode

            own, loc = self._owned(f.indices)
            values = f.values.to(self.dtype)
            values = torch.where(own, values, torch.zeros_like(values))
            if scale is not None:
                values = values * scale[loc]
            part = sparse_decode(values, loc, self.W_dec)
        else:
            f = self._dense_code(f)[..., self.feature_offset: self.feature_offset + self.d_sae_local]
            part = (f * scale if scale is not None else f) @ self.W_dec
        return reduce_from_group(part, self.group) + self.b_dec

    def extra_repr(self) -> str:
        return (f"features [{self.feature_offset}, {self.feature_offset + self.d_sae_local}) of "
                f"{self.cfg.d_sae}, rank {self.rank}/{self.world_size}")


def _slice(name: str, t: Tensor, start: int, stop: int) -> Tensor:
    dim = FEATURE_DIM.get(name)
    return t if dim is None else t.narrow(dim, start, stop - start)


def _cfg_key(cfg: dict[str, Any]) -> str:
    # the device may differ per rank (cuda:0, cuda:1); everything else must match
    return json.dumps({k: v for k, v in cfg.items() if k != "device"}, sort_keys=True, default=str)
