"""The differentiable communication pieces of the feature-sharded SAE (Megatron-style).

Contract: every rank runs the same forward and calls ``backward`` on the same (replicated) loss.

* :func:`copy_to_group`: identity forward, all-reduce (sum) backward. Applied to the replicated encoder
  input: each rank's local encode only sees the gradient of its own features.
* :func:`reduce_from_group`: all-reduce (sum) forward, identity backward. The decode's partial sums.
* :func:`pick`: select slots of the candidates gathered from every rank; the backward routes each
  selected slot's gradient to the rank that owns it (other ranks drop it). Correct because a rank's
  gradient at the slots it owns is complete: the decode of those slots happens only there, and any
  replicated use of the code gives every rank the same gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _comm


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _comm.all_reduce_(g.contiguous().clone(), ctx.group, "all_reduce (encoder input grad)"), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _comm.all_reduce_(x.contiguous().clone(), group, "all_reduce (decode)")

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _Pick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_loc: Tensor, gathered: Tensor, order: Tensor, rank: int, width: int) -> Tensor:
        ctx.save_for_backward(order)
        ctx.rank, ctx.width, ctx.k_loc = rank, width, v_loc.shape[1]
        return gathered.gather(1, order)

    @staticmethod
    def backward(ctx, g: Tensor):
        (order,) = ctx.saved_tensors
        own = torch.div(order, ctx.width, rounding_mode="floor") == ctx.rank
        pos = torch.where(own, order % ctx.width, torch.zeros_like(order))
        g_loc = g.new_zeros(g.shape[0], ctx.width)
        g_loc.scatter_add_(1, pos, torch.where(own, g, torch.zeros_like(g)))
        return g_loc[:, : ctx.k_loc], None, None, None, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, sizes: tuple[int, ...], rank: int) -> Tensor:
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        pad = max(sizes) - x.shape[-1]
        xp = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1) if pad else x
        parts = _comm.all_gather(xp, group, "all_gather (dense pre-activations)")
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], -1)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g[..., ctx.start: ctx.start + ctx.size], None, None, None


def gather_last(x: Tensor, group, sizes: tuple[int, ...], rank: int) -> Tensor:
    """Concatenate every rank's ``x [..., sizes[r]]`` along the last dim (a dense ``[..., d_sae]``);
    the backward keeps this rank's slice of the (replicated) gradient."""
    return _GatherLast.apply(x, group, tuple(sizes), rank)


def copy_to_group(x: Tensor, group) -> Tensor:
    return _CopyToGroup.apply(x, group) if x.requires_grad else x


def reduce_from_group(x: Tensor, group) -> Tensor:
    return _ReduceFromGroup.apply(x, group)


def pick(v_loc: Tensor, gathered: Tensor, order: Tensor, rank: int, width: int) -> Tensor:
    """``gathered.gather(1, order)`` where ``gathered [N, R*width]`` holds every rank's ``width``
    candidates (this rank's are ``v_loc``, padded); differentiable in ``v_loc`` only."""
    return _Pick.apply(v_loc, gathered, order, rank, width)
