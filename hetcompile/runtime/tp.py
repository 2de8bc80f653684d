"""The two collectives of tensor parallelism, with their autograd (Megatron's f and g).

The emitted stage programs call them as ``tp.enter(x)`` and ``tp.all_reduce(x)``
(:mod:`passes.partition_ops` decides where). ``GROUP`` is this rank's
tensor-parallel process group, set by :class:`~hetcompile.runtime.RankContext`.

- ``enter``: a replicated tensor enters split computation. Forward: nothing to
  do, every rank has it whole. Backward: each rank has only the part of its
  gradient that flowed through its shards; the sum over the group is the whole.
- ``all_reduce``: a matmul split on its contraction dim gives each rank a partial
  sum. Forward: sum over the group. Backward: the gradient of a sum is passed
  through unchanged to every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

GROUP = None  # this rank's tensor-parallel group (None outside a tensor-parallel stage)


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=GROUP)
        return grad


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=GROUP)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def enter(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over the tensor-parallel group in backward."""
    return _Enter.apply(x) if x.requires_grad else x


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of the ranks' partial results over the tensor-parallel group; identity in backward."""
    return _AllReduce.apply(x)


FUNCTIONS = (enter, all_reduce)  # what emitted stage programs may call, as tp.<name>


def local_param(full: torch.Tensor, dim: int, ranges) -> torch.Tensor:
    """A member's slice of a parameter: the indices in ``ranges`` (half-open intervals) of ``dim``."""
    pieces = [full.narrow(dim, lo, hi - lo) for lo, hi in ranges]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def full_param(pieces: list[torch.Tensor], dim: int, ranges_per_member) -> torch.Tensor:
    """The whole parameter from every member's slice (the inverse of :func:`local_param`)."""
    shape = list(pieces[0].shape)
    shape[dim] = sum(hi - lo for ranges in ranges_per_member for lo, hi in ranges)
    full = pieces[0].new_empty(shape)
    for piece, ranges in zip(pieces, ranges_per_member):
        at = 0
        for lo, hi in ranges:
            full.narrow(dim, lo, hi - lo).copy_(piece.narrow(dim, at, hi - lo))
            at += hi - lo
    return full
