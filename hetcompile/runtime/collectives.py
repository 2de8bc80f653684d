"""The all-reduce every rank's collectives go through (gradients, the loss, tensor parallelism),
and the send every rank's transfers go through.

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


def isend(t: torch.Tensor, dst: int, tag: int = 0):
    """Post a send of ``t`` to rank ``dst``; returns its work.

    NOTE: [handing a send over] gloo moves the data on its own communication thread. A CPU rank
    that goes on computing right after posting a send holds the core that thread was woken on,
    and the data then often leaves only when the rank next blocks or its time slice ends: on the
    project's 2-vCPU VM, one-way 4-byte transfers with 2 ms of compute after the send took over
    1 ms in 1-91 of 250 (mean 55-768 us, 4 runs) and 1-10 of 250 (mean 50-143 us) when the
    sender yielded its core once right after posting. In training (benchmarks/runtime_overhead.py,
    3 rounds a run, 4 runs each way alternated, 23:12-23:21 UTC) the MLP's 2-stage GPipe step
    went from 5.3-6.4 ms to 3.8-4.1 ms (0.77-0.95x the reference instead of 1.02-1.39x); its 1F1B and interleaved steps did not move beyond their spread. As with polling
    (NOTE: [polling collectives]), only where every rank has a core to itself: on a node with
    more ranks than cores the yield would hand the core to another rank's compute.
    """
    work = dist.isend(t, dst, tag=tag)
    if t.is_cpu and _core_each():
        os.sched_yield()
    return work
