"""Alpha-beta communication costs: time = latency + bytes / bandwidth per message."""

from __future__ import annotations

import logging
from typing import Sequence

from cost_models.cluster import Cluster

logger = logging.getLogger(__name__)


def p2p_time_s(num_bytes: float, bw_bytes_per_s: float, latency_s: float) -> float:
    """Time to send ``num_bytes`` over one link; 0 when there is nothing to send.

    >>> p2p_time_s(1e9, 10e9, 1e-5)
    0.10001
    """
    if num_bytes <= 0:
        return 0.0
    return latency_s + num_bytes / bw_bytes_per_s


def ring_allreduce_time_s(num_bytes: float, num_devices: int, bw_bytes_per_s: float, latency_s: float) -> float:
    """Ring all-reduce: reduce-scatter then all-gather, 2(n-1) steps of bytes/n each.

    >>> ring_allreduce_time_s(1e9, 4, 100e9, 0.0)
    0.015
    """
    n = num_devices
    if n <= 1 or num_bytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * num_bytes / bw_bytes_per_s + 2 * (n - 1) * latency_s


def allreduce_time_s(num_bytes: float, cluster: Cluster, devices: Sequence[int], *, gradients: bool = False) -> float:
    """Ring all-reduce of ``num_bytes`` over ``devices`` (ring in the given order).

    ``gradients``: the all-reduce that ends a backward (a stage's gradients, a tied parameter's):
    on a node measured so, at those numbers (NOTE: [all-reduces after a backward] in
    cost_models/profile.py).

    Every step moves a chunk over every ring link at once, so the slowest link
    (lowest bandwidth, highest latency) sets the pace.

    >>> from cost_models.cluster import load_cluster
    >>> c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "A100-80GB", "count": 2}]})
    >>> allreduce_time_s(1e9, c, [0, 1]) < allreduce_time_s(1e9, c, [0, 1, 2, 3])
    True
    """
    n = len(devices)
    if n <= 1:
        return 0.0
    all_devices = cluster.devices
    nodes = {all_devices[d].node for d in devices}
    if len(nodes) == 1:
        profile = cluster.type_of(cluster.nodes[nodes.pop()].device).profile
        if profile is not None and profile.comm is not None:
            # Measured collective on this kind of node: its ring-equivalent link numbers
            # include the library's own overheads, which plain p2p numbers miss.
            c = profile.comm
            if gradients and c.grad_allreduce_bw_bytes_per_s > 0:
                return ring_allreduce_time_s(num_bytes, n, c.grad_allreduce_bw_bytes_per_s, c.grad_allreduce_latency_s)
            return ring_allreduce_time_s(num_bytes, n, c.allreduce_bw_bytes_per_s, c.allreduce_latency_s)
    ring = list(zip(devices, list(devices[1:]) + [devices[0]]))
    bw = min(cluster.link_bw_bytes_per_s(a, b) for a, b in ring)
    latency = max(cluster.link_latency_s(a, b) for a, b in ring)
    return ring_allreduce_time_s(num_bytes, n, bw, latency)
