"""The planner: pipeline stages, device groups, batch shares and recompute from CP-SAT (OR-Tools).

Plain data in (:class:`~hetcompile.ir.ModelCosts`, :class:`~cost_models.cluster.Cluster`),
a :class:`PlanDecision` out. Predictions (times) stay in the :class:`SolverReport`.

Formulation
===========

Notation. Blocks ``0..B-1`` in order; device types ``k`` with ``N_k`` devices
(the largest node of type ``k`` holds ``L_k``); ``M`` micro-batches of
``b = global_batch / M`` samples; ``S`` pipeline stages. Every per-block cost is
an integer prefix array over block positions ``p = 0..B`` (time in units of
1/TIME_UNITS_PER_S s, memory in bytes), built once by :class:`_Problem`:
``Tk[p]`` per-sample forward+backward time on type ``k``, ``Rk[p]`` the same
with recompute (one more forward), ``P[p]`` parameter bytes, ``A[p]``
activation bytes per sample, ``I[p]`` bytes per sample entering a stage that
starts at ``p``, ``X[p]`` the time to send a micro-batch's activations across
cut ``p`` over the inter-node link (their gradients go back the other way at the
same time on a full-duplex link), ``Wc[p]`` twice the
parameter bytes over the bandwidth of link class ``c`` (inter-node, or
intra-node of type ``k``).

Size. The model for ``S`` stages has O(S x types) variables: a stage is two
cut positions indexing the prefix arrays (CP-SAT ``element``), and devices are
counted per type, never enumerated. Depth (B) only lengthens constant arrays;
device count only widens domains. Repeated identical layers therefore cost
nothing extra, and 1,024 devices cost what 16 do.

Variables, per stage ``s``:
    ``cut[s]``: the stage runs blocks ``cut[s] .. cut[s+1]-1`` (``cut[0] = 0``, ``cut[S] = B``);
    ``n[s,k]``: type-``k`` devices in the stage (data parallel);
    ``q[s,k]``: samples of each micro-batch a type-``k`` device takes, at most
    (uneven shares: a fast type takes more);
    ``rc[s]``: the stage recomputes its activations in backward;
    ``cls[s,c]``: the link class of the stage's all-reduce;
    ``C[s]``: compute time of one micro-batch (forward + backward, slowest device);
    ``AR[s]``: its gradient all-reduce.
    ``z``: the bottleneck (period between micro-batches); ``w``: the slowest all-reduce.

Objective (integer time units)::

    minimise  sum_s C[s]  +  2 sum_{s>0} X[cut[s]]  +  (M - 1) * z  +  w

fill-and-drain of one micro-batch through every stage and across every cut
(forward and back), the other ``M - 1`` micro-batches at the pace of the
bottleneck, then the all-reduces (which run concurrently across stages, so the
slowest one counts). :meth:`_Problem.objective_units` evaluates exactly this.

Constraints (method that adds them):

- contiguous stages: ``cut[s] + 1 <= cut[s+1]``                         (:meth:`_StageModel.add_contiguous_stages`)
- shares cover the micro-batch: ``sum_k n[s,k] q[s,k] >= b``, ``1 <= sum_k n[s,k] <= b``,
  ``n[s,k] >= 1  <=>  q[s,k] >= 1``                                       (:meth:`_StageModel.add_shares`)
- devices per type: ``sum_s n[s,k] <= N_k`` (idle devices allowed)        (:meth:`_StageModel.add_device_counts`)
- stage time: ``C[s] >= q[s,k] (Tk[cut[s+1]] - Tk[cut[s]])``, with ``Rk`` for ``Tk``
  when ``rc[s]``                                                           (:meth:`_StageModel.add_stage_times`)
- memory, when ``n[s,k] >= 1``: ``(2 + adam) P(s) + q[s,k] f_s A(s) <= mem_k``, or with
  recompute ``(2 + adam) P(s) + q[s,k] (f_s I[cut[s]] + A(s)) <= mem_k``, where
  ``f_s = M`` (GPipe) or ``min(M, S - s)`` (1F1B) micro-batches in flight
  (:func:`cost_models.memory.stage_memory_bytes`)                          (:meth:`_StageModel.add_memory`)
- link-aware all-reduce: ``cls[s, intra k]`` only when the stage uses type ``k``
  alone and ``n[s,k] <= L_k`` (one node); then
  ``AR[s] >= ceil(F(n_s) Wc(s)) + 2 (n_s - 1) lat_c``, ``F(n) = (n-1)/n`` in
  permille, ``n_s = sum_k n[s,k]``                                          (:meth:`_StageModel.add_allreduce`)
- bottlenecks: ``z >= C[s]``, ``z >= X[cut[s]]`` (the link is busy too), ``w >= AR[s]``;
  for 1F1B, where stage ``s`` holds at most ``S - s`` micro-batches, the round trip
  ``(S - s) z >= sum_{s'>=s} C[s'] + 2 sum_{s'>s} X[cut[s']]``; and the valid cut
  ``z >= z_min`` (every device busy on its share of the work)              (:meth:`_StageModel.add_bottlenecks`)

The search around the model (:func:`solve`): a constructive heuristic
(:func:`_heuristic`: proportional device mix per stage, type-pure stages, each
type alone, the even split a homogeneous trainer would run) scores every micro-batch count (when ``num_microbatches`` is None),
schedule (when ``schedule="auto"``) and stage count on a ladder (every ``S``
up to 12, then steps of about 25%); CP-SAT then solves one model per
(micro-batch count, schedule, stage count), best-scored first, each hinted with
its heuristic plan and cut off at the incumbent, until MAX_SOLVED_MODELS models
or MAX_SOLVED_VARIABLES variables; a pair whose analytic bound
(:meth:`_Problem.lower_bound_units`) reaches the incumbent is skipped as proven.
The plan is never worse than the heuristic. The gap is against the smallest
bound over every pair (CP-SAT's, or the analytic one for pairs not solved);
"OPTIMAL" means every pair was solved or bounded out and the ladder covered
every stage count. Deterministic time limits and model budgets, a fixed seed
and worker count make the same input give the same plan.

After solving, counts become concrete devices (:func:`_place_devices`: one
stage's devices of one type on as few nodes as possible) and integer shares
(each device ``<= q[s,k]``, summing to ``b``). The cost of one stage, shared by
the model, :func:`brute_force` and the heuristic, is :meth:`_Problem.stage_cost`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ortools.sat.python import cp_model

from cost_models.cluster import Cluster
from cost_models.comm import allreduce_time_s, p2p_time_s
from cost_models.devices import DeviceType
from cost_models.memory import STATIC_BYTES_PER_PARAM_BYTE, stage_memory_bytes
from cost_models.roofline import block_time_s
from hetcompile.errors import UserError
from hetcompile.ir import ModelCosts

logger = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b")
# CP-SAT needs integer costs. Nanoseconds: a 100 us stage rounded to whole
# microseconds would be off by 1%, and a 1e4 s step x 1e3 micro-batches
# (1e16 ns) stays far from int64 overflow.
TIME_UNITS_PER_S = 1_000_000_000
# The ring all-reduce factor (n-1)/n in integer permille.
_PERMILLE = 1000
# Every stage count up to this is solved; beyond it, a ladder of ~25% steps.
FULL_STAGE_LADDER = 12
# Micro-batch counts tried when the caller leaves them to the planner.
MAX_MICROBATCHES = 512
# Deterministic-time budget (CP-SAT's machine-independent work units, about a
# second each) per stage-count model: enough to improve the hint and prove
# small instances optimal, and it keeps 1,024 devices x 96 layers in seconds.
DETERMINISTIC_TIME_PER_MODEL = 0.5
# CP-SAT models solved per plan, best-screened (micro-batch count, schedule, stage count)
# first, until either cap is reached; the others keep their analytic bound
# (_Problem.lower_bound_units) in the gap. Counting variables, not seconds, keeps the
# search deterministic: small models are cheap and many get solved, 1,024-device
# models cost ~2,000 variables each and a handful get solved.
MAX_SOLVED_MODELS = 24
MAX_SOLVED_VARIABLES = 12_000
# A block with no FLOPs and no bytes would make a device's time zero.
_MIN_SAMPLE_UNITS = 1


@dataclass(frozen=True)
class StageDecision:
    first_block: int  # inclusive
    last_block: int  # inclusive; stages are contiguous and in order
    devices: tuple[int, ...]  # Cluster device indices, data parallel inside the stage
    shares: tuple[int, ...]  # samples of each micro-batch each device handles (>= 1, sum = micro-batch size)
    recompute: bool = False  # rebuild activations in backward (keeps one micro-batch's activations)
    tp: int = 1  # tensor-parallel degree: devices[i*tp:(i+1)*tp] are replica i's TP group (equal shares)
    tp_parts: tuple[int, ...] = ()  # relative shard sizes of a TP group's members, e.g. (3, 1); () = even


@dataclass(frozen=True)
class PlanDecision:
    stages: tuple[StageDecision, ...]
    num_microbatches: int
    microbatch_size: int
    schedule: str = "1f1b"  # the pipeline schedule the plan was chosen for


@dataclass(frozen=True)
class SolverReport:
    status: str  # "OPTIMAL" (proven over the search space) or "FEASIBLE"
    gap: float  # (objective - best_bound) / objective; 0 when optimal
    objective_s: float
    best_bound_s: float
    wall_s: float
    num_variables: int


@dataclass(frozen=True)
class _Stage:
    """One stage as the model sees it: blocks first..last, per type a device count and a max share."""

    first_block: int
    last_block: int
    counts: tuple[int, ...]  # per type, in Cluster.device_types order
    shares: tuple[int, ...]  # per type: the most samples of a micro-batch one device takes (0 if unused)
    recompute: bool = False


@dataclass(frozen=True)
class _Choice:
    """A whole candidate plan for fixed M, schedule and S: its stages and integer objective."""

    stages: tuple[_Stage, ...]
    objective_units: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _prefix(values: Sequence[float], scale: float, ceil: bool = False) -> list[int]:
    """Integer prefix sums of ``values * scale``: rounding the running sum keeps every interval exact."""
    out, acc = [0], 0.0
    for v in values:
        acc += v * scale
        out.append(int(math.ceil(acc - 1e-9)) if ceil else round(acc))
    return out


def stage_ladder(limit: int) -> list[int]:
    """Stage counts tried: all up to FULL_STAGE_LADDER, then steps of about 25%, and ``limit`` itself.

    >>> stage_ladder(40)
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 19, 24, 30, 38, 40]
    """
    out = list(range(1, min(limit, FULL_STAGE_LADDER) + 1))
    s = FULL_STAGE_LADDER
    while True:
        s = max(s + 1, round(s * 1.25))
        if s >= limit:
            break
        out.append(s)
    if limit > FULL_STAGE_LADDER:
        out.append(limit)
    return out


class _Problem:
    """Validated inputs for one (micro-batch count, schedule) and the integer cost arrays."""

    def __init__(self, costs: ModelCosts, cluster: Cluster, num_microbatches: int, schedule: str,
                 allow_recompute: bool = False):
        if schedule not in SCHEDULES:
            raise UserError(f"Unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} or 'auto'.")
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise UserError(f"num_microbatches is {num_microbatches!r}; it must be a positive integer "
                            "(or None to let the planner choose).")
        if costs.num_blocks == 0:
            raise UserError("The model has no blocks to place; check that capture found the layers.")
        if costs.global_batch % num_microbatches:
            divisors = [m for m in range(1, costs.global_batch + 1) if costs.global_batch % m == 0]
            raise UserError(
                f"The global batch {costs.global_batch} is not divisible by num_microbatches={num_microbatches}. "
                f"Pick a number of micro-batches that divides it ({', '.join(map(str, divisors[:12]))}"
                f"{', ...' if len(divisors) > 12 else ''}), pass None to let the planner choose, or change the batch."
            )
        self.costs = costs
        self.cluster = cluster
        self.schedule = schedule
        self.allow_recompute = allow_recompute
        self.num_microbatches = num_microbatches
        self.microbatch_size = b = costs.global_batch // num_microbatches
        self.types: tuple[DeviceType, ...] = cluster.device_types
        self.available = tuple(cluster.count_of(t.name) for t in self.types)
        self.node_max = tuple(max(n.count for n in cluster.nodes if n.device == t.name) for t in self.types)
        self.type_index = {t.name: k for k, t in enumerate(self.types)}
        blocks = costs.blocks
        nb = len(blocks)
        self.time_prefix, self.rc_prefix = [], []
        for t in self.types:
            per = [block_time_s(block, t, costs.dtype) for block in blocks]
            self.time_prefix.append(_prefix([f + bw for f, bw in per], TIME_UNITS_PER_S))
            self.rc_prefix.append(_prefix([2 * f + bw for f, bw in per], TIME_UNITS_PER_S))
        self.param_prefix = list(itertools.accumulate((blk.param_bytes for blk in blocks), initial=0))
        self.act_prefix = _prefix([blk.act_bytes_per_sample for blk in blocks], 1.0, ceil=True)
        self.in_bytes = [0] + [int(math.ceil(blk.out_bytes_per_sample)) for blk in blocks[:-1]] + [0]
        inter_bw, inter_lat = cluster.inter_node_bw_bytes_per_s, cluster.inter_node_latency_s
        # Pipeline traffic always priced at the inter-node link: neighbouring stages usually
        # sit on other nodes or types, and it keeps a stage's cost independent of its neighbours.
        # send[p]: one micro-batch's activations across cut p, one direction (the gradients go back
        # the other way on a full-duplex link, concurrently).
        self.send = [0] * (nb + 1)
        for p in range(1, nb):
            self.send[p] = round(p2p_time_s(b * blocks[p - 1].out_bytes_per_sample, inter_bw, inter_lat)
                                 * TIME_UNITS_PER_S)
        # Link classes of a stage's all-reduce: 0 = inter-node, 1 + k = inside one node of type k.
        self.link_bw = [inter_bw] + [min(n.intra_node_GBps for n in cluster.nodes if n.device == t.name) * 1e9
                                     for t in self.types]
        self.link_lat_units = [round(inter_lat * TIME_UNITS_PER_S)] + [
            round(cluster.intra_node_latency_s * TIME_UNITS_PER_S)] * len(self.types)
        self.ar_prefix = [_prefix([2 * blk.param_bytes / bw for blk in blocks], TIME_UNITS_PER_S)
                          for bw in self.link_bw]
        self.ring_factor = [0] + [round(_PERMILLE * (n - 1) / n) for n in range(1, b + 1)]
        self._max_share: dict[tuple, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.costs.num_blocks

    def max_stages(self, max_stages: int | None) -> int:
        limit = min(self.num_blocks, self.cluster.num_devices)
        if max_stages is not None:
            if not isinstance(max_stages, int) or max_stages < 1:
                raise UserError(f"max_stages is {max_stages!r}; it must be a positive integer or None.")
            limit = min(limit, max_stages)
        return limit

    def in_flight(self, num_stages: int, stage: int) -> int:
        """Micro-batches whose activations a stage holds at its peak."""
        if self.schedule == "gpipe":
            return self.num_microbatches
        return min(self.num_microbatches, num_stages - stage)

    def sample_units(self, k: int, first: int, last: int, recompute: bool = False) -> int:
        prefix = self.rc_prefix[k] if recompute else self.time_prefix[k]
        return max(prefix[last + 1] - prefix[first], _MIN_SAMPLE_UNITS)

    def param_bytes(self, first: int, last: int) -> int:
        return self.param_prefix[last + 1] - self.param_prefix[first]

    def memory_bytes(self, num_stages: int, s: int, first: int, last: int, share: int, recompute: bool) -> int:
        return stage_memory_bytes(self.param_bytes(first, last), self.act_prefix[last + 1] - self.act_prefix[first],
                                  self.in_bytes[first], share, self.in_flight(num_stages, s), recompute)

    def max_share(self, k: int, num_stages: int, s: int, first: int, last: int, recompute: bool) -> int:
        """The most samples per micro-batch a type-k device holds in memory there (0 if not even one)."""
        key = (k, self.in_flight(num_stages, s), first, last, recompute)
        if key not in self._max_share:
            self._max_share[key] = self._max_share_search(k, num_stages, s, first, last, recompute)
        return self._max_share[key]

    def _max_share_search(self, k, num_stages, s, first, last, recompute) -> int:
        lo, hi = 0, self.microbatch_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.memory_bytes(num_stages, s, first, last, mid, recompute) <= self.types[k].mem_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def link_class(self, counts: Sequence[int]) -> int:
        used = [k for k, c in enumerate(counts) if c]
        if len(used) == 1 and counts[used[0]] <= self.node_max[used[0]]:
            return 1 + used[0]
        return 0

    def allreduce_units(self, first: int, last: int, counts: Sequence[int]) -> int:
        n = sum(counts)
        c = self.link_class(counts)
        volume = self.ar_prefix[c][last + 1] - self.ar_prefix[c][first]
        return _ceil_div(self.ring_factor[n] * volume, _PERMILLE) + 2 * (n - 1) * self.link_lat_units[c]

    def stage_cost(self, num_stages: int, s: int, st: _Stage) -> tuple[int, int] | None:
        """(C, AR) of one stage in time units (compute per micro-batch, all-reduce), or None when it is not a valid stage (shares, memory).

        The one cost function: the CP-SAT model encodes exactly these formulas.
        """
        b, n = self.microbatch_size, sum(st.counts)
        if not 1 <= n <= b or sum(c * q for c, q in zip(st.counts, st.shares)) < b:
            return None
        compute = 0
        for k, (c, q) in enumerate(zip(st.counts, st.shares)):
            if (c > 0) != (q > 0):
                return None
            if c == 0:
                continue
            mem = self.memory_bytes(num_stages, s, st.first_block, st.last_block, q, st.recompute)
            if mem > self.types[k].mem_bytes:
                return None
            compute = max(compute, q * self.sample_units(k, st.first_block, st.last_block, st.recompute))
        return compute, self.allreduce_units(st.first_block, st.last_block, st.counts)

    def objective_units(self, stages: Sequence[_Stage]) -> int | None:
        """sum C + 2 sum_cuts send + (M - 1) max(max C, max send) + max AR, or None when a stage
        is invalid or devices run out."""
        for k, available in enumerate(self.available):
            if sum(st.counts[k] for st in stages) > available:
                return None
        costs = [self.stage_cost(len(stages), s, st) for s, st in enumerate(stages)]
        if any(c is None for c in costs):
            return None
        times = [c[0] for c in costs]
        sends = [self.send[st.first_block] for st in stages[1:]]
        bottleneck = max(times + sends + self.cycle_floors(times, sends))
        return sum(times) + 2 * sum(sends) + (self.num_microbatches - 1) * bottleneck + max(c[1] for c in costs)

    def cycle_floors(self, times: Sequence[int], sends: Sequence[int]) -> list[int]:
        """1F1B only: stage s holds at most S - s micro-batches, so its period is at least the round
        trip through stages s..S-1 and back (computes and both-way sends) over S - s."""
        if self.schedule != "1f1b":
            return []
        num_stages = len(times)
        return [_ceil_div(sum(times[s:]) + 2 * sum(sends[s:]), num_stages - s) for s in range(num_stages - 1)]

    def min_bottleneck_units(self) -> int:
        """A lower bound on any stage-time bottleneck: the micro-batch's work spread over every device
        at the best speed ratio any block allows (valid however blocks are split)."""
        nb, ref = self.num_blocks, 0
        total_ref = self.sample_units(ref, 0, nb - 1)
        speed = 0.0
        for k, available in enumerate(self.available):
            ratios = [(self.time_prefix[ref][p + 1] - self.time_prefix[ref][p])
                      / max(self.time_prefix[k][p + 1] - self.time_prefix[k][p], _MIN_SAMPLE_UNITS)
                      for p in range(nb)]
            speed += available * max(ratios)
        return int(self.microbatch_size * total_ref / speed) if speed > 0 else 0

    def lower_bound_units(self, num_stages: int) -> int:
        """Any plan with S stages costs at least M z_min (the compute sum and the M - 1 bottlenecks
        are each >= z_min) plus 2 (S - 1) times the cheapest cut's transfer."""
        nb = self.num_blocks
        cheapest_send = min(self.send[1:nb]) if nb > 1 else 0
        return self.num_microbatches * self.min_bottleneck_units() + 2 * (num_stages - 1) * cheapest_send

    def no_fit_error(self, max_stages: int) -> UserError:
        total_params = self.param_bytes(0, self.num_blocks - 1)
        static = STATIC_BYTES_PER_PARAM_BYTE * total_params
        largest = max(self.types, key=lambda t: t.mem_bytes)
        return UserError(
            f"The model fits on no plan for this cluster: it has {total_params / 1e9:.3g} GB of parameters "
            f"({static / 1e9:.3g} GB with gradients and Adam state, before activations), and the largest "
            f"device ({largest.name}) has {largest.mem_GB:g} GB. No split into at most {max_stages} pipeline "
            f"stage(s) with micro-batches of {self.microbatch_size} sample(s) fits every device"
            f"{'' if not self.allow_recompute else ', even with activation recompute'}. Fixes: add "
            "devices (more stages give each device fewer layers), use more micro-batches or a smaller global "
            "batch (less activation memory per device)"
            + (", or the 1f1b schedule (fewer micro-batches in flight)." if self.schedule == "gpipe" else ".")
        )


# ---------------------------------------------------------------- heuristic plans


def _best_shares(problem: _Problem, num_stages: int, s: int, first: int, last: int, counts: Sequence[int],
                 recompute: bool) -> _Stage | None:
    """Integer shares minimising the stage's compute time for these device counts (None if infeasible).

    The bottleneck z is the least value at which the devices' capacities
    ``sum_k n_k min(qmax_k, floor(z / t_k))`` cover the micro-batch; types that
    take no sample at z are dropped, and devices beyond b are trimmed slowest first.
    """
    b, nt = problem.microbatch_size, len(problem.types)
    counts = list(counts)
    times = [problem.sample_units(k, first, last, recompute) for k in range(nt)]
    caps = [problem.max_share(k, num_stages, s, first, last, recompute) if counts[k] else 0 for k in range(nt)]
    counts = [c if cap > 0 else 0 for c, cap in zip(counts, caps)]
    for k in sorted(range(nt), key=lambda k: (-times[k], k)):  # at most b devices: drop the slowest
        excess = sum(counts) - b
        if excess > 0:
            counts[k] -= min(excess, counts[k])
    if sum(c * cap for c, cap in zip(counts, caps)) < b:
        return None

    def capacity(z: int) -> int:
        return sum(c * min(cap, z // t) for c, cap, t in zip(counts, caps, times))

    lo, hi = 0, max(cap * t for c, cap, t in zip(counts, caps, times) if c)
    while lo < hi:
        mid = (lo + hi) // 2
        if capacity(mid) >= b:
            hi = mid
        else:
            lo = mid + 1
    shares = [min(cap, lo // t) if c else 0 for c, cap, t in zip(counts, caps, times)]
    counts = [c if q > 0 else 0 for c, q in zip(counts, shares)]
    return _Stage(first, last, tuple(counts), tuple(shares), recompute)


def _split_blocks(problem: _Problem, weights: Sequence[float]) -> list[tuple[int, int]] | None:
    """Contiguous block intervals whose reference time is proportional to ``weights`` (>= 1 block each)."""
    nb, num_stages = problem.num_blocks, len(weights)
    if num_stages > nb:
        return None
    prefix = problem.time_prefix[0]
    total, target, bounds, start = prefix[nb], 0.0, [], 0
    for s in range(num_stages):
        if s == num_stages - 1:
            end = nb - 1
        else:
            target += total * weights[s] / sum(weights)
            end = start
            # Extend while the next block's midpoint is still under the target.
            while end < nb - (num_stages - s) and (prefix[end + 1] + prefix[end + 2]) / 2 <= target:
                end += 1
        bounds.append((start, end))
        start = end + 1
    return bounds


def _build(problem: _Problem, counts_per_stage: Sequence[Sequence[int]], recompute: bool) -> _Choice | None:
    """Blocks split in proportion to each stage's device speed (then rebalanced twice on the
    resulting stage times), or, when memory rules that out, to its smallest device memory."""
    nb = problem.num_blocks
    speeds = [sum(c / problem.sample_units(k, 0, nb - 1) for k, c in enumerate(counts)) for counts in counts_per_stage]
    if min(speeds) <= 0:
        return None
    best = _build_from(problem, counts_per_stage, recompute, speeds, rounds=3)
    if best is None:
        memories = [min(problem.types[k].mem_bytes for k, c in enumerate(counts) if c) for counts in counts_per_stage]
        best = _build_from(problem, counts_per_stage, recompute, memories, rounds=1)
    return best


def _build_from(problem, counts_per_stage, recompute, weights, rounds: int) -> _Choice | None:
    num_stages = len(counts_per_stage)
    best: _Choice | None = None
    for _ in range(rounds):
        bounds = _split_blocks(problem, weights)
        if bounds is None:
            return None
        stages = []
        for s, ((i, j), counts) in enumerate(zip(bounds, counts_per_stage)):
            st = _best_shares(problem, num_stages, s, i, j, counts, recompute)
            if st is None:
                break
            stages.append(st)
        else:
            objective = problem.objective_units(stages)
            if objective is not None and (best is None or objective < best.objective_units):
                best = _Choice(tuple(stages), objective)
        # Rebalance: a stage's new weight is its blocks' reference time over its current time.
        if len(stages) < num_stages:
            break
        prefix = problem.time_prefix[0]
        costs = [problem.stage_cost(num_stages, s, st) for s, st in enumerate(stages)]
        if any(c is None for c in costs):
            break
        weights = [(prefix[st.last_block + 1] - prefix[st.first_block]) / max(c[0], 1) for st, c in zip(stages, costs)]
    return best


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (s < total % parts) for s in range(parts)]


def _heuristic(problem: _Problem, num_stages: int, recompute: bool) -> _Choice | None:
    """The best of a few constructive plans for S stages (hint for CP-SAT, screening, and the floor).

    - mixed: every stage gets ~1/S of every type's devices;
    - type-pure: each type gets stages in proportion to its total speed;
    - one type alone, each type in turn (so the fastest-type-only plan is always a candidate);
    - the even split a homogeneous trainer would run (:func:`_even_layout`).
    """
    nt, b = len(problem.types), problem.microbatch_size
    layouts: list[list[list[int]]] = []
    per_type = [_spread(n, num_stages) for n in problem.available]
    layouts.append([[per_type[k][s] for k in range(nt)] for s in range(num_stages)])
    for k in range(nt):
        only = [[0] * nt for _ in range(num_stages)]
        for s, c in enumerate(_spread(problem.available[k], num_stages)):
            only[s][k] = c
        layouts.append(only)
    if nt > 1 and num_stages >= nt:
        nb = problem.num_blocks
        speed = [n / problem.sample_units(k, 0, nb - 1) for k, n in enumerate(problem.available)]
        # Stages per type in proportion to speed (largest remainder, >= 1 each); big-memory types first,
        # since early 1F1B stages hold the most micro-batches.
        quota = [num_stages * v / sum(speed) for v in speed]
        alloc = [max(1, math.floor(x)) for x in quota]
        while sum(alloc) > num_stages:
            alloc[max(range(nt), key=lambda k: (alloc[k] - quota[k], k))] -= 1
        while sum(alloc) < num_stages:
            alloc[max(range(nt), key=lambda k: (quota[k] - alloc[k], -k))] += 1
        if min(alloc) >= 1 and all(problem.available[k] >= alloc[k] for k in range(nt)):
            order = sorted(range(nt), key=lambda k: (-problem.types[k].mem_bytes, k))
            pure = []
            for k in order:
                for c in _spread(problem.available[k], alloc[k]):
                    row = [0] * nt
                    row[k] = c
                    pure.append(row)
            layouts.append(pure)
    best = _even_layout(problem, num_stages, recompute)
    for layout in layouts:
        if any(sum(row) == 0 for row in layout):
            continue
        layout = [[min(c, b) for c in row] for row in layout]
        choice = _build(problem, layout, recompute)
        if choice is not None and (best is None or choice.objective_units < best.objective_units):
            best = choice
    return best


def _even_layout(problem: _Problem, num_stages: int, recompute: bool) -> _Choice | None:
    """What a homogeneous trainer would run (equal blocks per stage, consecutive devices per stage),
    with the best shares for those devices: so the plan is never worse than the even-split baseline."""
    nb, b = problem.num_blocks, problem.microbatch_size
    devices = problem.cluster.devices
    per_stage = len(devices) // num_stages
    if per_stage == 0:
        return None
    stages = []
    for s in range(num_stages):
        counts = [0] * len(problem.types)
        for d in devices[s * per_stage:(s + 1) * per_stage][:b]:
            counts[problem.type_index[d.type]] += 1
        first, last = s * nb // num_stages, (s + 1) * nb // num_stages - 1
        st = _best_shares(problem, num_stages, s, first, last, counts, recompute)
        if st is None:
            return None
        stages.append(st)
    objective = problem.objective_units(stages)
    return None if objective is None else _Choice(tuple(stages), objective)


# ---------------------------------------------------------------- the CP-SAT model


class _StageModel:
    """The CP-SAT model for a fixed number of stages (see the module docstring)."""

    def __init__(self, problem: _Problem, num_stages: int):
        self.problem = p = problem
        self.num_stages = S = num_stages
        self.model = cp_model.CpModel()
        nb, nt, b = p.num_blocks, len(p.types), p.microbatch_size
        self._elements: dict[tuple[str, int], cp_model.IntVar | int] = {}
        self.cut = [0] + [self.model.new_int_var(s, nb - S + s, f"cut_{s}") for s in range(1, S)] + [nb]
        self.n, self.q, self.used = {}, {}, {}
        for s in range(S):
            for k in range(nt):
                top = min(p.available[k], b)
                self.n[s, k] = self.model.new_int_var(0, top, f"n_s{s}_k{k}")
                self.q[s, k] = self.model.new_int_var(0, b, f"q_s{s}_k{k}")
                self.used[s, k] = self.model.new_bool_var(f"used_s{s}_k{k}")
        self.rc = {s: (self.model.new_bool_var(f"rc_s{s}") if p.allow_recompute else None) for s in range(S)}
        max_time = max(b * max(max(pre[-1], rc[-1], _MIN_SAMPLE_UNITS) for pre, rc in zip(p.time_prefix, p.rc_prefix)),
                       max(p.send))
        self.C = [self.model.new_int_var(0, max_time, f"C_s{s}") for s in range(S)]
        self.send = [self._at("X", p.send, s) for s in range(1, S)]
        max_ar = max(pre[-1] for pre in p.ar_prefix) + 2 * b * max(p.link_lat_units)
        self.AR = [self.model.new_int_var(0, max_ar, f"AR_s{s}") for s in range(S)]
        self.z = self.model.new_int_var(0, max_time, "z_bottleneck_stage")
        self.w = self.model.new_int_var(0, max_ar, "w_slowest_allreduce")
        self.add_contiguous_stages()
        self.add_shares()
        self.add_device_counts()
        self.add_stage_times()
        self.add_memory()
        self.add_allreduce()
        self.add_bottlenecks()
        self.set_objective()

    def _at(self, name: str, array: Sequence[int], s: int):
        """``array[cut[s]]`` as a constant or an element-constrained variable (cached)."""
        cut = self.cut[s]
        if isinstance(cut, int):
            return array[cut]
        key = (name, s)
        if key not in self._elements:
            var = self.model.new_int_var(min(array), max(array), f"{name}_at_cut{s}")
            self.model.add_element(cut, list(array), var)
            self._elements[key] = var
        return self._elements[key]

    def _interval(self, name: str, array: Sequence[int], s: int):
        return self._at(name, array, s + 1) - self._at(name, array, s)

    def add_contiguous_stages(self) -> None:
        """cut[s] + 1 <= cut[s+1]: every stage runs at least one block, in order."""
        for s in range(self.num_stages):
            self.model.add(self.cut[s] + 1 <= self.cut[s + 1])

    def add_shares(self) -> None:
        """sum_k n[s,k] q[s,k] >= b, 1 <= sum_k n[s,k] <= b, and n[s,k] >= 1 <=> q[s,k] >= 1 <=> used[s,k]."""
        b, nt = self.problem.microbatch_size, len(self.problem.types)
        self.nq = {}
        for s in range(self.num_stages):
            for k in range(nt):
                n, q, used = self.n[s, k], self.q[s, k], self.used[s, k]
                self.model.add(n >= 1).only_enforce_if(used)
                self.model.add(q >= 1).only_enforce_if(used)
                self.model.add(n == 0).only_enforce_if(~used)
                self.model.add(q == 0).only_enforce_if(~used)
                self.nq[s, k] = self.model.new_int_var(0, b * min(self.problem.available[k], b), f"nq_s{s}_k{k}")
                self.model.add_multiplication_equality(self.nq[s, k], [n, q])
            self.model.add(sum(self.nq[s, k] for k in range(nt)) >= b)
            self.model.add(sum(self.n[s, k] for k in range(nt)) >= 1)
            self.model.add(sum(self.n[s, k] for k in range(nt)) <= b)

    def add_device_counts(self) -> None:
        """sum_s n[s,k] <= N_k for every device type k (devices may stay idle)."""
        for k, available in enumerate(self.problem.available):
            self.model.add(sum(self.n[s, k] for s in range(self.num_stages)) <= available)

    def add_stage_times(self) -> None:
        """C[s] >= q[s,k] t[s,k], t from Tk, or Rk when rc[s]."""
        p, b = self.problem, self.problem.microbatch_size
        for s in range(self.num_stages):
            for k in range(len(p.types)):
                # A model whose costs round to zero time units still needs a non-empty domain.
                hi = max(p.time_prefix[k][-1], p.rc_prefix[k][-1], _MIN_SAMPLE_UNITS)
                t = self.model.new_int_var(_MIN_SAMPLE_UNITS, hi, f"t_s{s}_k{k}")
                plain = self._interval(f"T{k}", p.time_prefix[k], s)
                rc = self.rc[s]
                if rc is None:
                    self.model.add(t >= plain)
                else:
                    self.model.add(t >= plain).only_enforce_if(~rc)
                    self.model.add(t >= self._interval(f"R{k}", p.rc_prefix[k], s)).only_enforce_if(rc)
                compute = self.model.new_int_var(0, b * hi, f"compute_s{s}_k{k}")
                self.model.add_multiplication_equality(compute, [self.q[s, k], t])
                self.model.add(self.C[s] >= compute)

    def add_memory(self) -> None:
        """When used[s,k]: (2 + adam) P(s) + q[s,k] a[s] <= mem_k, with a[s] = f_s A(s), or
        f_s I[cut[s]] + A(s) when rc[s] (cost_models.memory.stage_memory_bytes)."""
        p, b = self.problem, self.problem.microbatch_size
        for s in range(self.num_stages):
            f = p.in_flight(self.num_stages, s)
            acts = self._interval("A", p.act_prefix, s)
            hi = f * (p.act_prefix[-1] + max(p.in_bytes))
            per_sample = self.model.new_int_var(0, hi, f"act_per_sample_s{s}")
            rc = self.rc[s]
            if rc is None:
                self.model.add(per_sample == f * acts)
            else:
                self.model.add(per_sample == f * acts).only_enforce_if(~rc)
                self.model.add(per_sample == f * self._at("I", p.in_bytes, s) + acts).only_enforce_if(rc)
            params = self._interval("P", p.param_prefix, s)
            for k, t in enumerate(p.types):
                act_mem = self.model.new_int_var(0, b * hi, f"act_mem_s{s}_k{k}")
                self.model.add_multiplication_equality(act_mem, [self.q[s, k], per_sample])
                static = int(STATIC_BYTES_PER_PARAM_BYTE) * params
                self.model.add(static + act_mem <= t.mem_bytes).only_enforce_if(self.used[s, k])

    def add_allreduce(self) -> None:
        """cls[s, 1+k] only if the stage is type k alone within one node; then
        AR[s] >= ceil(F(n_s) Wc(s) / 1000) + 2 (n_s - 1) lat_c for the chosen class c."""
        p, nt, b = self.problem, len(self.problem.types), self.problem.microbatch_size
        for s in range(self.num_stages):
            cls = [self.model.new_bool_var(f"cls_s{s}_c{c}") for c in range(nt + 1)]
            self.model.add_exactly_one(cls)
            for k in range(nt):
                self.model.add(self.n[s, k] <= p.node_max[k]).only_enforce_if(cls[1 + k])
                for other in range(nt):
                    if other != k:
                        self.model.add(self.n[s, other] == 0).only_enforce_if(cls[1 + k])
            n_total = self.model.new_int_var(1, b, f"ntotal_s{s}")
            self.model.add(n_total == sum(self.n[s, k] for k in range(nt)))
            factor = self.model.new_int_var(0, _PERMILLE, f"ring_factor_s{s}")
            self.model.add_element(n_total, p.ring_factor, factor)
            volume_hi = max(pre[-1] for pre in p.ar_prefix)
            volume = self.model.new_int_var(0, volume_hi, f"ar_volume_s{s}")
            for c in range(nt + 1):
                self.model.add(volume == self._interval(f"W{c}", p.ar_prefix[c], s)).only_enforce_if(cls[c])
            scaled = self.model.new_int_var(0, _PERMILLE * volume_hi, f"ar_scaled_s{s}")
            self.model.add_multiplication_equality(scaled, [factor, volume])
            for c in range(nt + 1):
                latency = 2 * p.link_lat_units[c] * _PERMILLE
                self.model.add(_PERMILLE * self.AR[s] >= scaled + latency * (n_total - 1)).only_enforce_if(cls[c])

    def add_bottlenecks(self) -> None:
        """z >= C[s], z >= X[cut[s]], w >= AR[s]; valid cut z >= z_min (every device busy on its
        share of the work: at an optimum z is the largest of the C and X)."""
        for s in range(self.num_stages):
            self.model.add(self.z >= self.C[s])
            self.model.add(self.w >= self.AR[s])
        for send in self.send:
            self.model.add(self.z >= send)
        if self.problem.schedule == "1f1b":
            # NOTE: [1F1B round trip] stage s keeps at most S - s micro-batches in flight, so a
            # micro-batch's trip to the last stage and back bounds its period (_Problem.cycle_floors).
            for s in range(self.num_stages - 1):
                trip = sum(self.C[s:]) + 2 * sum(self.send[s:])
                self.model.add((self.num_stages - s) * self.z >= trip)
        self.model.add(self.z >= self.problem.min_bottleneck_units())

    def set_objective(self) -> None:
        """minimise sum_s C[s] + 2 sum_{s>0} X[cut[s]] + (M - 1) z + w."""
        self.objective = (sum(self.C) + 2 * sum(self.send) + (self.problem.num_microbatches - 1) * self.z
                          + self.w)
        self.model.minimize(self.objective)

    def add_incumbent_cutoff(self, best_units: int) -> None:
        """objective <= best - 1: only a strictly better plan matters, and the cutoff
        lets the solver prove "no better plan with this many stages" from bounds alone."""
        self.model.add(self.objective <= best_units - 1)

    def add_hint(self, choice: _Choice) -> None:
        p = self.problem
        for s, st in enumerate(choice.stages):
            if s > 0:
                self.model.add_hint(self.cut[s], st.first_block)
            for k in range(len(p.types)):
                self.model.add_hint(self.n[s, k], st.counts[k])
                self.model.add_hint(self.q[s, k], st.shares[k])
                self.model.add_hint(self.used[s, k], st.counts[k] > 0)
            if self.rc[s] is not None:
                self.model.add_hint(self.rc[s], st.recompute)
            cost = p.stage_cost(self.num_stages, s, st)
            self.model.add_hint(self.C[s], cost[0])
            self.model.add_hint(self.AR[s], cost[1])
        costs = [p.stage_cost(self.num_stages, s, st) for s, st in enumerate(choice.stages)]
        times = [c[0] for c in costs]
        sends = [p.send[st.first_block] for st in choice.stages[1:]]
        self.model.add_hint(self.z, max(times + sends + p.cycle_floors(times, sends)))
        self.model.add_hint(self.w, max(c[1] for c in costs))

    def solve(self, deterministic_time: float, wall_limit_s: float, seed: int, num_workers: int,
              on_progress: Callable[[float, float], None] | None):
        """(status name, choice or None, bound units or None)."""
        solver = cp_model.CpSolver()
        # The deterministic limit makes the result independent of machine load; the wall
        # limit is only a safety net for the caller's time_limit_s.
        solver.parameters.max_deterministic_time = deterministic_time
        solver.parameters.max_time_in_seconds = max(wall_limit_s, 0.05)
        solver.parameters.random_seed = seed
        solver.parameters.num_workers = num_workers
        callback = _ProgressCallback(on_progress) if on_progress is not None else None
        status = solver.solve(self.model, callback)
        if status == cp_model.MODEL_INVALID:
            raise AssertionError(f"planner built an invalid CP-SAT model: {self.model.validate()}")
        if status == cp_model.INFEASIBLE:
            return "INFEASIBLE", None, None
        if status == cp_model.UNKNOWN:
            return "UNKNOWN", None, round(solver.best_objective_bound)
        assert status in (cp_model.OPTIMAL, cp_model.FEASIBLE), solver.status_name(status)
        p, nt = self.problem, len(self.problem.types)
        stages = []
        for s in range(self.num_stages):
            first, end = solver.value(self.cut[s]), solver.value(self.cut[s + 1])
            counts = tuple(solver.value(self.n[s, k]) for k in range(nt))
            shares = tuple(solver.value(self.q[s, k]) for k in range(nt))
            rc = bool(solver.value(self.rc[s])) if self.rc[s] is not None else False
            stages.append(_Stage(first, end - 1, counts, shares, rc))
        # C, z and w are only bounded below, so a non-optimal solution may overstate them.
        objective = p.objective_units(stages)
        assert objective is not None, "the model admitted a plan the cost function rejects"
        return solver.status_name(status), _Choice(tuple(stages), objective), round(solver.best_objective_bound)

    @property
    def num_variables(self) -> int:
        return len(self.model.proto.variables)


class _ProgressCallback(cp_model.CpSolverSolutionCallback):
    """Reports (incumbent objective_s, best bound_s) at every improving solution."""

    def __init__(self, on_progress: Callable[[float, float], None]):
        super().__init__()
        self._on_progress = on_progress

    def on_solution_callback(self) -> None:
        self._on_progress(self.objective_value / TIME_UNITS_PER_S, self.best_objective_bound / TIME_UNITS_PER_S)


# ---------------------------------------------------------------- from counts to devices


def _place_devices(problem: _Problem, stages: Sequence[_Stage]) -> list[tuple[int, ...]]:
    """Concrete device indices per stage: each (stage, type) request goes, largest
    first, to the node of that type with the fewest free devices that still holds
    it whole (best fit), else across the nodes with the most free devices, so a
    stage's devices of one type span as few nodes as possible."""
    cluster = problem.cluster
    free: dict[int, list[int]] = {n: [] for n in range(len(cluster.nodes))}
    for d in cluster.devices:
        free[d.node].append(d.index)
    requests = sorted(
        ((st.counts[k], s, k) for s, st in enumerate(stages) for k in range(len(problem.types)) if st.counts[k]),
        key=lambda r: (-r[0], r[1], r[2]),
    )
    placed: list[list[int]] = [[] for _ in stages]
    for n, s, k in requests:
        name = problem.types[k].name
        nodes = [i for i, node in enumerate(cluster.nodes) if node.device == name]
        whole = [i for i in nodes if len(free[i]) >= n]
        if whole:
            order = [min(whole, key=lambda i: (len(free[i]), i))]
        else:
            order = sorted(nodes, key=lambda i: (-len(free[i]), i))
        need = n
        for i in order:
            take = free[i][:need]
            free[i] = free[i][len(take):]
            placed[s].extend(take)
            need -= len(take)
            if need == 0:
                break
        assert need == 0, "device counts were checked by the model"
    return [tuple(sorted(p)) for p in placed]


def _device_shares(caps: Sequence[int], unit_times: Sequence[int], total: int) -> tuple[int, ...]:
    """Integer shares, each in 1..cap, summing to ``total``: start at the caps and take samples
    back, one at a time, from the device that would finish last (ties: the later device).

    >>> _device_shares([3, 3, 1, 1], [1, 1, 3, 3], 7)
    (3, 2, 1, 1)
    """
    shares = list(caps)
    assert sum(shares) >= total >= len(shares)
    while sum(shares) > total:
        d = max((d for d in range(len(shares)) if shares[d] > 1),
                key=lambda d: (shares[d] * unit_times[d], d))
        shares[d] -= 1
    return tuple(shares)


def _to_decision(problem: _Problem, choice: _Choice) -> PlanDecision:
    devices_per_stage = _place_devices(problem, choice.stages)
    kinds = {d.index: problem.type_index[d.type] for d in problem.cluster.devices}
    stages = []
    for st, devices in zip(choice.stages, devices_per_stage):
        caps = [st.shares[kinds[d]] for d in devices]
        times = [problem.sample_units(kinds[d], st.first_block, st.last_block, st.recompute) for d in devices]
        shares = _device_shares(caps, times, problem.microbatch_size)
        stages.append(StageDecision(st.first_block, st.last_block, devices, shares, st.recompute))
    return PlanDecision(tuple(stages), problem.num_microbatches, problem.microbatch_size, problem.schedule)


# ---------------------------------------------------------------- the search


def _microbatch_options(global_batch: int, num_microbatches: int | None) -> list[int]:
    if num_microbatches is not None:
        return [num_microbatches]
    divisors = [m for m in range(1, min(global_batch, MAX_MICROBATCHES) + 1) if global_batch % m == 0]
    # Keep the search in seconds: divisors at least ~1.8x apart (1, 2, 4, 8, ... or 1, 3, 8, 24, ...).
    picked, last = [], 0.0
    for m in divisors:
        if not picked or math.log(m) - last >= math.log(1.8) or m == divisors[-1]:
            picked.append(m)
            last = math.log(m)
    return picked


def _screen(problem: _Problem, limit: int) -> dict[int, _Choice]:
    """Heuristic plan per stage count on the ladder (only those that fit)."""
    out = {}
    for num_stages in stage_ladder(limit):
        choice = _heuristic(problem, num_stages, recompute=False)
        if problem.allow_recompute:
            with_rc = _heuristic(problem, num_stages, recompute=True)
            if with_rc is not None and (choice is None or with_rc.objective_units < choice.objective_units):
                choice = with_rc
        if choice is not None:
            out[num_stages] = choice
    return out


def solve(
    costs: ModelCosts,
    cluster: Cluster,
    *,
    num_microbatches: int | None = None,
    schedule: str = "1f1b",
    max_stages: int | None = None,
    time_limit_s: float = 30.0,
    seed: int = 0,
    num_workers: int = 1,
    allow_recompute: bool | None = None,
    on_progress: Callable[[float, float], None] | None = None,
) -> tuple[PlanDecision, SolverReport]:
    """Choose stages, device groups, batch shares, recompute, micro-batch count and schedule
    minimising the predicted step time.

    ``num_microbatches=None`` lets the planner choose among the divisors of the
    global batch (up to MAX_MICROBATCHES); ``schedule="auto"`` chooses between
    GPipe and 1F1B. ``allow_recompute=None`` (default) turns recompute on only
    when no plan fits without it. ``on_progress(objective_s, bound_s)`` is
    called at every improving CP-SAT solution. With a fixed ``seed`` and
    ``num_workers`` the same input gives the same plan (deterministic limits).

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = tuple(Block(i, f"h.{i}", 1e12, 1e6, 1000, 250, 1e3, 1e3) for i in range(2))
    >>> cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}]})
    >>> decision, report = solve(ModelCosts(blocks, 8, "bf16"), cluster, num_microbatches=2)
    >>> [(s.first_block, s.last_block, s.devices, s.shares) for s in decision.stages], report.status
    ([(0, 1, (0, 1), (2, 2))], 'OPTIMAL')
    """
    start = time.perf_counter()
    schedules = SCHEDULES if schedule == "auto" else (schedule,)
    recompute_options = [False, True] if allow_recompute is None else [bool(allow_recompute)]
    result = None
    for allow_rc in recompute_options:
        problems = [_Problem(costs, cluster, m, sched, allow_rc)
                    for m in _microbatch_options(costs.global_batch, num_microbatches) for sched in schedules]
        limit = problems[0].max_stages(max_stages)
        screened = [(problem, _screen(problem, limit)) for problem in problems]
        if not allow_rc and allow_recompute is None and limit > FULL_STAGE_LADDER and not any(
                per_s for _, per_s in screened):
            continue  # a large instance where no heuristic plan fits: go straight to recompute
        result = _solve_best(screened, limit, start, time_limit_s, seed, num_workers, on_progress)
        if result is not None:
            break
    if result is None:
        raise problems[0].no_fit_error(limit)
    problem, choice, all_optimal, bound, num_variables = result
    objective = choice.objective_units
    bound = min(bound, objective)
    gap = 0.0 if all_optimal or objective == 0 else (objective - bound) / objective
    all_optimal = all_optimal or gap == 0.0  # the bound over every pair met the incumbent: proven
    report = SolverReport(
        status="OPTIMAL" if all_optimal else "FEASIBLE",
        gap=gap,
        objective_s=objective / TIME_UNITS_PER_S,
        best_bound_s=(objective if all_optimal else bound) / TIME_UNITS_PER_S,
        wall_s=time.perf_counter() - start,
        num_variables=num_variables,
    )
    logger.info("plan: M=%d %s S=%d objective=%.6f s gap=%.4f (%s)", problem.num_microbatches, problem.schedule,
                len(choice.stages), report.objective_s, gap, report.status)
    return _to_decision(problem, choice), report


def _solve_best(screened, limit, start, time_limit_s, seed, num_workers, on_progress):
    """CP-SAT per (micro-batch count, schedule, stage count), best-screened first; None when nothing fits.

    Every pair either gets a CP-SAT model (hinted with its heuristic plan, cut off at the
    incumbent), or is proven no better by its analytic bound, or, past MAX_SOLVED_MODELS,
    keeps that bound in the gap. Returns (problem, choice, proven optimal, bound units, variables).
    """
    ladder = stage_ladder(limit)
    pairs = [(problem, s, per_s.get(s)) for problem, per_s in screened for s in ladder]
    pairs.sort(key=lambda x: x[2].objective_units if x[2] is not None else math.inf)  # stable: input order on ties
    best: tuple[_Problem, _Choice] | None = None
    for problem, _, hint in pairs:
        if hint is not None and (best is None or hint.objective_units < best[1].objective_units):
            best = (problem, hint)
    if best is not None and on_progress is not None:
        # The heuristic incumbent and the analytic bound, before (and even without) any CP-SAT solution.
        floor = min(problem.lower_bound_units(s) for problem, s, _ in pairs)
        on_progress(best[1].objective_units / TIME_UNITS_PER_S, min(floor, best[1].objective_units) / TIME_UNITS_PER_S)
    # Proven optimal only when every stage count was covered (the ladder is complete).
    all_optimal = len(ladder) == limit
    bounds, num_variables, solved = [], 0, 0
    deadline = start + time_limit_s
    for i, (problem, num_stages, hint) in enumerate(pairs):
        floor = problem.lower_bound_units(num_stages)
        incumbent = best[1].objective_units if best is not None else None
        if incumbent is not None and floor >= incumbent:
            bounds.append(incumbent)  # proven: no such plan beats the incumbent
            continue
        if solved >= MAX_SOLVED_MODELS or num_variables >= MAX_SOLVED_VARIABLES:
            bounds.append(floor)
            all_optimal = False
            continue
        solved += 1
        stage_model = _StageModel(problem, num_stages)
        num_variables += stage_model.num_variables
        if incumbent is not None:
            stage_model.add_incumbent_cutoff(incumbent)
            if hint is not None and hint.objective_units >= incumbent:
                hint = None  # it violates the cutoff
        if hint is not None:
            stage_model.add_hint(hint)
        wall_left_s = (deadline - time.perf_counter()) / max(1, min(len(pairs) - i, MAX_SOLVED_MODELS - solved + 1))
        status, choice, bound = stage_model.solve(DETERMINISTIC_TIME_PER_MODEL, wall_left_s, seed, num_workers,
                                                  on_progress)
        logger.debug("M=%d %s S=%d: %s objective=%s bound=%s vars=%d", problem.num_microbatches, problem.schedule,
                     num_stages, status, choice and choice.objective_units, bound, stage_model.num_variables)
        if status == "INFEASIBLE":
            bounds.append(incumbent if incumbent is not None else math.inf)
            continue
        if status != "OPTIMAL":
            all_optimal = False
        bounds.append(max(bound or 0, floor))
        if choice is not None and (best is None or choice.objective_units < best[1].objective_units):
            best = (problem, choice)
    if best is None:
        return None
    bound = min(bounds) if bounds else best[1].objective_units
    return best[0], best[1], all_optimal, bound, num_variables


# ---------------------------------------------------------------- evaluation and tests


def step_time_s(decision: PlanDecision, costs: ModelCosts, cluster: Cluster, schedule: str) -> float:
    """Predicted step seconds of a decision: the model's objective, evaluated with the
    decision's integer shares (a stage takes as long as its slowest device,
    ``max_d share_d * t_k(d)``) and ring all-reduces over the actual devices' links.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = (Block(0, "h.0", 1e12, 0.0, 0, 0, 0.0, 0.0),)
    >>> cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 1}]})
    >>> one = PlanDecision((StageDecision(0, 0, (0,), (4,)),), num_microbatches=2, microbatch_size=4)
    >>> round(step_time_s(one, ModelCosts(blocks, 8, "bf16"), cluster, "1f1b"), 6)  # 8 samples x 3 x 6.41 ms
    0.153846
    """
    problem = _Problem(costs, cluster, decision.num_microbatches, schedule)
    kinds = {d.index: problem.type_index[d.type] for d in cluster.devices}
    stage_times, allreduce_times = [], []
    for st in decision.stages:
        compute_units = max(share * problem.sample_units(kinds[d], st.first_block, st.last_block, st.recompute)
                            for d, share in zip(st.devices, st.shares))
        stage_times.append(compute_units / TIME_UNITS_PER_S)
        allreduce_times.append(allreduce_time_s(problem.param_bytes(st.first_block, st.last_block), cluster, st.devices))
    sends = [problem.send[st.first_block] / TIME_UNITS_PER_S for st in decision.stages[1:]]
    return (sum(stage_times) + 2 * sum(sends) + (decision.num_microbatches - 1) * max(stage_times + sends)
            + max(allreduce_times))


def brute_force(
    costs: ModelCosts,
    cluster: Cluster,
    *,
    num_microbatches: int,
    schedule: str,
    max_stages: int | None = None,
    allow_recompute: bool = False,
) -> tuple[PlanDecision, float]:
    """Exhaustive search over the model's own variables and costs, for tests on tiny instances.

    Returns the best decision and its objective in seconds (the same integer
    cost the CP-SAT model minimises, so the two optima are equal exactly).
    """
    problem = _Problem(costs, cluster, num_microbatches, schedule, allow_recompute)
    limit = problem.max_stages(max_stages)
    nb, nt, b = problem.num_blocks, len(problem.types), problem.microbatch_size
    count_options = [range(min(problem.available[k], b) + 1) for k in range(nt)]
    rc_options = (False, True) if allow_recompute else (False,)
    best: _Choice | None = None
    for num_stages in range(1, limit + 1):
        for cuts in itertools.combinations(range(1, nb), num_stages - 1):
            edges = (0,) + cuts + (nb,)
            options = []
            for s in range(num_stages):
                first, last = edges[s], edges[s + 1] - 1
                valid = []
                # For fixed counts only the stage time depends on the shares, and the objective
                # grows with it: keep the fastest valid shares per (counts, recompute).
                for counts in itertools.product(*count_options):
                    share_options = [range(1, b + 1) if c else (0,) for c in counts]
                    for rc in rc_options:
                        fastest = None
                        for shares in itertools.product(*share_options):
                            st = _Stage(first, last, counts, shares, rc)
                            cost = problem.stage_cost(num_stages, s, st)
                            if cost is not None and (fastest is None or cost[0] < fastest[0]):
                                fastest = (cost[0], st)
                        if fastest is not None:
                            valid.append(fastest[1])
                options.append(valid)
            for stages in itertools.product(*options):
                objective = problem.objective_units(stages)
                if objective is not None and (best is None or objective < best.objective_units):
                    best = _Choice(tuple(stages), objective)
    if best is None:
        raise problem.no_fit_error(limit)
    return _to_decision(problem, best), best.objective_units / TIME_UNITS_PER_S
