"""Logits handed to a patching metric whose positions are unembedded only when the metric reads them.

The unembedding (``d_model x d_vocab`` per token, 39 M multiply-adds for GPT-2) is about half of the
engine's work, yet most metrics read one position (``logits[:, -1, answer]``). :class:`LazyLogits` is a
``[batch, pos, d_vocab]`` tensor for every purpose -- any operation gets the full logits -- but
indexing with an integer or a slice on the position axis (``x[b, p, ...]``) only unembeds the positions
it names. The engine learns which positions the metric reads on the corrupted run and computes those for
a whole chunk of patches in one GEMM; anything else is computed on demand, so the metric's value never
depends on the guess, only the speed does.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

_T = torch.Tensor
# attribute reads and queries answered from the wrapper's metadata (no data needed)
_METADATA = {
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__, _T.layout.__get__,
    _T.requires_grad.__get__, _T.is_cuda.__get__, _T.size, _T.dim, _T.numel, _T.nelement, _T.__len__,
    _T.is_floating_point, _T.is_complex, _T.element_size, _T.ndimension, _T.get_device,
}


class LazyLogits(torch.Tensor):
    """``[B, T, V]`` logits: positions ``< start`` are ``corrupted``'s, position ``p >= start`` is
    ``known[p]`` if given, else ``unembed(resid[:, [p - start]])`` when first read.

    Args:
        corrupted: ``[B, T, V]`` logits of the corrupted run.
        start: first position whose logits differ from ``corrupted``'s.
        resid: ``[B, T - start, d_model]`` final (normalised) residual of this patch's run.
        known: position -> ``[B, V]`` logits already computed.
        unembed: ``[B, n, d_model] -> [B, n, V]`` (the model's unembedding and soft cap).
        log: records positions read (``log.read``), misses (``log.missed``) and full materialisations.
    """

    @staticmethod
    def __new__(cls, corrupted, start, resid, known, unembed, log):
        return torch.Tensor._make_wrapper_subclass(
            cls, corrupted.shape, dtype=corrupted.dtype, device=corrupted.device, requires_grad=False
        )

    def __init__(self, corrupted, start, resid, known, unembed, log):
        self._corrupted = corrupted
        self._start = start
        self._resid = resid
        self._known: dict[int, torch.Tensor] = dict(known)
        self._unembed_fn: Callable[[torch.Tensor], torch.Tensor] = unembed
        self._log = log
        self._full: torch.Tensor | None = None

    def __repr__(self) -> str:  # printing shows the values, like a plain tensor
        return f"LazyLogits({self._materialize()!r})"

    # ---------------------------------------------------------------- rows
    def _compute(self, ps: list[int]) -> list[int]:
        """Unembed the positions of ``ps`` not yet known (one GEMM); returns them."""
        missing = [p for p in ps if p >= self._start and p not in self._known]
        if missing:
            rel = torch.tensor([p - self._start for p in missing], device=self._resid.device)
            with torch.no_grad():
                rows = self._unembed_fn(self._resid[:, rel])
            for i, p in enumerate(missing):
                self._known[p] = rows[:, i]
        return missing

    def _row(self, p: int) -> torch.Tensor:
        return self._corrupted[:, p] if p < self._start else self._known[p]

    def _materialize(self) -> torch.Tensor:
        if self._full is None:
            T = self.shape[1]
            self._log.materialized += 1
            self._compute(list(range(self._start, T)))
            if self._start >= T:
                self._full = self._corrupted.clone()
            else:
                new = torch.stack([self._known[p] for p in range(self._start, T)], dim=1)
                self._full = torch.cat([self._corrupted[:, : self._start], new], dim=1)
        return self._full

    def _positions(self, ps: list[int]) -> None:
        self._log.read.update(ps)
        self._log.missed.update(self._compute(ps))

    def _fast_getitem(self, index) -> torch.Tensor | None:
        """``self[index]`` from the needed positions only, or None when ``index`` is not of the form
        ``[batch_index, int or slice, ...]`` (then the caller materialises)."""
        idx = index if isinstance(index, tuple) else (index,)
        if len(idx) < 2 or any(i is None or i is Ellipsis for i in idx):
            return None
        b, p, rest = idx[0], idx[1], idx[2:]
        T = self.shape[1]
        if isinstance(p, numbers.Integral) and not isinstance(p, bool):
            if not -T <= int(p) < T:
                return None  # the plain tensor raises IndexError
            p = int(p) % T
            self._positions([p])
            # torch applies an integer index as a select first: x[b, p, *rest] == x[:, p][b, *rest]
            return self._row(p)[(b, *rest)]
        if isinstance(p, slice):
            if p.step is not None and p.step <= 0:
                return None  # torch rejects non-positive steps; let it raise
            ps = list(range(T)[p])
            self._positions(ps)
            if not ps:  # an empty position range: nothing to unembed
                return self._corrupted[:, :0][(b, slice(None), *rest)]
            rows = torch.stack([self._row(q) for q in ps], dim=1)
            return rows[(b, slice(None), *rest)]
        return None

    # ---------------------------------------------------------------- torch protocol
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _T.__getitem__ and len(args) == 2 and type(args[0]) is cls and args[0]._full is None:
            out = args[0]._fast_getitem(args[1])
            if out is not None:
                return out
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map(_plain, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached only by code that bypasses __torch_function__: compute on the full logits
        args, kwargs = tree_map(_plain, (args, kwargs or {}))
        return func(*args, **kwargs)


def _plain(a):
    return a._materialize() if isinstance(a, LazyLogits) else a


class ReadLog:
    """Which logit positions a metric read across calls, and how often it needed all of them."""

    def __init__(self) -> None:
        self.read: set[int] = set()
        self.missed: set[int] = set()
        self.materialized = 0
