"""Small ``torch.distributed`` helpers shared by sparsekern's distributed code.

Only ``torch.distributed`` is used (NCCL on GPUs, gloo on CPUs): no scheduler or transport of our own.
Collectives go through :func:`collective`, which turns a backend error (a peer that died, a timeout of
the process group) into one clear ``RuntimeError`` naming the operation and this rank.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Group = Optional[dist.ProcessGroup]
R = TypeVar("R")
DEFAULT_TIMEOUT_S = 60.0  # tests / bench: a rank that dies must fail the others within a minute


def require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sparsekern.distributed needs an initialised default process group: launch with torchrun and "
            "call torch.distributed.init_process_group('nccl' or 'gloo', timeout=...) first "
            "(or sparsekern.distributed.init_process_group for a local gloo group)"
        )


def rank_world(group: Group = None) -> tuple[int, int]:
    """(rank in ``group``, size of ``group``); ``group=None`` is the default (WORLD) group."""
    require_initialized()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                         "passed as group")
    return rank, dist.get_world_size(group)


def free_port() -> int:
    """A free TCP port on localhost (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(
    rank: int, world_size: int, port: int, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """A localhost process group with a short ``timeout_s`` (tests, bench, single-machine runs).

    Under ``torchrun`` call ``torch.distributed.init_process_group`` yourself (env:// rendezvous);
    pass a ``timeout`` there too so that a failed rank cannot hang the others for the default 10/30 min.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def collective(name: str, fn: Callable[[], R], group: Group = None) -> R:
    """Run one collective; a backend failure becomes a RuntimeError that says what happened."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise RuntimeError(
            f"sparsekern.distributed: {name} failed on rank {rank}: another rank failed, exited or did not "
            f"reach the same collective within the process group's timeout ({type(e).__name__}: {e})"
        ) from e


def all_gather(t: Tensor, group: Group = None, name: str = "all_gather") -> list[Tensor]:
    """Every rank's ``t`` (same shape/dtype on all ranks), in rank order. Not differentiable."""
    _, world = rank_world(group)
    t = t.contiguous()  # the outputs take its layout: contiguous, as the backends want
    out = [torch.empty_like(t) for _ in range(world)]
    collective(name, lambda: dist.all_gather(out, t, group=group), group)
    return out


def all_reduce_(t: Tensor, group: Group = None, name: str = "all_reduce") -> Tensor:
    """In-place sum over ranks."""
    collective(name, lambda: dist.all_reduce(t, group=group), group)
    return t


def device_for(group: Group) -> torch.device:
    """Where ``group``'s collectives take their tensors: NCCL moves only CUDA tensors (the current device),
    gloo only CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_json(obj: Any, group: Group = None, name: str = "gather") -> list:
    """Every rank's JSON-able ``obj``, in rank order (tuples come back as lists).

    Sent as JSON bytes in a uint8 tensor, never pickled (``all_gather_object`` would unpickle what the
    other ranks send)."""
    dev = device_for(group)
    blob = torch.tensor(list(json.dumps(obj, sort_keys=True, default=str).encode()), dtype=torch.uint8)
    n = torch.tensor([blob.numel()], dtype=torch.int64, device=dev)
    sizes = all_gather(n, group, f"{name} (sizes)")
    padded = torch.zeros(int(max(s.item() for s in sizes)), dtype=torch.uint8, device=dev)
    padded[: blob.numel()] = blob.to(dev)
    blobs = all_gather(padded, group, name)
    return [json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode()) for b, s in zip(blobs, sizes)]


def check_agree(what: str, values: dict[str, Any], group: Group = None) -> None:
    """Raise ``ValueError`` naming every key of ``values`` (JSON-able) on which the ranks differ.

    Every rank raises the same error.
    """
    _, world = rank_world(group)
    if world == 1:
        return
    seen = gather_json(values, group, f"check_agree({what})")
    bad = sorted({k for d in seen for k in set(d) | set(seen[0]) if d.get(k) != seen[0].get(k)})
    if bad:
        detail = "; ".join(
            f"{k}: " + ", ".join(f"rank {r}={d.get(k)!r}" for r, d in enumerate(seen)) for k in bad)
        raise ValueError(f"sparsekern.distributed: ranks disagree on {what} ({detail})")


def split_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share of ``n`` items: the first ``n % world`` ranks get one
    more; shares are disjoint, in rank order, and cover ``[0, n)``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
