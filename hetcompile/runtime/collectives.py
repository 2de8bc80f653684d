"""The all-reduce every rank's collectives go through (gradients, the loss, tensor parallelism).

NOTE: [polling collectives] A CPU rank (gloo) that has a core to itself polls its all-reduce
until it completes, yielding the core at each poll, instead of blocking in it. A rank that
blocks gives its core back to the OS; on a virtual machine the idle vCPU then halts, and waking
it when the peers' data arrives costs far more than the transfer: on this project's 2-vCPU VM
the data-parallel MLP's gradient and loss all-reduces took 1-6 ms each in training against
0.3-0.6 ms in a loop, and its step time went from 6.8-9.0 ms (median of 35 steps, two runs) to
5.4-5.9 ms polling. MPI libraries poll for the same reason. With more ranks on the node than
cores, a polling rank takes CPU time from the ranks still computing (``sched_yield`` does not
give up its fair share), so there every rank blocks. Three ranks on the 2 vCPUs, one compiled
plan, runs of 24 steps alternated (median of the last 20 per run): the gpt2 DP+pipeline plan of
benchmarks/predictor_accuracy.py took 237-248 ms a step blocking against 268-278 ms polling; its
llama 3-stage plan 52-60 ms either way. GPU collectives (NCCL) are waited for as usual: their
``wait`` only orders the streams.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _core_each() -> bool:
    """Whether every rank on this node has its own cores (torchrun's LOCAL_WORLD_SIZE ranks here)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size())
    return local_ranks * torch.get_num_threads() <= usable_cores()


def all_reduce(t: torch.Tensor, group=None) -> None:
    """Sum ``t`` over ``group`` (the default group when None), in place."""
    if not t.is_cpu or not _core_each():
        dist.all_reduce(t, group=group)
        return
    work = dist.all_reduce(t, group=group, async_op=True)
    while not work.is_completed():
        os.sched_yield()
    work.wait()  # raises the peer's failure, if that is how it completed
