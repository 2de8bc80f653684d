"""Roofline estimate of a block's compute time on a device type.

A block's time is bounded by its arithmetic (FLOPs / peak FLOP/s) and by its
memory traffic (bytes / memory bandwidth); the roofline takes the larger of
the two, each derated by an achievable-fraction-of-peak efficiency.
Backward is modelled as twice the forward: it computes the gradient with
respect to both the input and the weights, each about one forward's work.
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
    block: Block, device: DeviceType, dtype: str, efficiency: float = COMPUTE_EFFICIENCY
) -> tuple[float, float]:
    """(forward seconds per sample, backward seconds per sample) of ``block`` on ``device``.

    >>> from hetcompile.ir import Block
    >>> from cost_models.devices import CATALOG
    >>> b = Block(0, "h.0", 1e12, 1e6, 0, 0, 0.0, 0.0)
    >>> fwd, bwd = block_time_s(b, CATALOG["A100-80GB"], "bf16")
    >>> round(fwd * 1e3, 3), round(bwd / fwd, 6)
    (6.41, 2.0)
    """
    compute_s = block.fwd_flops_per_sample / (device.peak_flops_per_s(dtype) * efficiency)
    memory_s = block.fwd_bytes_per_sample / (device.mem_bw_bytes_per_s * MEMORY_EFFICIENCY)
    fwd_s = max(compute_s, memory_s)
    # Both terms scale by the same factor, so the backward max is the forward max scaled.
    return fwd_s, BACKWARD_FACTOR * fwd_s
