"""TransformerLens hook names -> the block that computes them (one helper for every package).

A leaf: plain string parsing, no imports from the rest of sparsekern. ``blocks.L.<anything>`` is computed
by block ``L``; ``ln_final.*`` after the last block; every other hook (``hook_embed``, ``hook_pos_embed``,
``unembed...``) by no block.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def block_index(hook_name: str, n_layers: Optional[int] = None) -> Optional[int]:
    """The block ``L`` of a ``blocks.L.*`` hook; None for any other hook (or ``L >= n_layers`` when given)."""
    m = _BLOCK.match(hook_name)
    if m is None:
        return None
    layer = int(m.group(1))
    return None if n_layers is not None and layer >= n_layers else layer


def layer_of(hook_name: str, n_layers: int) -> Optional[int]:
    """Like :func:`block_index`, with ``ln_final.*`` mapped to ``n_layers`` (it runs after every block)."""
    layer = block_index(hook_name)
    if layer is not None:
        return layer
    return n_layers if hook_name.startswith("ln_final.") else None


def stop_layer(hook_names: str | Iterable[str]) -> Optional[int]:
    """The ``stop_at_layer`` after which every hook has run: ``max(L) + 1``.

    None (run the whole model) when any hook is not a ``blocks.L.*`` hook, or when there is no hook.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    layers = [block_index(h) for h in names]
    if not layers or any(x is None for x in layers):
        return None
    return max(layers) + 1
