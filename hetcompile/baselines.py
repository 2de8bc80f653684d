"""Baselines the planner is measured against, and the cluster's throughput upper bound.

- :func:`even_split`: what a homogeneous trainer does on the same devices: equal
  blocks per pipeline stage, equal batch per device, consecutive devices per stage
  (it does not know the types apart); the number of stages is the best one that
  fits memory, as a user tuning such a trainer would pick.
- :func:`fastest_type_only`: the planner's best plan on the devices of the
  fastest type alone, the rest left idle.
- :func:`upper_bound_samples_per_s`: HetHub's bound, the sum over device types of
  the throughput that type's devices reach alone with the best plan for the same
  model and global batch.

Every number here comes from the one predictor (:func:`hetcompile.predict.predict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator

from cost_models.cluster import Cluster
from cost_models.memory import device_memory_bytes
from cost_models.roofline import block_time_s
from hetcompile.errors import UserError
from hetcompile.ir import ModelCosts
from hetcompile.planner import PlanDecision, StageDecision, solve
from hetcompile.planner_process import FORK_BLOCKED_SIGNALS
from hetcompile.predict import predict

logger = logging.getLogger(__name__)

# Baseline solves stop at the planner's deterministic budgets (NOTE: [deterministic search] in
# hetcompile/planner.py), so the upper bound does not depend on the machine's load; this wall limit
# is only a safety net, far above their normal time (under a second to a few seconds).
_BASELINE_TIME_LIMIT_S = 120.0

# NOTE: [bound searches] HetHub's bound searches each device type alone at half the planner's
# deterministic budgets (``solve(..., effort=...)``). One type has no type assignment to search,
# and its searches settle early: at half the budget the per-type throughputs of every sub-cluster
# of benchmarks/plan_quality.py (42 searches) and of Llama-3 8B on 64 GPUs were the same to the last
# digit as at the full budget, for 15% less CPU on the former and a quarter to a third less on the
# latter (4.6-4.7 to 3.0-3.5 s, two runs), which the compile command spends beside its own search.
# Of the examples/ models on their example clusters, four of five gave the same bound; GPT-2 large
# on H100+A100+T4 one 0.07% lower (efficiency 0.9208 to 0.9214). A search stopped short can only
# lower the bound (flattering the plan's efficiency), so this is the one place where the budget is
# cut, and only as far as it was measured to change next to nothing.
BOUND_SEARCH_EFFORT = 0.5


def sub_cluster(cluster: Cluster, type_name: str) -> tuple[Cluster, tuple[int, ...]]:
    """The cluster restricted to the nodes of one device type, and each of its devices' index in ``cluster``.

    >>> from cost_models.cluster import load_cluster
    >>> c = load_cluster({"nodes": [{"device": "V100-32GB", "count": 2}, {"device": "A100-80GB", "count": 1}]})
    >>> sub, index = sub_cluster(c, "A100-80GB")
    >>> sub.num_devices, index
    (1, (2,))
    """
    name = cluster.type_of(type_name).name
    nodes = tuple(n for n in cluster.nodes if n.device == name)
    sub = dataclasses.replace(cluster, nodes=nodes, device_types=(cluster.type_of(name),))
    index = tuple(d.index for d in cluster.devices if d.type == name)
    return sub, index


def samples_per_s(decision: PlanDecision, costs: ModelCosts, cluster: Cluster, schedule: str) -> float:
    """Predicted throughput of a decision (the one predictor)."""
    predicted, _ = predict(decision, costs, cluster, schedule)
    return predicted["samples_per_s"]


def _type_speed(costs: ModelCosts, cluster: Cluster, name: str) -> float:
    """Samples per second of one device of type ``name`` on the whole model (higher is faster)."""
    t = cluster.type_of(name)
    return 1.0 / max(sum(sum(block_time_s(b, t, costs.dtype)) for b in costs.blocks), 1e-15)


def _schedules(schedule: str) -> tuple[str, ...]:
    # A homogeneous trainer's even split runs one stage per device group: interleaved means 1F1B here.
    return ("gpipe", "1f1b") if schedule == "auto" else ("1f1b",) if schedule == "interleaved" else (schedule,)


def _alone(schedule: str) -> str:
    """The schedule of a plan on one device type: it may be best without interleaving (which needs 2
    stages or more), so "interleaved" lets it choose, as "auto" does."""
    return "auto" if schedule == "interleaved" else schedule


def _microbatch_counts(costs: ModelCosts, num_microbatches: int | None) -> list[int]:
    if num_microbatches is not None:
        return [num_microbatches]
    g = costs.global_batch
    return [m for m in range(1, g + 1) if g % m == 0 and m <= 512]


def even_split(costs: ModelCosts, cluster: Cluster, *, num_microbatches: int | None = None,
               schedule: str = "1f1b") -> PlanDecision:
    """Equal blocks per stage and equal batch per device over every device, type-blind.

    Tries every pipeline depth S that divides the device count (data-parallel
    degree D/S <= micro-batch size) and every micro-batch count allowed, keeps
    the plans whose every device fits in memory, and returns the fastest.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = tuple(Block(i, f"h.{i}", 1e12, 1e6, 1000, 250, 1e3, 1e3) for i in range(2))
    >>> c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "V100-32GB", "count": 2}]})
    >>> d = even_split(ModelCosts(blocks, 8, "bf16"), c, num_microbatches=2)
    >>> [(s.first_block, s.last_block, s.devices, s.shares) for s in d.stages]
    [(0, 1, (0, 1, 2, 3), (1, 1, 1, 1))]
    """
    num_devices, nb = cluster.num_devices, costs.num_blocks
    best: tuple[float, PlanDecision] | None = None
    for sched in _schedules(schedule):
        for m in _microbatch_counts(costs, num_microbatches):
            b = costs.global_batch // m
            for s in range(1, min(nb, num_devices) + 1):
                if num_devices % s or num_devices // s > b:
                    continue
                dp = num_devices // s
                decision = dataclasses.replace(_even_decision(costs, num_devices, s, dp, m, b), schedule=sched)
                if not _fits(decision, costs, cluster, sched):
                    continue
                rate = samples_per_s(decision, costs, cluster, sched)
                if best is None or rate > best[0]:
                    best = (rate, decision)
    if best is None:
        raise UserError(
            f"No even split of the model over the {num_devices} devices fits in memory (equal blocks per stage "
            "and equal batch per device for every pipeline depth dividing the device count). Use the planner, "
            "which gives each device what it can hold, or add devices."
        )
    return best[1]


def _even_decision(costs: ModelCosts, num_devices: int, num_stages: int, dp: int, m: int, b: int) -> PlanDecision:
    nb = costs.num_blocks
    stages = []
    for s in range(num_stages):
        first, last = s * nb // num_stages, (s + 1) * nb // num_stages - 1
        devices = tuple(range(s * dp, (s + 1) * dp))
        shares = tuple(b // dp + (i < b % dp) for i in range(dp))
        stages.append(StageDecision(first, last, devices, shares))
    return PlanDecision(tuple(stages), m, b)


def _fits(decision: PlanDecision, costs: ModelCosts, cluster: Cluster, schedule: str) -> bool:
    num_stages = len(decision.stages)
    for s, st in enumerate(decision.stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        params = sum(b.param_bytes for b in blocks)
        acts = sum(b.act_bytes_per_sample for b in blocks)
        in_flight = decision.num_microbatches if schedule == "gpipe" else min(decision.num_microbatches,
                                                                              num_stages - s)
        for d, share in zip(st.devices, st.shares):
            capacity = cluster.type_of(cluster.devices[d].type).mem_bytes
            if device_memory_bytes(params, acts, share * in_flight) > capacity:
                return False
    return True


def fastest_type_only(costs: ModelCosts, cluster: Cluster, *, num_microbatches: int | None = None,
                      schedule: str = "1f1b", seed: int = 0) -> PlanDecision:
    """The planner's best plan on the fastest device type alone (the other devices idle).

    Device indices are those of ``cluster``.
    """
    names = sorted((t.name for t in cluster.device_types), key=lambda n: (-_type_speed(costs, cluster, n), n))
    errors = []
    for name in names:  # the fastest type may not hold the model; then the next fastest
        sub, index = sub_cluster(cluster, name)
        try:
            decision, _ = solve(costs, sub, num_microbatches=num_microbatches, schedule=_alone(schedule),
                                time_limit_s=_BASELINE_TIME_LIMIT_S, seed=seed)
        except UserError as e:
            errors.append(str(e))
            continue
        stages = tuple(dataclasses.replace(st, devices=tuple(index[d] for d in st.devices))
                       for st in decision.stages)
        return dataclasses.replace(decision, stages=stages)
    raise UserError(errors[0])


def _alone_samples_per_s(costs: ModelCosts, cluster: Cluster, name: str, num_microbatches: int | None,
                         schedule: str, seed: int) -> float:
    """Throughput of the devices of type ``name`` alone with the planner's best plan (0 if none fits)."""
    sub, _ = sub_cluster(cluster, name)
    try:
        decision, _ = solve(costs, sub, num_microbatches=num_microbatches, schedule=_alone(schedule),
                            time_limit_s=_BASELINE_TIME_LIMIT_S, seed=seed, effort=BOUND_SEARCH_EFFORT)
    except UserError:
        return 0.0
    return samples_per_s(decision, costs, sub, decision.schedule)


def _bound_worker() -> None:
    """A forked per-type search: low priority; stopped by its parent (terminate), not by the
    parent's signal handlers (the CLI turns SIGTERM into a clean exit of its own); Ctrl-C is the
    parent's to handle. The parent forks with both signals blocked, so a terminate that comes
    before this runs waits for the default handler instead of meeting the parent's."""
    os.nice(10)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)


@contextlib.contextmanager
def per_type_beside(costs: ModelCosts, cluster: Cluster, *, num_microbatches: int | None = None,
                    schedule: str = "1f1b", seed: int = 0) -> Iterator[Callable[[], dict[str, float]]]:
    """Start the per-type searches of :func:`per_type_samples_per_s` beside the caller; yields
    the function that waits for their result.

    NOTE: [searches side by side] HetHub's bound needs one planner search per device type,
    together about as long as the plan's own search. They run in processes forked here, one per
    type, while the caller goes on (the compiler: with the plan's search). Every search stops at
    deterministic budgets, so the result is that of one search after the other, in about half the
    time on two cores. They run at a lower priority (nice 10), so the caller's own search, which the
    rest of its work waits on, keeps a core, and theirs take the spare time. Threads would not do:
    the searches' Python parts share one GIL and the caller's search starves. Forking happens here,
    before the caller starts its own search, never while another thread of this process runs one.
    Leaving the block stops searches still running.
    """
    names = [t.name for t in cluster.device_types]
    args = [(costs, cluster, name, num_microbatches, schedule, seed) for name in names]
    # One after the other where forking is not there, or not allowed (inside a daemonic process).
    if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
        yield lambda: {name: _alone_samples_per_s(*a) for name, a in zip(names, args)}
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED_SIGNALS)
    try:
        pool = multiprocessing.get_context("fork").Pool(len(names), initializer=_bound_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        pending = pool.starmap_async(_alone_samples_per_s, args)
        yield lambda: dict(zip(names, pending.get()))
    finally:
        pool.terminate()
        pool.join()


def per_type_samples_per_s(costs: ModelCosts, cluster: Cluster, *, num_microbatches: int | None = None,
                           schedule: str = "1f1b", seed: int = 0) -> dict[str, float]:
    """Per device type: the throughput its devices reach alone with the planner's best plan (0 if none fits)."""
    with per_type_beside(costs, cluster, num_microbatches=num_microbatches, schedule=schedule,
                         seed=seed) as result:
        return result()


def upper_bound_samples_per_s(costs: ModelCosts, cluster: Cluster, *, num_microbatches: int | None = None,
                              schedule: str = "1f1b", seed: int = 0) -> float:
    """HetHub's upper bound: the sum over device types of the throughput of that type alone.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = tuple(Block(i, f"h.{i}", 1e12, 1e6, 1000, 250, 1e3, 1e3) for i in range(2))
    >>> c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 1}]})
    >>> round(upper_bound_samples_per_s(ModelCosts(blocks, 8, "bf16"), c, num_microbatches=1), 1)
    26.0
    """
    return sum(per_type_samples_per_s(costs, cluster, num_microbatches=num_microbatches, schedule=schedule,
                                      seed=seed).values())
