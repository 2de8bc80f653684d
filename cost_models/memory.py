"""Per-device memory model for training with an Adam-like optimizer.

    memory = weights + gradients + optimizer state + activations in flight
           = P + P + s * P + A * n

with P the parameter bytes held by the device (its stage's parameters, fully
replicated under data parallelism), s the optimizer state per parameter byte
(Adam keeps two moments of the parameter's size: s = 2), A the activation
bytes saved for backward per sample, and n the samples whose forward has run
but whose backward has not yet (micro-batch share x micro-batches in flight,
which the pipeline schedule decides). Workspace, fragmentation and the CUDA
context are not modelled; callers leave headroom if they need it.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

ADAM_STATE_PER_PARAM_BYTE = 2.0  # exp_avg and exp_avg_sq, each the parameter's size


def device_memory_bytes(
    param_bytes: float,
    act_bytes_per_sample: float,
    samples_in_flight: float,
    optimizer_state_per_param_byte: float = ADAM_STATE_PER_PARAM_BYTE,
) -> int:
    """Peak bytes one device needs: weights + grads + optimizer state + saved activations.

    >>> device_memory_bytes(1_000, 10, 4)
    4040
    """
    weights_and_grads = 2 * param_bytes
    optimizer = optimizer_state_per_param_byte * param_bytes
    activations = act_bytes_per_sample * samples_in_flight
    return int(math.ceil(weights_and_grads + optimizer + activations))


# Weights + gradients + optimizer state, per parameter byte.
STATIC_BYTES_PER_PARAM_BYTE = 2 + ADAM_STATE_PER_PARAM_BYTE


def stage_memory_bytes(
    param_bytes: int,
    act_bytes_per_sample: int,
    in_bytes_per_sample: int,
    share: int,
    in_flight: int,
    recompute: bool,
) -> int:
    """Peak bytes of one device of a pipeline stage, in integers (the planner's exact constraint).

    Without recompute the device keeps every in-flight micro-batch's saved
    activations: ``share * in_flight * A``. With recompute it keeps only each
    in-flight micro-batch's stage input and rebuilds the activations of one
    micro-batch at a time before its backward: ``share * (in_flight * I + A)``.

    >>> stage_memory_bytes(1_000, 10, 1, share=2, in_flight=4, recompute=False)
    4080
    >>> stage_memory_bytes(1_000, 10, 1, share=2, in_flight=4, recompute=True)
    4028
    """
    static = int(math.ceil(STATIC_BYTES_PER_PARAM_BYTE * param_bytes))
    per_sample = in_flight * in_bytes_per_sample + act_bytes_per_sample if recompute else in_flight * act_bytes_per_sample
    return static + share * per_sample


def tp_share(fraction: float, part: int, total: int) -> float:
    """What a tensor-parallel member with ``part`` of ``total`` keeps of a block's quantity (params,
    FLOPs, activations) when ``fraction`` of it is split: the rest stays whole on every member.

    >>> tp_share(0.9, 1, 2)
    0.55
    >>> tp_share(0.9, 3, 4)
    0.775
    """
    if total <= 1:
        return 1.0
    return (1.0 - fraction) + fraction * part / total
