"""The planner: pipeline stages, device groups and batch shares from an ILP (OR-Tools CP-SAT).

Plain data in (:class:`~hetcompile.ir.ModelCosts`, :class:`~cost_models.cluster.Cluster`),
a :class:`PlanDecision` out. Predictions (times) stay in the :class:`SolverReport`.

Formulation
===========

Notation. Blocks ``0..B-1`` in order; device types ``k`` with ``N_k`` devices;
``M`` micro-batches of ``b = global_batch / M`` samples; ``S`` pipeline stages.
The planner solves one CP-SAT model per ``S = 1..min(max_stages, B, #devices)``
and keeps the best (ties go to fewer stages).

Candidates. For stage position ``s`` a candidate is a contiguous block interval
``[i, j]`` and a device group ``g = (n_k)_k`` (``n_k`` devices of type ``k``;
types may mix). Groups enumerate every ``n_k in 0..N_k`` when ``N_k <= 16``,
otherwise only ``0``, the powers of two and ``N_k`` (a cap that keeps big
clusters tractable; finer groups are a later issue), with ``1 <= sum n_k <= b``
so that every device gets at least one sample. Per candidate, precomputed by
:meth:`_Problem.candidate` (the one cost function the ILP, :func:`brute_force`
and the memory filter share):

- ``t_k(i, j)``: per-sample forward+backward roofline time of the interval on type ``k``;
- ``T = b / sum_k (n_k / t_k)  +  P2P``: the micro-batch split across the group in
  proportion to speed (a type-``k`` device takes ``q_k = b / t_k / sum(n/t)`` samples),
  plus ``P2P = 2 * p2p(b * out_bytes)`` for each of the input and output cuts
  (activations forward, their gradients backward), always priced at the
  inter-node bandwidth and latency: neighbouring stages usually sit on other
  nodes or other device types, and it keeps the cost independent of the neighbour;
- ``AR``: ring all-reduce of the interval's parameter bytes over the group, at
  the intra-node bandwidth when the group is one type and fits in one node of
  that type, else at the inter-node bandwidth.

Memory is a filter, not a constraint: a candidate is dropped when a type-``k``
device of the group would exceed its memory,
``device_memory_bytes(P(i,j), A(i,j), ceil(q_k) * in_flight(s)) > mem_k``, with
``in_flight(s) = M`` for GPipe and ``min(M, S - s)`` for 1F1B. ``ceil(q_k)``
bounds the integer share each device finally gets.

Variables.
    ``x[s, i, j, g]`` in {0, 1}: stage ``s`` runs blocks ``i..j`` on group ``g``.
    ``z >= 0``: the bottleneck stage time.  ``w >= 0``: the slowest all-reduce.

Objective (integer units of 1/TIME_UNITS_PER_S seconds)::

    minimise  sum_s T_s  +  (M - 1) * z  +  w
    where T_s = sum_c T_c x[s, c]  and  AR_s = sum_c AR_c x[s, c]

i.e. fill-and-drain of one micro-batch through every stage, then the other
``M - 1`` micro-batches at the pace of the slowest stage, then the gradient
all-reduces (which run concurrently across stages, so the slowest one counts).

Constraints (method that adds them):

- one candidate per stage, ``sum_c x[s, c] = 1``                      (:meth:`_StageModel.add_one_candidate_per_stage`)
- contiguous tiling: stage 0 starts at block 0, the last stage ends at
  block B-1, and ``sum_{c ends at p-1} x[s, c] = sum_{c starts at p} x[s+1, c]``
  for every cut ``p``                                                  (:meth:`_StageModel.add_contiguous_tiling`)
- devices per type: ``sum_{s,c} n_k(c) x[s, c] <= N_k`` (idle devices allowed)
                                                                       (:meth:`_StageModel.add_device_counts`)
- bottlenecks: ``z >= T_s`` and ``w >= AR_s`` for every ``s``           (:meth:`_StageModel.add_bottlenecks`)

After solving, group counts become concrete devices (:func:`_place_devices`:
one stage's devices of one type on as few nodes as possible) and integer
shares proportional to speed by largest remainder, each >= 1
(:func:`_integer_shares`). :func:`step_time_s` re-evaluates a decision with
those integer shares and the actual links; the ILP works with the continuous
shares above.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

from ortools.sat.python import cp_model

from cost_models.cluster import Cluster
from cost_models.comm import allreduce_time_s, p2p_time_s, ring_allreduce_time_s
from cost_models.devices import DeviceType
from cost_models.memory import device_memory_bytes
from cost_models.roofline import block_time_s
from hetcompile.errors import UserError
from hetcompile.ir import ModelCosts

logger = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b")
# CP-SAT needs integer costs. Nanoseconds: a 100 us stage rounded to whole
# microseconds would be off by 1%, and even a 1e4 s step x 1e3 micro-batches
# (1e16 ns) stays far from int64 overflow.
TIME_UNITS_PER_S = 1_000_000_000
# Per device type, every group size 0..N_k is tried up to this many devices;
# beyond it only powers of two and N_k (keeps big clusters tractable).
MAX_FULL_GROUP_COUNT = 16
# A block with no FLOPs and no bytes would make a group's speed infinite.
_MIN_SAMPLE_TIME_S = 1e-15


@dataclass(frozen=True)
class StageDecision:
    first_block: int  # inclusive
    last_block: int  # inclusive; stages are contiguous and in order
    devices: tuple[int, ...]  # Cluster device indices, data parallel inside the stage
    shares: tuple[int, ...]  # samples of each micro-batch each device handles (>= 1, sum = micro-batch size)


@dataclass(frozen=True)
class PlanDecision:
    stages: tuple[StageDecision, ...]
    num_microbatches: int
    microbatch_size: int


@dataclass(frozen=True)
class SolverReport:
    status: str  # "OPTIMAL" or "FEASIBLE"
    gap: float  # (objective - best_bound) / objective; 0 when optimal
    objective_s: float
    best_bound_s: float
    wall_s: float
    num_variables: int


@dataclass(frozen=True)
class _Candidate:
    """Stage ``stage`` of ``num_stages`` runs blocks ``first..last`` on ``counts[k]`` devices of type k."""

    stage: int
    first_block: int
    last_block: int
    counts: tuple[int, ...]  # per type, in Cluster.device_types order
    time_units: int  # T: per-micro-batch fwd+bwd compute plus p2p
    allreduce_units: int  # AR


def _group_sizes(available: int) -> list[int]:
    if available <= MAX_FULL_GROUP_COUNT:
        return list(range(available + 1))
    sizes = {0, available}
    p = 1
    while p <= available:
        sizes.add(p)
        p *= 2
    return sorted(sizes)


class _Problem:
    """Validated inputs and the per-candidate cost function shared by the ILP and brute force."""

    def __init__(self, costs: ModelCosts, cluster: Cluster, num_microbatches: int, schedule: str):
        if schedule not in SCHEDULES:
            raise UserError(f"Unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise UserError(f"num_microbatches is {num_microbatches!r}; it must be a positive integer.")
        if costs.num_blocks == 0:
            raise UserError("The model has no blocks to place; check that capture found the layers.")
        if costs.global_batch % num_microbatches:
            divisors = [m for m in range(1, costs.global_batch + 1) if costs.global_batch % m == 0]
            raise UserError(
                f"The global batch {costs.global_batch} is not divisible by num_microbatches={num_microbatches}. "
                f"Pick a number of micro-batches that divides it ({', '.join(map(str, divisors[:12]))}"
                f"{', ...' if len(divisors) > 12 else ''}) or change the batch."
            )
        self.costs = costs
        self.cluster = cluster
        self.schedule = schedule
        self.num_microbatches = num_microbatches
        self.microbatch_size = costs.global_batch // num_microbatches
        self.types: tuple[DeviceType, ...] = cluster.device_types
        self.available = tuple(cluster.count_of(t.name) for t in self.types)
        self.type_index = {t.name: k for k, t in enumerate(self.types)}

        blocks = costs.blocks
        # Prefix sums so an interval's totals are O(1).
        self._time_prefix = []
        for t in self.types:
            acc = [0.0]
            for block in blocks:
                fwd_s, bwd_s = block_time_s(block, t, costs.dtype)
                acc.append(acc[-1] + fwd_s + bwd_s)
            self._time_prefix.append(acc)
        self._param_prefix = list(itertools.accumulate((b.param_bytes for b in blocks), initial=0))
        self._act_prefix = list(itertools.accumulate((b.act_bytes_per_sample for b in blocks), initial=0.0))

        self.groups = [
            g
            for g in itertools.product(*(_group_sizes(n) for n in self.available))
            if 1 <= sum(g) <= self.microbatch_size
        ]
        self._cache: dict[tuple, _Candidate | None] = {}

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

    def sample_time_s(self, k: int, first: int, last: int) -> float:
        """Per-sample forward+backward seconds of blocks first..last on type k."""
        return max(self._time_prefix[k][last + 1] - self._time_prefix[k][first], _MIN_SAMPLE_TIME_S)

    def param_bytes(self, first: int, last: int) -> int:
        return self._param_prefix[last + 1] - self._param_prefix[first]

    def act_bytes_per_sample(self, first: int, last: int) -> float:
        return self._act_prefix[last + 1] - self._act_prefix[first]

    def in_flight(self, num_stages: int, stage: int) -> int:
        """Micro-batches whose activations a stage holds at its peak."""
        if self.schedule == "gpipe":
            return self.num_microbatches
        return min(self.num_microbatches, num_stages - stage)

    def p2p_s(self, first: int, last: int) -> float:
        """Activations in and out of the interval (forward) and their gradients (backward)."""
        blocks, b = self.costs.blocks, self.microbatch_size
        bw, lat = self.cluster.inter_node_bw_bytes_per_s, self.cluster.inter_node_latency_s
        total = 0.0
        if first > 0:
            total += 2 * p2p_time_s(b * blocks[first - 1].out_bytes_per_sample, bw, lat)
        if last < self.num_blocks - 1:
            total += 2 * p2p_time_s(b * blocks[last].out_bytes_per_sample, bw, lat)
        return total

    def group_allreduce_s(self, counts: tuple[int, ...], num_bytes: float) -> float:
        n = sum(counts)
        used = [k for k, c in enumerate(counts) if c]
        bw, lat = self.cluster.inter_node_bw_bytes_per_s, self.cluster.inter_node_latency_s
        if len(used) == 1:
            name = self.types[used[0]].name
            fitting = [node.intra_node_GBps for node in self.cluster.nodes if node.device == name and node.count >= n]
            if fitting:
                bw, lat = min(fitting) * 1e9, self.cluster.intra_node_latency_s
        return ring_allreduce_time_s(num_bytes, n, bw, lat)

    def candidate(self, num_stages: int, stage: int, first: int, last: int, counts: tuple[int, ...]) -> _Candidate | None:
        """The cost of one candidate, or None when a device of the group runs out of memory."""
        key = (num_stages, stage, first, last, counts)
        if key not in self._cache:
            self._cache[key] = self._candidate_cost(num_stages, stage, first, last, counts)
        return self._cache[key]

    def _candidate_cost(self, num_stages, stage, first, last, counts) -> _Candidate | None:
        b = self.microbatch_size
        times = [self.sample_time_s(k, first, last) for k in range(len(self.types))]
        rate_per_s = sum(n / t for n, t in zip(counts, times))
        params = self.param_bytes(first, last)
        acts = self.act_bytes_per_sample(first, last)
        in_flight = self.in_flight(num_stages, stage)
        for k, n in enumerate(counts):
            if n == 0:
                continue
            quota = b / times[k] / rate_per_s
            # ceil(quota) bounds the largest-remainder integer share; the epsilon
            # keeps 3.0000000001 from rounding up to 4.
            share = max(1, math.ceil(quota - 1e-9))
            if device_memory_bytes(params, acts, share * in_flight) > self.types[k].mem_bytes:
                return None
        time_s = b / rate_per_s + self.p2p_s(first, last)
        allreduce_s = self.group_allreduce_s(counts, params)
        return _Candidate(
            stage, first, last, counts,
            time_units=round(time_s * TIME_UNITS_PER_S),
            allreduce_units=round(allreduce_s * TIME_UNITS_PER_S),
        )

    def candidates(self, num_stages: int) -> list[list[_Candidate]]:
        """Per stage, every candidate that fits in memory, in a fixed order."""
        nb, out = self.num_blocks, []
        for s in range(num_stages):
            # Every stage needs at least one block, so stage s starts at block >= s
            # and leaves one block for each later stage. Stage 0 starts at block 0
            # and the last stage ends at the last block (tiling, see add_contiguous_tiling).
            firsts = [0] if s == 0 else range(s, nb - (num_stages - s) + 1)
            per_stage = []
            for i in firsts:
                lasts = [nb - 1] if s == num_stages - 1 else range(i, nb - (num_stages - s) + 1)
                for j in lasts:
                    for g in self.groups:
                        c = self.candidate(num_stages, s, i, j, g)
                        if c is not None:
                            per_stage.append(c)
            out.append(per_stage)
        return out

    def prune(self, candidates: list[list[_Candidate]], cutoff_units: int | None) -> list[list[_Candidate]]:
        """Drop candidates that no tiling, or no plan cheaper than ``cutoff_units``, can use.

        Exact (it never drops part of such a plan), repeated to a fixed point:

        - reachability: stage s on [i, j] needs a stage s-1 candidate ending at
          i-1 and a stage s+1 candidate starting at j+1;
        - bound: a plan using c at stage s costs at least
          ``M * T_c + AR_c + sum_{s' != s} min T_{s'}`` (c's time counts in the
          fill-and-drain sum and in z, its all-reduce in w).

        The ILP is the same without it; pruning only makes it smaller, which is
        what lets CP-SAT prove quickly that more stages do not beat fewer.
        """
        m = self.num_microbatches
        while True:
            before = sum(map(len, candidates))
            ends = [{c.last_block for c in per_stage} for per_stage in candidates]
            starts = [{c.first_block for c in per_stage} for per_stage in candidates]
            last = len(candidates) - 1
            candidates = [
                [c for c in per_stage
                 if (s == 0 or c.first_block - 1 in ends[s - 1]) and (s == last or c.last_block + 1 in starts[s + 1])]
                for s, per_stage in enumerate(candidates)
            ]
            if cutoff_units is not None and all(candidates):
                min_times = [min(c.time_units for c in per_stage) for per_stage in candidates]
                total_min = sum(min_times)
                candidates = [
                    [c for c in per_stage
                     if m * c.time_units + c.allreduce_units + total_min - min_times[s] < cutoff_units]
                    for s, per_stage in enumerate(candidates)
                ]
            if not all(candidates) or sum(map(len, candidates)) == before:
                return candidates

    def lower_bound_units(self, candidates: list[list[_Candidate]]) -> int:
        """Every stage costs at least its cheapest candidate: a bound that holds
        even when the solver stops before proving one."""
        min_times = [min(c.time_units for c in per_stage) for per_stage in candidates]
        min_allreduce = max(min(c.allreduce_units for c in per_stage) for per_stage in candidates)
        return sum(min_times) + (self.num_microbatches - 1) * max(min_times) + min_allreduce

    def objective_units(self, choice: Sequence[_Candidate]) -> int:
        times = [c.time_units for c in choice]
        return sum(times) + (self.num_microbatches - 1) * max(times) + max(c.allreduce_units for c in choice)

    def no_fit_error(self, max_stages: int) -> UserError:
        total_params = self.param_bytes(0, self.num_blocks - 1)
        static = device_memory_bytes(total_params, 0, 0)
        largest = max(self.types, key=lambda t: t.mem_bytes)
        return UserError(
            f"The model fits on no plan for this cluster: it has {total_params / 1e9:.3g} GB of parameters "
            f"({static / 1e9:.3g} GB with gradients and Adam state, before activations), and the largest "
            f"device ({largest.name}) has {largest.mem_GB:g} GB. No split into at most {max_stages} pipeline "
            f"stage(s) with micro-batches of {self.microbatch_size} sample(s) fits every device. Fixes: add "
            "devices (more stages give each device fewer layers), use more micro-batches or a smaller global "
            "batch (less activation memory per device)"
            + (", or the 1f1b schedule (fewer micro-batches in flight)." if self.schedule == "gpipe" else ".")
        )


def _greedy_choice(problem: _Problem, num_stages: int, candidates: list[list[_Candidate]]) -> list[_Candidate] | None:
    """A quick feasible guess for the solver: blocks split by equal time, devices split evenly.

    With one stage this is plain data parallelism over every device. Returns None
    when the guess is not a candidate (out of memory, or too many devices for b).
    """
    nb = problem.num_blocks
    total = problem.sample_time_s(0, 0, nb - 1)
    bounds, start = [], 0
    for s in range(num_stages):
        if s == num_stages - 1:
            end = nb - 1
        else:
            target = total * (s + 1) / num_stages
            end = start
            while end < nb - (num_stages - s) and problem.sample_time_s(0, 0, end) < target:
                end += 1
        bounds.append((start, end))
        start = end + 1
    choice = []
    for s, (i, j) in enumerate(bounds):
        counts = tuple(n // num_stages + (s < n % num_stages) for n in problem.available)
        c = next((c for c in candidates[s] if (c.first_block, c.last_block, c.counts) == (i, j, counts)), None)
        if c is None:
            return None
        choice.append(c)
    return choice


class _StageModel:
    """The CP-SAT model for a fixed number of stages."""

    def __init__(self, problem: _Problem, num_stages: int, candidates: list[list[_Candidate]]):
        self.problem = problem
        self.num_stages = num_stages
        self.candidates = candidates
        self.model = cp_model.CpModel()
        self.x: dict[tuple[int, int, int, tuple[int, ...]], cp_model.IntVar] = {}
        for s, per_stage in enumerate(candidates):
            for c in per_stage:
                g = "_".join(map(str, c.counts))
                self.x[s, c.first_block, c.last_block, c.counts] = self.model.new_bool_var(
                    f"x_s{s}_b{c.first_block}_{c.last_block}_g{g}"
                )
        max_time = max(c.time_units for per_stage in candidates for c in per_stage)
        max_ar = max(c.allreduce_units for per_stage in candidates for c in per_stage)
        self.z = self.model.new_int_var(0, max_time, "z_bottleneck_stage")
        self.w = self.model.new_int_var(0, max_ar, "w_slowest_allreduce")
        self.add_one_candidate_per_stage()
        self.add_contiguous_tiling()
        self.add_device_counts()
        self.add_bottlenecks()
        self.set_objective()

    def _var(self, c: _Candidate) -> cp_model.IntVar:
        return self.x[c.stage, c.first_block, c.last_block, c.counts]

    def add_one_candidate_per_stage(self) -> None:
        """sum_c x[s, c] = 1 for every stage s."""
        for per_stage in self.candidates:
            self.model.add_exactly_one(self._var(c) for c in per_stage)

    def add_contiguous_tiling(self) -> None:
        """Stage s+1 starts where stage s ends: for every cut p,
        sum_{c of s ending at p-1} x = sum_{c of s+1 starting at p} x.

        Stage 0 starting at block 0 and the last stage ending at the last block
        are imposed on the candidates' domains (see _Problem.candidates).
        """
        for s in range(self.num_stages - 1):
            for p in range(1, self.problem.num_blocks):
                ends = [self._var(c) for c in self.candidates[s] if c.last_block == p - 1]
                starts = [self._var(c) for c in self.candidates[s + 1] if c.first_block == p]
                if ends or starts:
                    self.model.add(sum(ends) == sum(starts))

    def add_device_counts(self) -> None:
        """sum_{s,c} n_k(c) x[s, c] <= N_k for every device type k (devices may stay idle)."""
        for k, available in enumerate(self.problem.available):
            used = [c.counts[k] * self._var(c) for per_stage in self.candidates for c in per_stage if c.counts[k]]
            if used:
                self.model.add(sum(used) <= available)

    def add_bottlenecks(self) -> None:
        """z >= T_s and w >= AR_s for every stage s."""
        for per_stage in self.candidates:
            self.model.add(self.z >= sum(c.time_units * self._var(c) for c in per_stage))
            self.model.add(self.w >= sum(c.allreduce_units * self._var(c) for c in per_stage))

    def set_objective(self) -> None:
        """minimise sum_s T_s + (M - 1) z + w."""
        fill_drain = sum(c.time_units * self._var(c) for per_stage in self.candidates for c in per_stage)
        self.objective = fill_drain + (self.problem.num_microbatches - 1) * self.z + self.w
        self.model.minimize(self.objective)

    def add_incumbent_cutoff(self, best_units: int) -> None:
        """objective <= best - 1: only a plan strictly better than one with fewer stages
        matters, and the cutoff lets the solver prove "no better plan" from bounds alone."""
        self.model.add(self.objective <= best_units - 1)

    def add_hint(self, choice: Sequence[_Candidate]) -> None:
        chosen = {(c.stage, c.first_block, c.last_block, c.counts) for c in choice}
        for key, var in self.x.items():
            self.model.add_hint(var, key in chosen)
        times = [c.time_units for c in choice]
        self.model.add_hint(self.z, max(times))
        self.model.add_hint(self.w, max(c.allreduce_units for c in choice))

    def solve(self, time_limit_s: float, seed: int, num_workers: int):
        """(status name, chosen candidates or None, objective units or None, bound units or None)."""
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
        solver.parameters.random_seed = seed
        solver.parameters.num_workers = num_workers
        status = solver.solve(self.model)
        if status == cp_model.MODEL_INVALID:
            raise AssertionError(f"planner built an invalid CP-SAT model: {self.model.validate()}")
        if status == cp_model.INFEASIBLE:
            return "INFEASIBLE", None, None, None
        if status == cp_model.UNKNOWN:
            return "UNKNOWN", None, None, round(solver.best_objective_bound)
        assert status in (cp_model.OPTIMAL, cp_model.FEASIBLE), solver.status_name(status)
        choice = []
        for per_stage in self.candidates:
            picked = [c for c in per_stage if solver.boolean_value(self._var(c))]
            assert len(picked) == 1, picked
            choice.append(picked[0])
        objective = round(solver.objective_value)
        # z and w are only bounded below, so a non-optimal solution may overstate them.
        objective = self.problem.objective_units(choice)
        return solver.status_name(status), choice, objective, round(solver.best_objective_bound)

    @property
    def num_variables(self) -> int:
        return len(self.model.proto.variables)


def _place_devices(problem: _Problem, choice: Sequence[_Candidate]) -> list[tuple[int, ...]]:
    """Concrete device indices per stage: each (stage, type) request goes, largest
    first, to the node of that type with the fewest free devices that still holds
    it whole (best fit), else across the nodes with the most free devices, so a
    stage's devices of one type span as few nodes as possible."""
    cluster = problem.cluster
    free: dict[int, list[int]] = {n: [] for n in range(len(cluster.nodes))}
    for d in cluster.devices:
        free[d.node].append(d.index)
    requests = sorted(
        ((c.counts[k], s, k) for s, c in enumerate(choice) for k in range(len(problem.types)) if c.counts[k]),
        key=lambda r: (-r[0], r[1], r[2]),
    )
    placed: list[list[int]] = [[] for _ in choice]
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
        assert need == 0, "device counts were checked by the ILP"
    return [tuple(sorted(p)) for p in placed]


def _integer_shares(quotas: Sequence[float], total: int) -> tuple[int, ...]:
    """Integers >= 1 summing to ``total``, each floor or ceil of its quota (largest remainder).

    >>> _integer_shares([6.4, 1.6], 8)
    (6, 2)
    >>> _integer_shares([7.7, 0.3], 8)
    (7, 1)
    """
    assert len(quotas) <= total
    shares = [max(1, math.floor(q)) for q in quotas]
    remaining = total - sum(shares)
    # Give the leftover samples to the largest remainders (ties: lower position).
    order = sorted(range(len(quotas)), key=lambda d: (-(quotas[d] - math.floor(quotas[d])), d))
    for d in order:
        if remaining <= 0:
            break
        if shares[d] == math.floor(quotas[d]):
            shares[d] += 1
            remaining -= 1
    # Raising shares to 1 may overshoot; take back from the largest shares.
    while remaining < 0:
        d = max(range(len(shares)), key=lambda d: (shares[d] - quotas[d], shares[d], -d))
        assert shares[d] > 1
        shares[d] -= 1
        remaining += 1
    assert remaining == 0, (quotas, total, shares)
    return tuple(shares)


def _to_decision(problem: _Problem, choice: Sequence[_Candidate]) -> PlanDecision:
    devices_per_stage = _place_devices(problem, choice)
    kinds = {d.index: problem.type_index[d.type] for d in problem.cluster.devices}
    stages = []
    for c, devices in zip(choice, devices_per_stage):
        speeds = [1.0 / problem.sample_time_s(kinds[d], c.first_block, c.last_block) for d in devices]
        quotas = [problem.microbatch_size * v / sum(speeds) for v in speeds]
        stages.append(StageDecision(c.first_block, c.last_block, devices, _integer_shares(quotas, problem.microbatch_size)))
    return PlanDecision(tuple(stages), problem.num_microbatches, problem.microbatch_size)


def solve(
    costs: ModelCosts,
    cluster: Cluster,
    *,
    num_microbatches: int,
    schedule: str = "1f1b",
    max_stages: int | None = None,
    time_limit_s: float = 30.0,
    seed: int = 0,
    num_workers: int = 1,
) -> tuple[PlanDecision, SolverReport]:
    """Choose stages, device groups and batch shares minimising the predicted step time.

    The time limit is shared by the per-stage-count models (time one leaves over
    goes to the next). With a fixed ``seed`` and ``num_workers`` the same input
    gives the same plan whenever the solver proves optimality within the limit.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = tuple(Block(i, f"h.{i}", 1e12, 1e6, 1000, 250, 1e3, 1e3) for i in range(2))
    >>> cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}]})
    >>> decision, report = solve(ModelCosts(blocks, 8, "bf16"), cluster, num_microbatches=2)
    >>> [(s.first_block, s.last_block, s.devices, s.shares) for s in decision.stages], report.status
    ([(0, 1, (0, 1), (2, 2))], 'OPTIMAL')
    """
    start = time.perf_counter()
    problem = _Problem(costs, cluster, num_microbatches, schedule)
    limit = problem.max_stages(max_stages)
    deadline = start + time_limit_s
    best: tuple[int, list[_Candidate]] | None = None
    bounds: list[int] = []
    all_optimal = True
    num_variables = 0
    for num_stages in range(1, limit + 1):
        candidates = problem.candidates(num_stages)
        if any(not per_stage for per_stage in candidates):
            logger.debug("S=%d: some stage has no candidate that fits in memory", num_stages)
            continue
        candidates = problem.prune(candidates, best[0] if best is not None else None)
        if any(not per_stage for per_stage in candidates):
            logger.debug("S=%d: no plan beats the incumbent %s", num_stages, best and best[0])
            continue
        stage_model = _StageModel(problem, num_stages, candidates)
        num_variables += stage_model.num_variables
        hint = _greedy_choice(problem, num_stages, candidates)
        if best is not None:
            stage_model.add_incumbent_cutoff(best[0])
            if hint is not None and problem.objective_units(hint) >= best[0]:
                hint = None  # it violates the cutoff
        if hint is not None:
            stage_model.add_hint(hint)
        remaining_s = (deadline - time.perf_counter()) / (limit - num_stages + 1)
        status, choice, objective, bound = stage_model.solve(remaining_s, seed, num_workers)
        logger.info("S=%d: %s objective=%s bound=%s vars=%d", num_stages, status, objective, bound,
                    stage_model.num_variables)
        if status == "INFEASIBLE":
            continue  # no plan with this many stages, or none better than the incumbent
        if status != "OPTIMAL":
            all_optimal = False
        bounds.append(max(bound, problem.lower_bound_units(candidates)))
        if choice is not None and (best is None or objective < best[0]):
            best = (objective, choice)
    if best is None:
        if bounds:
            raise UserError(
                f"The planner found no plan within time_limit_s={time_limit_s:g} s. "
                "Give it more time (--time-limit) or limit the stages (max_stages)."
            )
        raise problem.no_fit_error(limit)
    objective, choice = best
    best_bound = min(bounds + [objective])
    gap = 0.0 if all_optimal or objective == 0 else (objective - best_bound) / objective
    report = SolverReport(
        status="OPTIMAL" if all_optimal else "FEASIBLE",
        gap=gap,
        objective_s=objective / TIME_UNITS_PER_S,
        best_bound_s=(objective if all_optimal else best_bound) / TIME_UNITS_PER_S,
        wall_s=time.perf_counter() - start,
        num_variables=num_variables,
    )
    return _to_decision(problem, choice), report


def step_time_s(decision: PlanDecision, costs: ModelCosts, cluster: Cluster, schedule: str) -> float:
    """Predicted step seconds of a decision: the ILP's objective, evaluated with the
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
        compute_s = max(
            share * problem.sample_time_s(kinds[d], st.first_block, st.last_block)
            for d, share in zip(st.devices, st.shares)
        )
        stage_times.append(compute_s + problem.p2p_s(st.first_block, st.last_block))
        allreduce_times.append(allreduce_time_s(problem.param_bytes(st.first_block, st.last_block), cluster, st.devices))
    return sum(stage_times) + (decision.num_microbatches - 1) * max(stage_times) + max(allreduce_times)


def brute_force(
    costs: ModelCosts,
    cluster: Cluster,
    *,
    num_microbatches: int,
    schedule: str,
    max_stages: int | None = None,
) -> tuple[PlanDecision, float]:
    """Exhaustive search over the ILP's own candidates and costs, for tests on tiny instances.

    Returns the best decision and its objective in seconds (the same continuous
    cost the ILP minimises, so the two optima are equal exactly).
    """
    problem = _Problem(costs, cluster, num_microbatches, schedule)
    limit = problem.max_stages(max_stages)
    nb = problem.num_blocks
    best: tuple[int, list[_Candidate]] | None = None
    for num_stages in range(1, limit + 1):
        for cuts in itertools.combinations(range(1, nb), num_stages - 1):
            edges = (0,) + cuts + (nb,)
            options = []
            for s in range(num_stages):
                first, last = edges[s], edges[s + 1] - 1
                options.append([c for g in problem.groups
                                if (c := problem.candidate(num_stages, s, first, last, g)) is not None])
            for choice in itertools.product(*options):
                used = [sum(c.counts[k] for c in choice) for k in range(len(problem.types))]
                if any(u > a for u, a in zip(used, problem.available)):
                    continue
                objective = problem.objective_units(choice)
                if best is None or objective < best[0]:
                    best = (objective, list(choice))
    if best is None:
        raise problem.no_fit_error(limit)
    return _to_decision(problem, best[1]), best[0] / TIME_UNITS_PER_S
