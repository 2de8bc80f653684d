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
