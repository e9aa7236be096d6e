"""What every sweep of ``sparsekern.patching`` shares: the metric type, argument checks, sharding, and the
one-forward-per-patch reference loop.

Activation patching (``_api``), attribution patching (``attribution``) and feature ablation
(``feature_ablation``) take the same kinds of argument; they are checked here once, so the three agree on
what they accept and on the words of their errors.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

Metric = Callable[[Float[torch.Tensor, "batch pos d_vocab"]], Float[torch.Tensor, ""]]
"""A patching metric: logits ``[batch, pos, d_vocab]`` -> a scalar (0-d tensor or a number)."""

BACKENDS = ("auto", "reference")

# [(hook point name, fn(act, hook) -> act), ...], as TransformerLens takes them
FwdHooks = list[tuple[str, Callable]]

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Issue ``message`` as a UserWarning the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)


def check_tokens(tokens, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Tokens ``[batch, pos]`` (a ``[pos]`` prompt becomes a batch of one, as in TransformerLens).

    Raises TypeError naming ``name`` for a non-tensor or a non-integer dtype, and ValueError for any
    other shape or an empty batch or sequence (no run to patch). Moved to ``device`` when given.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor [batch, pos], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor [batch, pos], got dtype {tokens.dtype}")
    if tokens.dim() == 1:  # TransformerLens adds the batch axis itself
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, pos] (or [pos]), got {list(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} must hold at least one prompt of at least one token, got shape {list(tokens.shape)}"
        )
    return tokens if device is None else tokens.to(device)


def check_options(metric, metric_name: str, backend: str, max_batch, memory_budget) -> None:
    """The engine options every sweep takes: ``backend`` in :data:`BACKENDS`, a callable metric, and
    ``max_batch`` / ``memory_budget`` positive ints or None (ValueError / TypeError naming the argument)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not callable(metric):
        raise TypeError(f"{metric_name} must be callable (logits [batch, pos, d_vocab] -> scalar)")
    sizes = {"max_batch": (max_batch, "int"), "memory_budget": (memory_budget, "number of bytes")}
    for arg, (value, what) in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive {what} or None, got {value!r}")


def as_scalar(value, arg_name: str, device) -> torch.Tensor:
    """Metric output -> 0-d tensor on ``device``; TypeError naming ``arg_name`` for anything non-scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"{arg_name} must return a scalar (a 0-d or one-element tensor, or a number); "
                f"it returned a tensor of shape {list(value.shape)}"
            )
        return value.detach().reshape(()).to(device)
    if isinstance(value, numbers.Real):
        return torch.tensor(float(value), device=device)
    raise TypeError(f"{arg_name} must return a scalar tensor or a number; it returned {type(value).__name__}")


@dataclass
class Shard:
    """This process's share of a sweep, passed as ``shard=`` to a sweep of ``sparsekern.patching``.

    Every rank plans the whole sweep as one process would; unit ``i`` of it (a chunk of the engine, or
    one patch of the one-forward-per-patch path) runs here iff ``i % world == rank``. The values of the
    others stay exactly 0, and values every rank could compute (no-op patches) are written by rank 0
    only, so the sum of the ranks' outputs is the single-process result bitwise (``x + 0 == x``).
    ``plans`` collects a digest of each plan; ranks compare them to catch different inputs.

    ``sparsekern.distributed.distributed_patch`` builds one per call; use it directly to run a part of a
    sweep yourself (e.g. ``Shard(0, 4)`` runs the first quarter).
    """

    rank: int
    world: int
    plans: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"Shard: world must be a positive int, got {self.world!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"Shard: rank must be an int in [0, world={self.world}), got {self.rank!r}")

    def mine(self, i: int) -> bool:
        """Whether unit ``i`` of the plan runs on this rank."""
        return i % self.world == self.rank

    @property
    def owns_shared(self) -> bool:
        """Whether this rank writes the values every rank knows without running anything (rank 0)."""
        return self.rank == 0

    def record(self, *what) -> None:
        """Append a digest of ``what`` (a plan's description, ``repr``-able) to :attr:`plans`."""
        self.plans.append(hashlib.sha1(repr(what).encode()).hexdigest())


def check_shard(shard) -> Shard | None:
    if shard is not None and not isinstance(shard, Shard):
        raise TypeError(f"shard must be None or a sparsekern.patching.Shard, got {type(shard).__name__}")
    return shard


def run_reference(
    model,
    tokens: torch.Tensor,
    runs: Sequence[tuple[FwdHooks, int | None]],
    metric: Metric,
    metric_name: str,
    *,
    engine=None,
    shard: Shard | None = None,
    label: str = "reference",
    progress: bool = False,
    fill_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One hooked forward per run: ``[len(runs)]`` metric values on the model device.

    Args:
        model: the ``HookedTransformer``; ``tokens`` ``[batch, pos]`` its input.
        runs: ``(fwd_hooks, layer)`` per patch. ``layer`` is the first block the hooks can change: with an
            ``engine`` (the cached corrupted run of ``tokens``) the forward starts there from its cached
            input; ``None`` (or no engine): ``model.run_with_hooks(tokens, fwd_hooks=...)``.
        metric, metric_name: logits ``[batch, pos, d_vocab]`` -> scalar, and its name in errors.
        shard: run only the patches ``i`` with ``shard.mine(i)`` (the rest are 0; ``label`` and the number
            of runs are recorded in ``shard.plans``).
        fill_dtype: dtype of those zeros (default: the default dtype).
        progress: a tqdm bar described by ``label``.
    """
    from tqdm.auto import tqdm

    device = torch.device(model.cfg.device)
    if shard is not None:
        shard.record(label, len(runs))
    vals = []
    for i in tqdm(range(len(runs)), disable=not progress, desc=label):
        if shard is not None and not shard.mine(i):
            vals.append(torch.zeros((), dtype=fill_dtype, device=device))
            continue
        fwd_hooks, layer = runs[i]
        if engine is not None and layer is not None:
            logits = engine.forward_from(layer, 0, 1, fwd_hooks)[0]
        else:
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        vals.append(as_scalar(metric(logits), metric_name, device))
    return torch.stack(vals) if vals else torch.zeros(0, dtype=fill_dtype, device=device)
