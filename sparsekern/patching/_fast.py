"""Fused stand-ins for TransformerLens's elementwise Python modules, used only inside the patching engine.

TransformerLens's ``LayerNorm`` runs ~8 elementwise passes and ``gelu_new`` ~7; at the engine's batch sizes
these memory-bound passes cost as much as the matmuls. ``F.layer_norm`` / ``F.gelu(approximate="tanh")``
compute the same formulas in one pass (results differ by float rounding only, ~1e-6 relative). A module is
swapped only while none of its hook points has a hook (so patching or caching ``ln*.hook_scale`` /
``hook_normalized`` still sees TransformerLens's own computation), and restored afterwards.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F


def _fast_layer_norm(mod, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != mod.w.dtype:
        x = x.to(mod.w.dtype)
    return F.layer_norm(x, (mod.length,), mod.w, mod.b, mod.eps)


@contextlib.contextmanager
def fast_elementwise(model):
    """Swap eligible LayerNorm forwards and gelu_new activations of ``model`` for fused ops (call this
    *after* the patch hooks are registered: modules whose hook points have hooks keep their forward)."""
    try:
        from transformer_lens.components import LayerNorm
        from transformer_lens.utilities.activation_functions import gelu_new
    except Exception:  # pragma: no cover - layout of another transformer_lens version
        yield
        return
    swapped_fwd, swapped_act = [], []
    try:
        for mod in model.modules():
            if (
                type(mod) is LayerNorm
                and mod.cfg.dtype in (torch.float32, torch.float64)
                and not mod.hook_scale._forward_hooks
                and not mod.hook_normalized._forward_hooks
            ):
                mod.forward = partial(_fast_layer_norm, mod)
                swapped_fwd.append(mod)
            elif getattr(mod, "act_fn", None) is gelu_new:
                mod.act_fn = partial(F.gelu, approximate="tanh")
                swapped_act.append(mod)
        yield
    finally:
        for mod in swapped_fwd:
            del mod.forward
        for mod in swapped_act:
            mod.act_fn = gelu_new
