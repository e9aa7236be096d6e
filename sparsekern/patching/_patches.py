"""What a patch of a sweep is, which hook points it may touch, and the vectorised hooks that apply many.

A :class:`Patch` writes a slice of a clean activation into the corrupted run at one hook point. The
engine batches patches as slices of one forward (slice ``j`` of the batch is patch ``j``), so the known
setters of ``_setters`` are applied here as one index write per hook point (:func:`vector_hook`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POS_LOCAL_SUFFIXES = (  # hooks whose axis 1 (axis 2 for patterns) is the query position, length T - s
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "attn.hook_z",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_result",
    "attn.hook_rot_q",
    "attn.hook_pattern",
    "attn.hook_attn_scores",
    "mlp.hook_pre",
    "mlp.hook_post",
    "mlp.hook_pre_linear",
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "ln2.hook_normalized",
    "ln2.hook_scale",
)
PATTERN_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")
# computed after the block's keys/values: a single-position patch here changes only that position of its
# block's output (a query or the per-position path after attention). Patterns/scores are left out: their
# patched rows span every source position, which a one-position run does not have.
AFTER_KV_SUFFIXES = (
    "attn.hook_q",
    "attn.hook_rot_q",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "hook_mlp_in",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


@dataclass
class Patch:
    """One patch of a sweep: write ``idx`` of the clean ``hook`` activation into the corrupted run.

    ``kind`` names how: one of the known setters' kinds (``_setters.INDEX_LEN``), applied by
    :meth:`Engine.patch_hooks`; an engine subclass that overrides ``patch_hooks`` may define its own kinds
    (feature ablation uses ``"ablate"``), and ``"pos"`` there still means "only position ``start`` of the
    hooked activation changes" (see :attr:`single_position`).
    """

    sweep: int  # which output tensor
    slot: int  # flat position in that output
    layer: int  # the block of ``hook``
    start: int  # first position whose activations can change (0 = all)
    hook: str
    kind: str
    idx: tuple  # index without the layer, non-negative ints

    @property
    def single_position(self) -> bool:
        """Only position ``start`` of the hooked activation is written (``start`` came from the index)."""
        if is_pattern_hook(self.hook):
            return self.kind in ("pattern_dest", "pattern_dest_src")
        return self.kind in ("pos", "pos_head") and is_position_local_hook(self.hook)


@dataclass
class HookGroup:
    """Patches of one (hook point, kind, layer) inside a chunk: their slice numbers and index tuples."""

    slots: list = field(default_factory=list)  # chunk-local slice numbers
    idx: list = field(default_factory=list)


def is_pattern_hook(name: str) -> bool:
    """An attention pattern or score hook: ``[batch, head, dest, src]``, the position on axis 2."""
    return name.endswith(PATTERN_SUFFIXES)


def is_position_local_hook(name: str) -> bool:
    """A hook whose position axis (axis 1; axis 2 of patterns) is the query position: under causal
    attention a patch there cannot change earlier positions."""
    return name.endswith(POS_LOCAL_SUFFIXES)


def gather_slices(kind: str, src: torch.Tensor, cols) -> torch.Tensor:
    """The slices the known setter ``kind`` copies, for ``n`` index tuples: ``[n, batch, ...]``."""
    if kind in ("pos", "pattern_head"):  # a[:, pos] / a[:, head]
        return src[:, cols[0]].movedim(1, 0)
    if kind in ("pos_head", "pattern_dest"):  # a[:, pos, head] / a[:, head, dest]
        return src[:, cols[0], cols[1]].movedim(1, 0)
    if kind == "head":  # a[:, :, head]
        return src[:, :, cols[0]].movedim(2, 0)
    if kind == "pattern_dest_src":  # a[:, head, dest, src]
        return src[:, cols[0], cols[1], cols[2]].movedim(1, 0)
    raise AssertionError(kind)  # pragma: no cover


def vector_hook(
    kind: str, n_rep: int, B: int, J, cols, clean, s: int, pattern: bool, length: int, check: bool
):
    """Hook applying ``len(J)`` known-setter patches, one per batch slice ``J[i]``, in one index write.

    Equivalent to calling the setter on each ``[B, ...]`` slice. ``s`` is the first computed position:
    the hooked tensor holds positions ``s..s+length-1`` on its position axis (axis 1, or the dest axis 2
    of a pattern), so position indices are shifted by ``s``.
    """
    val = gather_slices(kind, clean, cols)
    full = slice(None)
    if kind == "pos":
        sel = (J, full, cols[0] - (0 if pattern else s))
    elif kind == "pos_head":
        sel = (J, full, cols[0] - (0 if pattern else s), cols[1])
    elif kind == "head":
        sel = (J, full, full, cols[0])
    elif kind == "pattern_head":
        sel = (J, full, cols[0])
    elif kind == "pattern_dest":
        sel = (J, full, cols[0], cols[1] - (s if pattern else 0))
    elif kind == "pattern_dest_src":
        sel = (J, full, cols[0], cols[1] - (s if pattern else 0), cols[2])
    else:  # pragma: no cover
        raise AssertionError(kind)

    def hook(act, hook=None):
        axis = 2 if pattern else 1
        if check and act.shape[axis] != length:  # pragma: no cover - guarded by is_position_local_hook
            raise RuntimeError(
                f"internal: {hook.name if hook else ''} has {act.shape[axis]} positions, expected {length}"
            )
        a = act.view(n_rep, B, *act.shape[1:])
        a[sel] = val.to(dtype=act.dtype)
        return act

    return hook
