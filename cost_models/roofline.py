"""Roofline estimate of a block's compute time on a device type.

A block's time is bounded by its arithmetic (FLOPs / peak FLOP/s) and by its
memory traffic (bytes / memory bandwidth); the roofline takes the larger of
the two, each derated by an achievable-fraction-of-peak efficiency.
Backward is modelled as twice the forward: it computes the gradient with
respect to both the input and the weights, each about one forward's work.

A device type with a measured profile (:mod:`cost_models.profile`) is modelled
as it was measured instead: one op at a time, so the matmul time (FLOPs at the
fitted matmul rate) and the memory time (bytes at the fitted copy bandwidth)
add up rather than overlap, with no derating (the rates are achieved ones),
plus a fixed cost per ATen call (:func:`block_overhead_s`) that does not shrink
with the batch and dominates small models on a CPU.

A block whose own forward and backward were timed on the device
(:mod:`hetcompile.block_profile`, found in the profile by the block's signature)
is priced by that measurement instead: one call on ``n`` samples costs
``fixed + per_sample * n``, the per-sample part from :func:`block_time_s` and
the fixed part from :func:`block_overhead_s`.
"""

from __future__ import annotations

import logging

from cost_models.devices import DeviceType
from hetcompile.ir import Block

logger = logging.getLogger(__name__)

# Why 0.5: well-tuned transformer training reaches 40-60% model FLOPs
# utilisation on large GEMMs; small ops, kernel launch gaps and non-matmul ops
# pull the average down, so half of peak is a middle-of-the-road guess until
# profiled times replace it.
COMPUTE_EFFICIENCY = 0.5
# Why 0.7: streaming kernels typically reach 70-80% of the datasheet HBM/GDDR
# bandwidth (STREAM-like measurements); elementwise ops rarely do better.
MEMORY_EFFICIENCY = 0.7
# Backward = grad w.r.t. inputs + grad w.r.t. weights, each about one forward.
BACKWARD_FACTOR = 2.0


def block_time_s(
    block: Block, device: DeviceType, dtype: str, efficiency: float = COMPUTE_EFFICIENCY, *,
    samples: int | None = None,
) -> tuple[float, float]:
    """(forward seconds per sample, backward seconds per sample) of ``block`` on ``device``.

    ``samples``: how many samples one call of the block runs (a device's share of a
    micro-batch). A profiled device's matmul rate depends on the size of each call;
    without it, the profile's fitted (large-matmul) rate is used.

    >>> from hetcompile.ir import Block
    >>> from cost_models.devices import CATALOG
    >>> b = Block(0, "h.0", 1e12, 1e6, 0, 0, 0.0, 0.0)
    >>> fwd, bwd = block_time_s(b, CATALOG["A100-80GB"], "bf16")
    >>> round(fwd * 1e3, 3), round(bwd / fwd, 6)
    (6.41, 2.0)
    """
    if device.profile is not None:
        p = device.profile
        measured = p.block_time(block.signature)
        if measured is not None:  # the block itself was timed on this device: its per-sample slope
            (_, fwd_s), (_, bwd_s) = measured.segment(samples)
            return fwd_s, bwd_s
        if samples and block.num_matmul_ops:
            rate = p.matmul_rate(dtype, samples * block.fwd_flops_per_sample / block.num_matmul_ops)
        else:
            rate = p.flops_per_s(dtype)
        fwd_s = block.fwd_flops_per_sample / rate + block.fwd_bytes_per_sample / p.mem_bw_bytes_per_s
        return fwd_s, BACKWARD_FACTOR * fwd_s
    compute_s = block.fwd_flops_per_sample / (device.peak_flops_per_s(dtype) * efficiency)
    memory_s = block.fwd_bytes_per_sample / (device.mem_bw_bytes_per_s * MEMORY_EFFICIENCY)
    fwd_s = max(compute_s, memory_s)
    # Both terms scale by the same factor, so the backward max is the forward max scaled.
    return fwd_s, BACKWARD_FACTOR * fwd_s


def block_overhead_s(block: Block, device: DeviceType, *, samples: int | None = None) -> tuple[float, float]:
    """(forward, backward) seconds one call of ``block`` costs whatever its batch: the per-op time.

    ``samples``: as for :func:`block_time_s`; a measured block's fixed part is that of its
    measured curve around that size (NOTE: [measured curve] in cost_models/profile.py).

    0 without a profile: the datasheet model has no per-op term (a GPU's launch
    overhead hides behind asynchronous execution on large enough work).

    >>> from hetcompile.ir import Block
    >>> from cost_models.devices import CATALOG
    >>> block_overhead_s(Block(0, "h.0", 1e9, 1e6, 0, 0, 0.0, 0.0, num_ops=10, num_grad_ops=8), CATALOG["CPU"])
    (0.0, 0.0)
    """
    if device.profile is None:
        return 0.0, 0.0
    p = device.profile
    measured = p.block_time(block.signature)
    if measured is not None:  # the block itself was timed: the fixed part of its call time
        (fwd_s, _), (bwd_s, _) = measured.segment(samples)
        return fwd_s, bwd_s
    return block.num_ops * p.op_fwd_overhead_s, block.num_grad_ops * p.op_bwd_overhead_s


def stage_call_overhead_s(device: DeviceType) -> tuple[float, float]:
    """(forward, backward) seconds a rank pays per stage and micro-batch for calling the stage at all:
    one graph call and one ``autograd.backward``, apart from their ops (measured with the blocks,
    :mod:`hetcompile.block_profile`). 0 without a profile, or with one that timed no blocks.

    >>> from cost_models.devices import CATALOG
    >>> stage_call_overhead_s(CATALOG["CPU"])
    (0.0, 0.0)
    """
    if device.profile is None:
        return 0.0, 0.0
    return device.profile.stage_call_fwd_s, device.profile.stage_call_bwd_s


# An Adam-like step reads the parameter, its gradient and two moments and writes
# three of them: about seven times the parameter bytes of memory traffic.
OPTIMIZER_BYTES_PER_PARAM_BYTE = 7.0


def optimizer_time_s(num_param_tensors: int, param_bytes: float, device: DeviceType, optimizer: str = "", *,
                     whole_step: bool = True) -> float:
    """Seconds of one optimizer step over these parameters: per-tensor loop turns plus memory traffic.

    ``optimizer``: the model's (``ModelCosts.optimizer``); where the device's profile measured
    it, its measured step (without its per-step part where not ``whole_step``: another stage
    of the same rank steps in the same call), and otherwise an AdamW step. 0 without a
    profile: the datasheet model leaves the optimizer out (on a GPU a fused step over the
    stage's parameters is small beside the pipeline).

    >>> from cost_models.devices import CATALOG
    >>> optimizer_time_s(4, 1e9, CATALOG["A100-80GB"])
    0.0
    """
    if device.profile is None:
        return 0.0
    p = device.profile
    measured = p.optimizer_time(optimizer)
    if measured is not None:
        return measured.step_time_s(num_param_tensors, param_bytes, whole_step=whole_step)
    return num_param_tensors * p.optimizer_per_tensor_s + OPTIMIZER_BYTES_PER_PARAM_BYTE * param_bytes / p.mem_bw_bytes_per_s
