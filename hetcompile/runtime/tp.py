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

Below them, the slicing of split parameters (``StageSpec.param_shards``):
a member's slice of a whole tensor, and the whole tensor back from the slices,
on one process (:func:`full_param`) or across the group (:func:`gather_param`,
for checkpoints).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hetcompile.runtime import collectives

GROUP = None  # this rank's tensor-parallel group (None outside a tensor-parallel stage)


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        collectives.all_reduce(grad, group=GROUP)
        return grad


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        collectives.all_reduce(x, group=GROUP)
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
    full = pieces[0].new_empty(full_shape(pieces[0], dim, ranges_per_member))
    for piece, ranges in zip(pieces, ranges_per_member):
        _write_slice(full, piece, dim, ranges)
    return full


def gather_param(local: torch.Tensor, dim: int, ranges_per_member, member: int, group=None) -> torch.Tensor:
    """Collective over ``group``: the whole parameter on every member, from each member's slice ``local``.

    Each member writes its slice into zeros and the group sums them: exact, as
    every element is one member's value plus zeros. Slices may be uneven, which
    an all-gather (equal sizes) would not take. Also for optimizer state shaped
    like the slice (Adam's moments, SGD's momentum).

    >>> full = gather_param(p, shard.dim, shard.ranges, tp_rank, tp.GROUP)  # doctest: +SKIP
    """
    full = local.new_zeros(full_shape(local, dim, ranges_per_member))
    _write_slice(full, local, dim, ranges_per_member[member])
    dist.all_reduce(full, group=group)
    return full


def full_shape(piece: torch.Tensor, dim: int, ranges_per_member) -> tuple[int, ...]:
    """The shape of the whole parameter, from one member's slice ``piece`` and every member's ranges.

    >>> full_shape(torch.empty(2, 6), 1, (((0, 3), (6, 9)), ((3, 6), (9, 12))))
    (2, 12)
    """
    shape = list(piece.shape)
    shape[dim] = sum(hi - lo for ranges in ranges_per_member for lo, hi in ranges)
    return tuple(shape)


def _write_slice(full: torch.Tensor, piece: torch.Tensor, dim: int, ranges) -> None:
    at = 0
    for lo, hi in ranges:
        full.narrow(dim, lo, hi - lo).copy_(piece.narrow(dim, at, hi - lo))
        at += hi - lo
