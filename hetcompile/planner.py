"""The planner: pipeline stages, device groups, batch shares, tensor parallelism and recompute from CP-SAT (OR-Tools).

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

Kinds. ``k`` below ranges over *kinds*, not only device types: a kind is a
device type, or a tensor-parallel group priced as one device of a virtual type
(NOTE: [TP groups as virtual device types] at :class:`_Kind`): ``d`` devices of
one type inside a node (d = 2, 4, 8), or, only when nothing else fits, a group
across nodes (mixed types sharded in their speed ratio, or more devices than a
node). A kind has one ``Tk``, ``Rk``, ``P``, ``A`` array per distinct member
(its shard of the compute and parameters), a per-micro-batch ``Fk`` (the
latency of its TP all-reduces) and uses ``u[k,t]`` devices of type ``t``.

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
- devices per type: ``sum_s sum_k u[k,t] n[s,k] <= N_t`` (idle devices allowed), and
  per TP kind the groups its nodes hold                                    (:meth:`_StageModel.add_device_counts`)
- a TP kind is alone in its stage (``used[s,k] + used[s,j] <= 1``) and only on blocks
  whose ``tp_units`` reach its degree                                      (:meth:`_StageModel.add_tp_rules`)
- stage time: ``C[s] >= q[s,k] (Tk[cut[s+1]] - Tk[cut[s]]) + Fk(s)``, with ``Rk`` for ``Tk``
  when ``rc[s]``, for every member's ``Tk``                               (:meth:`_StageModel.add_stage_times`)
- memory, when ``n[s,k] >= 1``, for every member: ``(2 + adam) P(s) + q[s,k] f_s A(s) <= mem_k``, or with
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
(:func:`_heuristic`: proportional device mix per stage, type-pure stages with as
many stages per type as its speed or as its devices call for, also without the
slowest types, each type alone, the even split a homogeneous trainer would run)
scores every micro-batch count (when ``num_microbatches`` is None), schedule
(when ``schedule="auto"``) and stage count on a ladder (every ``S`` up to 12,
then steps of about 25%), with and without TP groups; a (micro-batch count,
schedule) pair that cannot fit even in the devices' memory taken together
(:meth:`_Problem.may_fit`) is skipped. The best POLISHED_PLANS heuristic plans
are improved by local moves (:func:`_polish`), and the best of all is the
incumbent. CP-SAT then solves one model per (micro-batch count, schedule, stage
count), best-scored first, each hinted with its heuristic plan and cut off at
the incumbent (``<=``, so the incumbent's own model starts from it), pairs within
HINT_SLACK of the incumbent first and the rest on what budget is left, until the
search's deterministic budget, MAX_SOLVED_MODELS models or MAX_SOLVED_VARIABLES
variables; a pair whose analytic bound (:meth:`_Problem.lower_bound_units`)
reaches the incumbent is skipped as proven. Plain pairs (real types only) come
first, then the TP pairs (NOTE: [TP after the plain search] in :func:`solve`);
``tp``, ``pp``, ``dp`` pin the shape. Close plans are re-ranked by the one
predictor (NOTE: [objective vs predictor] at :func:`_pick_by_prediction`). The
plan is never worse than the heuristic. The gap is against the smallest bound
over every pair (CP-SAT's, or the analytic one for pairs not solved); "OPTIMAL"
means every pair was solved or bounded out and the ladder covered every stage
count. Deterministic budgets, a fixed seed and worker count make the same input
give the same plan, whatever the machine's load (NOTE: [deterministic search]).

After solving, counts become concrete devices (:func:`_place_devices`: one
stage's devices of one type on as few nodes as possible) and integer shares
(each device ``<= q[s,k]``, summing to ``b``). The cost of one stage, shared by
the model, :func:`brute_force` and the heuristic, is :meth:`_Problem.stage_cost`.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ortools.sat.python import cp_model

from cost_models.cluster import Cluster
from cost_models.comm import allreduce_time_s, ring_allreduce_time_s
from cost_models.devices import DeviceType
from cost_models.memory import STATIC_BYTES_PER_PARAM_BYTE, stage_memory_bytes, tp_share
from cost_models.roofline import block_time_s
from hetcompile.errors import UserError
from hetcompile.interleave import best_interleaving, interleaved
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
# CP-SAT budgets, all in deterministic time (CP-SAT's machine-independent work units, roughly a
# second each on a quiet core), never in seconds: NOTE: [deterministic search]. A model gets at most
# DETERMINISTIC_TIME_PER_MODEL, and a search (one _solve_best) at most its total budget, counted by
# what the models really used: small models are proven in a few hundredths and many get solved,
# large ones (hundreds to thousands of variables) stop at their cap and only a few get solved.
DETERMINISTIC_TIME_PER_MODEL = 0.5
DETERMINISTIC_TIME_PER_SEARCH = 1.0
# ... scaled down by LARGE_MODEL_VARIABLES / variables for models larger than this.
LARGE_MODEL_VARIABLES = 600
# ... and at most this many models, and variables once a plan exists, per search; the pairs left
# over keep their analytic bound (_Problem.lower_bound_units) in the gap.
MAX_SOLVED_MODELS = 24
MAX_SOLVED_VARIABLES = 12_000
# Once an incumbent exists, CP-SAT only polishes pairs whose heuristic plan is within this factor of
# it (a pair the heuristics cannot fill, or fill far worse, rarely holds the optimum, and proving
# that costs a large model its whole budget); the others keep their analytic bound in the gap.
HINT_SLACK = 1.25
# With an incumbent, the far pairs' second pass gets at most this share of the search's budget.
SECOND_PASS_SHARE = 0.25
# Plans whose objective is within this factor of the best are re-ranked by the predictor, at most
# this many (NOTE: [objective vs predictor]).
PREDICTED_SLACK = 1.05
PREDICTED_CANDIDATES = 3
# Close plans also interleaved (NOTE: [interleaving a solved plan]): within this factor of the
# plan's objective (interleaving cuts at most the bubble, rarely a tenth of a step), at most this many.
INTERLEAVE_SLACK = 1.10
INTERLEAVE_RUNNERS_UP = 3
# Heuristic plans polished by local moves before CP-SAT (_polish), best first, and its rounds.
POLISHED_PLANS = 4
POLISH_ROUNDS = 20
# The TP phase (NOTE: [TP after the plain search]): its own, smaller budget.
DETERMINISTIC_TIME_PER_TP_SEARCH = 0.5
# A block with no FLOPs and no bytes would make a device's time zero.
_MIN_SAMPLE_UNITS = 1


@dataclass(frozen=True)
class StageDecision:
    first_block: int  # inclusive
    last_block: int  # inclusive; stages are contiguous and in order
    devices: tuple[int, ...]  # Cluster device indices; devices[i*tp:(i+1)*tp] are the TP group of replica i
    shares: tuple[int, ...]  # samples of each micro-batch each device handles (>= 1; equal within a TP group;
    # the groups' shares sum to the micro-batch size)
    recompute: bool = False  # rebuild activations in backward (keeps one micro-batch's activations)
    tp: int = 1  # tensor-parallel degree
    tp_parts: tuple[int, ...] = ()  # relative shard sizes of a group's members, e.g. (3, 1); () = even


@dataclass(frozen=True)
class PlanDecision:
    stages: tuple[StageDecision, ...]
    num_microbatches: int
    microbatch_size: int
    schedule: str = "1f1b"  # the pipeline schedule the plan was chosen for

    @property
    def chunks(self) -> int:
        """Stages per device group: 1, or more when the stages go round the groups (interleaved)."""
        return len(self.stages) // len({st.devices for st in self.stages})


@dataclass(frozen=True)
class SolverReport:
    status: str  # "OPTIMAL" (proven over the search space) or "FEASIBLE"
    gap: float  # (objective - best_bound) / objective; 0 when optimal
    objective_s: float
    best_bound_s: float
    wall_s: float
    num_variables: int
    wall_limit_hit: bool = False  # the wall-clock safety net stopped the search (NOTE: [deterministic search])


@dataclass(frozen=True)
class _Stage:
    """One stage as the model sees it: blocks first..last, per kind a group count and a max share."""

    first_block: int
    last_block: int
    counts: tuple[int, ...]  # per kind (_Problem.kinds: device types, then TP groups): devices or groups
    shares: tuple[int, ...]  # per kind: the most samples of a micro-batch one group takes (0 if unused)
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


def too_narrow(block, need: int) -> bool:
    """A block that TP splits into fewer than ``need`` units cannot sit in a stage of that degree. A block
    with nothing to split (no TP FLOPs, parameters or all-reduces: an embedding, say) runs whole on
    every member of a group, whatever its ``tp_units``.

    >>> from hetcompile.ir import Block
    >>> too_narrow(Block(0, "pre", 1.0, 1.0, 8, 2, 1.0, 1.0), 2), too_narrow(Block(0, "h.0", 1.0, 1.0, 8, 2, 1.0,
    ...     1.0, tp_flops_fraction=0.9, tp_units=1), 2)
    (False, True)
    """
    splits = block.tp_flops_fraction > 0 or block.tp_param_fraction > 0 or block.tp_comm_bytes_per_sample > 0
    return splits and block.tp_units < need


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


@dataclass(frozen=True)
class _Kind:
    """What the model counts per stage: one device of a type (``tp == 1``), or a tensor-parallel group.

    NOTE: [TP groups as virtual device types]
    A TP group of ``d`` devices is priced as one device of a virtual type: each member runs
    ``(1 - f) + f p/P`` of a block's compute (``f`` = ``Block.tp_flops_fraction``, ``p/P`` its
    shard), holds ``(1 - g) + g p/P`` of its parameters, and the group all-reduces
    ``tp_comm_bytes_per_sample`` per sample per block over its link, forward and backward. The
    group is as slow as its slowest member and fits when every member fits. The CP-SAT model then
    chooses among real and virtual types exactly as it chooses among real ones, so TP adds
    types, not a new dimension; a stage that uses a TP kind uses that kind alone (every replica
    of a stage has the same ``tp`` and ``tp_parts``).
    """

    name: str  # "Fast", "2x Fast", "Fast+Slow 3:1"
    members: tuple[tuple[int, int], ...]  # (device type index, shard part), in group order
    cross_node: bool = False  # the group's link is the inter-node one

    @property
    def tp(self) -> int:
        return len(self.members)

    @property
    def parts_total(self) -> int:
        return sum(p for _, p in self.members)

    @property
    def parts(self) -> tuple[int, ...]:
        """StageDecision.tp_parts: () when the shards are even."""
        parts = tuple(p for _, p in self.members)
        return () if len(set(parts)) <= 1 else parts


@dataclass(frozen=True)
class _Member:
    """The integer cost arrays of one distinct (device type, part) of a kind."""

    type_index: int
    time_prefix: list  # per-sample forward + backward (+ TP all-reduce bytes) units
    rc_prefix: list
    param_prefix: list  # bytes of parameters this member holds
    act_prefix: list  # activation bytes per sample this member saves
    mem_bytes: int


class _Problem:
    """Validated inputs for one (micro-batch count, schedule) and the integer cost arrays.

    ``tp`` pins every stage's TP degree (1: no TP), ``dp`` every stage's replica count;
    ``cross_node_tp`` admits TP groups that span nodes (mixed types, or more devices than a node).
    """

    def __init__(self, costs: ModelCosts, cluster: Cluster, num_microbatches: int, schedule: str,
                 allow_recompute: bool = False, *, tp: int | None = None, dp: int | None = None,
                 cross_node_tp: bool = False):
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
        self.tp, self.dp, self.cross_node_tp = tp, dp, cross_node_tp
        self.types: tuple[DeviceType, ...] = cluster.device_types
        self.available = tuple(cluster.count_of(t.name) for t in self.types)
        self.node_max = tuple(max(n.count for n in cluster.nodes if n.device == t.name) for t in self.types)
        self.type_index = {t.name: k for k, t in enumerate(self.types)}
        blocks = costs.blocks
        nb = len(blocks)
        self.per_block = [[block_time_s(block, t, costs.dtype) for block in blocks] for t in self.types]
        self.time_prefix, self.rc_prefix = [], []
        for per in self.per_block:
            self.time_prefix.append(_prefix([f + bw for f, bw in per], TIME_UNITS_PER_S))
            self.rc_prefix.append(_prefix([2 * f + bw for f, bw in per], TIME_UNITS_PER_S))
        self.param_prefix = list(itertools.accumulate((blk.param_bytes for blk in blocks), initial=0))
        self.act_prefix = _prefix([blk.act_bytes_per_sample for blk in blocks], 1.0, ceil=True)
        self.in_bytes = [0] + [int(math.ceil(blk.out_bytes_per_sample)) for blk in blocks[:-1]] + [0]
        inter_bw, inter_lat = cluster.inter_node_bw_bytes_per_s, cluster.inter_node_latency_s
        # Pipeline traffic always priced at the inter-node link: neighbouring stages usually
        # sit on other nodes or types, and it keeps a stage's cost independent of its neighbours.
        # NOTE: [a cut moves each device's own rows] Each device sends and receives only its own
        # samples' rows across a cut (lowering.transfers), over its own NIC (one per device,
        # cost_models/cluster.py): a cut costs send_fixed[p] + rows * send_per_sample[p], rows the
        # largest share on either side (cut_send), as predict.stage_times prices it. send[p]: the
        # whole micro-batch through one device, the most a cut can cost. One direction: the
        # gradients go back the other way on a full-duplex link, concurrently.
        self.send_fixed = [0] * (nb + 1)
        self.send_per_sample = [0] * (nb + 1)
        for p in range(1, nb):
            per_sample = blocks[p - 1].out_bytes_per_sample
            self.send_fixed[p] = round(inter_lat * TIME_UNITS_PER_S) if per_sample > 0 else 0
            self.send_per_sample[p] = round(per_sample / inter_bw * TIME_UNITS_PER_S)
        self.send = [self.cut_send(p, b) for p in range(nb + 1)]
        # Link classes of a stage's all-reduce: 0 = inter-node, 1 + k = inside one node of type k.
        self.link_bw = [inter_bw] + [min(n.intra_node_GBps for n in cluster.nodes if n.device == t.name) * 1e9
                                     for t in self.types]
        self.link_lat_units = [round(inter_lat * TIME_UNITS_PER_S)] + [
            round(cluster.intra_node_latency_s * TIME_UNITS_PER_S)] * len(self.types)
        # NOTE: [tied parameters in the objective] Parameters the first and the last block share
        # (tied input and output embeddings) count in block 0's param_bytes. With one stage they
        # are part of its all-reduce. With more, lowering.grad_groups sums them over the first
        # and the last stage's ranks together, after each stage's own all-reduce, and
        # hetcompile.predict charges them so: split_ar_prefix leaves them out of the first
        # stage's volume, and tied_units prices their all-reduce on the inter-node link, added to
        # the first and the last stage's. (A TP kind's all-reduce keeps its shard of them.)
        self.tied_bytes = sum(sp.param_bytes for sp in costs.shared_params
                              if sp.blocks[0] == 0 and sp.blocks[-1] == nb - 1)

        def ar_prefix(tied_out: int) -> list[list[int]]:  # per link class; block 0 less tied_out bytes
            return [_prefix([2 * (blk.param_bytes - tied_out * (i == 0)) / bw for i, blk in enumerate(blocks)],
                            TIME_UNITS_PER_S) for bw in self.link_bw]

        self.ar_prefix, self.split_ar_prefix = ar_prefix(0), ar_prefix(self.tied_bytes)
        self.tied_volume = _prefix([2 * self.tied_bytes / inter_bw], TIME_UNITS_PER_S)[-1]
        # (n - 1) / n in permille, for n up to the devices of two stages
        self.ring_factor = [0] + [round(_PERMILLE * (n - 1) / n) for n in range(1, 2 * b + 1)]
        self._max_share: dict[tuple, int] = {}
        self.share_cache: dict[tuple, _Stage | None] = {}  # _best_shares
        self._stage_costs: dict[tuple, tuple[int, int] | None] = {}
        self._build_kinds()

    # ------------------------------------------------------------ kinds (real and TP device types)

    def _build_kinds(self) -> None:
        """Real types first (unless ``tp`` pins a degree > 1), then TP groups (NOTE: [TP groups as virtual
        device types]): ``d`` devices of one type inside a node for d in 2, 4, 8 (up to the node and the
        blocks' ``tp_units``); with ``cross_node_tp`` also groups larger than a node and, per pair of
        types, one fast + one slow device with shards in their speed ratio."""
        nt, blocks = len(self.types), self.costs.blocks
        max_units = max(blk.tp_units for blk in blocks)
        kinds: list[_Kind] = []
        if self.tp in (None, 1):
            kinds += [_Kind(t.name, ((k, 1),)) for k, t in enumerate(self.types)]
        if self.tp != 1:
            degrees = [d for d in (2, 4, 8) if d <= max_units] if self.tp is None else [self.tp]
            for k, t in enumerate(self.types):
                for d in degrees:
                    within = d <= self.node_max[k]
                    if d <= self.available[k] and (within or self.cross_node_tp):
                        kinds.append(_Kind(f"{d}x {t.name}", ((k, 1),) * d, cross_node=not within))
            if self.cross_node_tp and 2 in degrees and nt > 1:
                speed = [1.0 / max(self.time_prefix[k][-1], 1) for k in range(nt)]
                for a, c in itertools.combinations(sorted(range(nt), key=lambda k: (-speed[k], k)), 2):
                    part = min(7, max(1, round(speed[a] / speed[c])))
                    if part + 1 <= max_units:
                        kinds.append(_Kind(f"{self.types[a].name}+{self.types[c].name} {part}:1",
                                           ((a, part), (c, 1)), cross_node=True))
        self.kinds = tuple(kinds)
        self.real_kind = {kind.members[0][0]: v for v, kind in enumerate(kinds) if kind.tp == 1}
        self.kind_uses = [tuple(sum(1 for m, _ in kind.members if m == k) for k in range(nt)) for kind in kinds]
        self.kind_limit = []  # the most groups of the kind the cluster holds
        for kind, uses in zip(kinds, self.kind_uses):
            limit = min(self.available[k] // u for k, u in enumerate(uses) if u)
            if kind.tp > 1 and not kind.cross_node:
                k = kind.members[0][0]
                limit = sum(n.count // kind.tp for n in self.cluster.nodes if n.device == self.types[k].name)
            self.kind_limit.append(limit)
        self.kind_top = [min(limit, self.microbatch_size) for limit in self.kind_limit]
        # Blocks a kind cannot split: a prefix count per needed number of units.
        self.kind_need = [max(kind.tp, kind.parts_total) if kind.tp > 1 else 1 for kind in kinds]
        self.bad_prefix = {need: list(itertools.accumulate((int(too_narrow(blk, need)) for blk in blocks), initial=0))
                           for need in sorted(set(self.kind_need))}
        self.members: list[list[_Member]] = []
        self.fixed_prefix, self.fixed_rc_prefix = [], []
        self.kind_ar: list[dict[int, list[int]]] = []
        for kind in kinds:
            if kind.tp == 1:
                k = kind.members[0][0]
                self.members.append([_Member(k, self.time_prefix[k], self.rc_prefix[k], self.param_prefix,
                                             self.act_prefix, self.types[k].mem_bytes)])
                self.fixed_prefix.append(None)
                self.fixed_rc_prefix.append(None)
                self.kind_ar.append(dict(enumerate(self.ar_prefix)))
                continue
            self._add_tp_kind(kind)
        self.whole_units = [self.kind_units(v, 0, len(blocks) - 1) for v in range(len(kinds))]
        self.mem_weight = [min(self.types[k].mem_bytes * kind.parts_total / part for k, part in kind.members)
                           for kind in kinds]

    def _add_tp_kind(self, kind: _Kind) -> None:
        blocks, n, total = self.costs.blocks, kind.tp, kind.parts_total
        k0 = kind.members[0][0]
        c = 0 if kind.cross_node or any(k != k0 for k, _ in kind.members) else 1 + k0
        bw, lat_units = self.link_bw[c], self.link_lat_units[c]
        # Ring all-reduce over the group, per sample (bytes) and per call (latency, whatever the share).
        comm = [ring_allreduce_time_s(blk.tp_comm_bytes_per_sample, n, bw, 0.0) for blk in blocks]
        calls = [int(blk.tp_comm_bytes_per_sample > 0) for blk in blocks]
        per_call = 2 * (n - 1) * lat_units
        self.fixed_prefix.append(list(itertools.accumulate((2 * per_call * x for x in calls), initial=0)))
        self.fixed_rc_prefix.append(list(itertools.accumulate((3 * per_call * x for x in calls), initial=0)))
        members = []
        for k, part in sorted(set(kind.members)):
            per = self.per_block[k]
            flop = [tp_share(blk.tp_flops_fraction, part, total) for blk in blocks]
            members.append(_Member(
                k,
                _prefix([(f + bw_) * x + 2 * t for (f, bw_), x, t in zip(per, flop, comm)], TIME_UNITS_PER_S),
                _prefix([(2 * f + bw_) * x + 3 * t for (f, bw_), x, t in zip(per, flop, comm)], TIME_UNITS_PER_S),
                _prefix([blk.param_bytes * tp_share(blk.tp_param_fraction, part, total) for blk in blocks], 1.0,
                        ceil=True),
                _prefix([blk.act_bytes_per_sample * x for blk, x in zip(blocks, flop)], 1.0, ceil=True),
                self.types[k].mem_bytes))
        self.members.append(members)
        # Each replica's member i all-reduces its own shard's gradients: the largest shard sets the pace.
        largest = max(members, key=lambda m: m.param_prefix[-1]).param_prefix
        steps = [largest[p + 1] - largest[p] for p in range(len(blocks))]
        self.kind_ar.append({cls: _prefix([2 * x / self.link_bw[cls] for x in steps], TIME_UNITS_PER_S)
                             for cls in sorted({0, c})})

    @property
    def num_kinds(self) -> int:
        return len(self.kinds)

    @property
    def has_tp_kinds(self) -> bool:
        return any(kind.tp > 1 for kind in self.kinds)

    def tp_ok(self, v: int, first: int, last: int) -> bool:
        """Every block of the interval splits into the kind's units (tp_units >= its need)."""
        bad = self.bad_prefix[self.kind_need[v]]
        return bad[last + 1] == bad[first]

    def kind_units(self, v: int, first: int, last: int, recompute: bool = False) -> int:
        """Per-sample time of the kind on blocks first..last: its slowest member's."""
        members = self.members[v]
        if len(members) == 1:  # a device type, or an even TP group of one type
            prefix = members[0].rc_prefix if recompute else members[0].time_prefix
            return max(prefix[last + 1] - prefix[first], _MIN_SAMPLE_UNITS)
        return max(max((m.rc_prefix if recompute else m.time_prefix)[last + 1]
                       - (m.rc_prefix if recompute else m.time_prefix)[first] for m in self.members[v]),
                   _MIN_SAMPLE_UNITS)

    def kind_fixed(self, v: int, first: int, last: int, recompute: bool = False) -> int:
        """Per-micro-batch time whatever the share: the TP all-reduces' latency."""
        prefix = self.fixed_rc_prefix[v] if recompute else self.fixed_prefix[v]
        return 0 if prefix is None else prefix[last + 1] - prefix[first]

    def kind_mem_weight(self, v: int) -> float:
        """Memory a kind brings to a stage, for memory-proportional heuristic splits."""
        return self.mem_weight[v]

    def kind_fits(self, v: int, num_stages: int, s: int, first: int, last: int, share: int, recompute: bool) -> bool:
        f, in_bytes = self.in_flight(num_stages, s), self.in_bytes[first]
        for m in self.members[v]:
            mem = stage_memory_bytes(m.param_prefix[last + 1] - m.param_prefix[first],
                                     m.act_prefix[last + 1] - m.act_prefix[first], in_bytes, share, f, recompute)
            if mem > m.mem_bytes:
                return False
        return True

    def kind_of_group(self, types: Sequence[str], parts: Sequence[int]) -> int | None:
        members = tuple((self.type_index[t], p) for t, p in zip(types, parts or (1,) * len(types)))
        for v, kind in enumerate(self.kinds):
            if kind.members == members:
                return v
        return None

    # ------------------------------------------------------------ costs

    @property
    def num_blocks(self) -> int:
        return self.costs.num_blocks

    def max_stages(self, max_stages: int | None) -> int:
        limit = min(self.num_blocks, self.cluster.num_devices // ((self.tp or 1) * (self.dp or 1)))
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

    def max_share(self, v: int, num_stages: int, s: int, first: int, last: int, recompute: bool) -> int:
        """The most samples per micro-batch a kind-v group holds in memory there (0 if not even one)."""
        key = (v, self.in_flight(num_stages, s), first, last, recompute)
        if key not in self._max_share:
            self._max_share[key] = self._max_share_search(v, num_stages, s, first, last, recompute)
        return self._max_share[key]

    def _max_share_search(self, v, num_stages, s, first, last, recompute) -> int:
        lo, hi = 0, self.microbatch_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.kind_fits(v, num_stages, s, first, last, mid, recompute):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def link_class(self, counts: Sequence[int]) -> int:
        used = [v for v, c in enumerate(counts) if c]
        if len(used) == 1:
            kind = self.kinds[used[0]]
            k = kind.members[0][0]
            if (not kind.cross_node and all(m == k for m, _ in kind.members)
                    and counts[used[0]] * kind.tp <= self.node_max[k]):
                return 1 + k
        return 0

    def allreduce_units(self, first: int, last: int, counts: Sequence[int], split: bool = False) -> int:
        """The stage's gradient all-reduce over its replicas (for TP, each member's shard over its peers);
        ``split``: a plan of several stages, where tied parameters are all-reduced apart
        (NOTE: [tied parameters in the objective])."""
        n = sum(counts)
        c = self.link_class(counts)
        used = [v for v, x in enumerate(counts) if x]
        if len(used) == 1 and self.kinds[used[0]].tp > 1:
            prefix = self.kind_ar[used[0]][c]
        else:
            prefix = (self.split_ar_prefix if split else self.ar_prefix)[c]
        volume = prefix[last + 1] - prefix[first]
        return _ceil_div(self.ring_factor[n] * volume, _PERMILLE) + 2 * (n - 1) * self.link_lat_units[c]

    def tied_units(self, stages: Sequence[_Stage]) -> int:
        """The tied parameters' all-reduce over the first and the last stage's devices, when they
        differ (NOTE: [tied parameters in the objective])."""
        if len(stages) < 2 or not self.tied_bytes:
            return 0
        n = sum(stages[0].counts) + sum(stages[-1].counts)
        return _ceil_div(self.ring_factor[n] * self.tied_volume, _PERMILLE) + 2 * (n - 1) * self.link_lat_units[0]

    def stage_cost(self, num_stages: int, s: int, st: _Stage) -> tuple[int, int] | None:
        """(C, AR) of one stage in time units (compute per micro-batch, all-reduce), or None when it is
        not a valid stage (shares, memory, a TP kind beside another kind or on blocks it cannot split).

        The one cost function: the CP-SAT model encodes exactly these formulas. Cached: it depends
        on the stage count and position only through the micro-batches in flight and whether there
        is more than one stage (NOTE: [tied parameters in the objective]).
        """
        key = (self.in_flight(num_stages, s), num_stages > 1, st)
        if key not in self._stage_costs:
            self._stage_costs[key] = self._stage_cost(num_stages, s, st)
        return self._stage_costs[key]

    def _stage_cost(self, num_stages: int, s: int, st: _Stage) -> tuple[int, int] | None:
        b, n = self.microbatch_size, sum(st.counts)
        if not 1 <= n <= b or sum(c * q for c, q in zip(st.counts, st.shares)) < b:
            return None
        if self.dp is not None and n != self.dp:
            return None
        used = [v for v, c in enumerate(st.counts) if c]
        if len(used) > 1 and any(self.kinds[v].tp > 1 for v in used):
            return None
        compute = 0
        for v, (c, q) in enumerate(zip(st.counts, st.shares)):
            if (c > 0) != (q > 0):
                return None
            if c == 0:
                continue
            if c > self.kind_top[v] or not self.tp_ok(v, st.first_block, st.last_block):
                return None
            if not self.kind_fits(v, num_stages, s, st.first_block, st.last_block, q, st.recompute):
                return None
            compute = max(compute, q * self.kind_units(v, st.first_block, st.last_block, st.recompute)
                          + self.kind_fixed(v, st.first_block, st.last_block, st.recompute))
        return compute, self.allreduce_units(st.first_block, st.last_block, st.counts, split=num_stages > 1)

    def objective_units(self, stages: Sequence[_Stage]) -> int | None:
        """sum C + 2 sum_cuts send + (M - 1) max(max C, max send) + max AR (the first and the last
        stage's AR with the tied parameters' all-reduce added), or None when a stage is invalid or
        devices run out."""
        per_kind = [sum(column) for column in zip(*(st.counts for st in stages))]
        if any(n > limit for n, limit in zip(per_kind, self.kind_limit)):
            return None
        for k, available in enumerate(self.available):
            if sum(n * uses[k] for n, uses in zip(per_kind, self.kind_uses) if n) > available:
                return None
        costs = [self.stage_cost(len(stages), s, st) for s, st in enumerate(stages)]
        if any(c is None for c in costs):
            return None
        times = [c[0] for c in costs]
        sends = self.cut_sends(stages)
        bottleneck = max(times + sends + self.cycle_floors(times, sends))
        return sum(times) + 2 * sum(sends) + (self.num_microbatches - 1) * bottleneck + self.slowest_ar(stages, costs)

    def slowest_ar(self, stages: Sequence[_Stage], costs) -> int:
        """The largest stage all-reduce, the tied parameters' added to the first and the last stage's."""
        ars = [c[1] for c in costs]
        tied = self.tied_units(stages)
        ars[0] += tied
        ars[-1] += tied
        return max(ars)

    def cut_send(self, cut: int, rows: int) -> int:
        """Time units to move ``rows`` samples' activations across ``cut`` (NOTE: [a cut moves each
        device's own rows]); 0 at the model's ends."""
        return self.send_fixed[cut] + rows * self.send_per_sample[cut]

    def cut_sends(self, stages: Sequence[_Stage]) -> list[int]:
        """Each cut's transfer: the largest share on either side goes through one device's link."""
        return [self.cut_send(b.first_block, max(max(a.shares), max(b.shares))) for a, b in zip(stages, stages[1:])]

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
        cheapest_send = min(self.cut_send(p, 1) for p in range(1, nb)) if nb > 1 else 0
        return self.num_microbatches * self.min_bottleneck_units() + 2 * (num_stages - 1) * cheapest_send

    def may_fit(self) -> bool:
        """A necessary condition for any plan: the devices' memory together holds every parameter's
        static bytes once (replicas and TP shards only add to it) and, per stage, at least one micro-batch's
        saved activations (1F1B or recompute; GPipe without recompute holds all ``M`` at once).
        Rules out whole (micro-batch count, schedule) pairs before any screening."""
        total_mem = sum(n * t.mem_bytes for n, t in zip(self.available, self.types))
        in_flight = self.num_microbatches if self.schedule == "gpipe" and not self.allow_recompute else 1
        need = (int(math.ceil(STATIC_BYTES_PER_PARAM_BYTE * self.param_prefix[-1]))
                + in_flight * self.microbatch_size * self.act_prefix[-1])
        return need <= total_mem

    def memory_facts(self) -> str:
        """The model's weight memory against the largest device, for no-fit errors."""
        total_params = self.param_bytes(0, self.num_blocks - 1)
        static = STATIC_BYTES_PER_PARAM_BYTE * total_params
        largest = max(self.types, key=lambda t: t.mem_bytes)
        return (f"{total_params / 1e9:.3g} GB of parameters ({static / 1e9:.3g} GB with gradients and Adam state, "
                f"before activations), and the largest device ({largest.name}) has {largest.mem_GB:g} GB")

    def no_fit_error(self, max_stages: int) -> UserError:
        return UserError(
            f"The model fits on no plan for this cluster: it has {self.memory_facts()}. No split into at most {max_stages} pipeline "
            f"stage(s) with micro-batches of {self.microbatch_size} sample(s) fits every device"
            f"{'' if not self.allow_recompute else ', even with activation recompute'}. Fixes: add "
            "devices (more stages give each device fewer layers), use more micro-batches or a smaller global "
            "batch (less activation memory per device)"
            + (", or the 1f1b schedule (fewer micro-batches in flight)." if self.schedule == "gpipe" else ".")
        )


# ---------------------------------------------------------------- heuristic plans


def _best_shares(problem: _Problem, num_stages: int, s: int, first: int, last: int, counts: Sequence[int],
                 recompute: bool) -> _Stage | None:
    """Integer shares minimising the stage's compute time for these group counts per kind (None if infeasible).

    The bottleneck z is the least value at which the groups' capacities
    ``sum_v n_v min(qmax_v, floor((z - fixed_v) / t_v))`` cover the micro-batch; kinds that
    take no sample at z are dropped, and groups beyond b are trimmed slowest first.
    Cached per problem: the heuristic layouts and their rebalancing rounds ask for the same
    stages again and again (the answer depends on the stage count only through the micro-batches
    in flight).
    """
    key = (problem.in_flight(num_stages, s), first, last, tuple(counts), recompute)
    if key not in problem.share_cache:
        problem.share_cache[key] = _best_shares_search(problem, num_stages, s, first, last, counts, recompute)
    return problem.share_cache[key]


def _best_shares_search(problem: _Problem, num_stages: int, s: int, first: int, last: int, counts: Sequence[int],
                        recompute: bool) -> _Stage | None:
    b, nv = problem.microbatch_size, problem.num_kinds
    counts = list(counts)
    used = [v for v, c in enumerate(counts) if c]
    if len(used) == 1 and problem.kinds[used[0]].tp > 1 and not problem.tp_ok(used[0], first, last):
        # Blocks the group cannot split (an embedding, say): its devices run them without TP.
        kind = problem.kinds[used[0]]
        k = kind.members[0][0]
        if k in problem.real_kind and all(m == k for m, _ in kind.members):
            num_devices = kind.tp * counts[used[0]]
            counts = [0] * nv
            counts[problem.real_kind[k]] = min(num_devices, problem.kind_top[problem.real_kind[k]])
    times = [problem.kind_units(v, first, last, recompute) if counts[v] else 1 for v in range(nv)]
    fixed = [problem.kind_fixed(v, first, last, recompute) if counts[v] else 0 for v in range(nv)]
    caps = [problem.max_share(v, num_stages, s, first, last, recompute)
            if counts[v] and problem.tp_ok(v, first, last) else 0 for v in range(nv)]
    counts = [c if cap > 0 else 0 for c, cap in zip(counts, caps)]
    for v in sorted(range(nv), key=lambda v: (-times[v], v)):  # at most b groups: drop the slowest
        excess = sum(counts) - b
        if excess > 0:
            counts[v] -= min(excess, counts[v])
    if sum(c * cap for c, cap in zip(counts, caps)) < b:
        return None

    active = [(c, cap, t, x) for c, cap, t, x in zip(counts, caps, times, fixed) if c]

    def capacity(z: int) -> int:
        return sum(c * min(cap, max(0, z - x) // t) for c, cap, t, x in active)

    if len(active) == 1:  # one kind (as in every stage of one type): its c groups take ceil(b / c) samples each
        (c, _, t, x), = active
        lo = hi = x + -(-b // c) * t
    else:
        lo, hi = 0, max(cap * t + x for c, cap, t, x in active)
    while lo < hi:
        mid = (lo + hi) // 2
        if capacity(mid) >= b:
            hi = mid
        else:
            lo = mid + 1
    shares = [min(cap, max(0, lo - x) // t) if c else 0 for c, cap, t, x in zip(counts, caps, times, fixed)]
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
    speeds = [sum(c / problem.whole_units[v] for v, c in enumerate(counts) if c) for counts in counts_per_stage]
    if min(speeds) <= 0:
        return None
    best = _build_from(problem, counts_per_stage, recompute, speeds, rounds=3)
    if best is None:
        memories = [min(problem.kind_mem_weight(v) for v, c in enumerate(counts) if c) for counts in counts_per_stage]
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

def _heuristic(problem: _Problem, num_stages: int, recompute: bool, layouts_of: str = "all") -> _Choice | None:
    """The best of a few constructive plans for S stages (hint for CP-SAT, screening, and the floor).

    - mixed: every stage gets ~1/S of every type's devices;
    - type-pure: each type gets stages in proportion to its total speed;
    - one type alone, each type in turn (so the fastest-type-only plan is always a candidate);
    - the even split a homogeneous trainer would run (:func:`_even_layout`);
    - with TP kinds: each TP kind alone, and type-pure with TP groups of each degree
      (a stage whose blocks a group cannot split falls back to its devices without TP);
    - with ``dp`` pinned: every stage gets ``dp`` groups, fastest kinds first.

    ``layouts_of``: "plain" (no TP kinds), "tp" (only layouts with TP groups) or "all".
    """
    nv, b = problem.num_kinds, problem.microbatch_size
    real = problem.real_kind
    plain, tp_layouts = layouts_of in ("plain", "all"), layouts_of in ("tp", "all")
    layouts: list[list[list[int]]] = []
    if plain and len(real) == len(problem.types):
        per_type = [_spread(n, num_stages) for n in problem.available]
        mixed = [[0] * nv for _ in range(num_stages)]
        for k, v in real.items():
            for s in range(num_stages):
                mixed[s][v] = per_type[k][s]
        layouts.append(mixed)
    # TP groups alone: those of the type fastest per device (the fastest-type-only plan, with TP).
    fastest = min(range(len(problem.types)), key=lambda k: (problem.time_prefix[k][-1], k))
    for v in range(nv):
        if not (plain if problem.kinds[v].tp == 1 else tp_layouts and problem.kinds[v].members[0][0] == fastest):
            continue
        only = [[0] * nv for _ in range(num_stages)]
        for s, c in enumerate(_spread(problem.kind_limit[v], num_stages)):
            only[s][v] = c
        layouts.append(only)
    degrees = sorted({kind.tp for kind in problem.kinds})
    for d in degrees:
        if not (plain if d == 1 else tp_layouts):
            continue
        kind_of_type = {}
        for v, kind in enumerate(problem.kinds):
            k = kind.members[0][0]
            if kind.tp == d and not kind.cross_node and all(m == k for m, _ in kind.members):
                kind_of_type[k] = v
        for k, v in real.items():
            kind_of_type.setdefault(k, v)
        # Every type, then without the slowest, and so on: a type too slow to pay for its pipeline
        # stages is better left idle (the mix then is a smaller one, e.g. H100+A100 of H100+A100+T4).
        by_speed = sorted(kind_of_type, key=lambda k: (problem.time_prefix[k][-1], k))
        for keep in range(len(by_speed), 1, -1):
            subset = {k: kind_of_type[k] for k in by_speed[:keep]}
            for by_devices in (False, True):
                pure = _pure_layout(problem, num_stages, subset, by_devices)
                if pure is not None and pure not in layouts:
                    layouts.append(pure)
    if problem.dp is not None:
        speed_order = sorted(range(nv), key=lambda v: (problem.whole_units[v], v))
        for group in ([v] for v in speed_order) if problem.has_tp_kinds else [speed_order]:
            left = list(problem.kind_limit)
            layout = []
            for _ in range(num_stages):
                row, need = [0] * nv, problem.dp
                for v in group:
                    take = min(need, left[v])
                    row[v], left[v], need = take, left[v] - take, need - take
                if need:
                    break
                layout.append(row)
            if len(layout) == num_stages:
                layouts.append(layout)
    best = _even_layout(problem, num_stages, recompute) if plain else None
    for layout in layouts:
        if any(sum(row) == 0 for row in layout):
            continue
        layout = [[min(c, b) for c in row] for row in layout]
        choice = _build(problem, layout, recompute)
        if choice is not None and (best is None or choice.objective_units < best.objective_units):
            best = choice
    return best


def _pure_layout(problem: _Problem, num_stages: int, kind_of_type: dict[int, int],
                 by_devices: bool = False) -> list[list[int]] | None:
    """Stages per type in proportion to speed (largest remainder, >= 1 each), each stage one type's
    kind; big-memory types first, since early 1F1B stages hold the most micro-batches.

    ``by_devices``: in proportion to the groups instead, so every stage gets about as many groups
    (the blocks then follow each stage's speed, :func:`_build`): with at most ``b`` groups per
    stage, this is the layout that leaves no device idle once ``S`` reaches groups / ``b``."""
    nv, nb = problem.num_kinds, problem.num_blocks
    types = sorted(kind_of_type)
    nt = len(types)
    if nt < 2 or num_stages < nt:
        return None
    limit = [problem.kind_limit[kind_of_type[k]] for k in types]
    speed = [float(n) if by_devices else n / problem.whole_units[kind_of_type[k]] for k, n in zip(types, limit)]
    if sum(speed) <= 0:
        return None
    quota = [num_stages * x / sum(speed) for x in speed]
    alloc = [max(1, math.floor(x)) for x in quota]
    while sum(alloc) > num_stages:
        alloc[max(range(nt), key=lambda i: (alloc[i] - quota[i], i))] -= 1
    while sum(alloc) < num_stages:
        alloc[max(range(nt), key=lambda i: (quota[i] - alloc[i], -i))] += 1
    if min(alloc) < 1 or any(limit[i] < alloc[i] for i in range(nt)):
        return None
    pure = []
    for i in sorted(range(nt), key=lambda i: (-problem.types[types[i]].mem_bytes, types[i])):
        for c in _spread(limit[i], alloc[i]):
            row = [0] * nv
            row[kind_of_type[types[i]]] = c
            pure.append(row)
    return pure


def _even_layout(problem: _Problem, num_stages: int, recompute: bool) -> _Choice | None:
    """What a homogeneous trainer would run (equal blocks per stage, consecutive devices per stage),
    with the best shares for those devices: so the plan is never worse than the even-split baseline."""
    nb, b = problem.num_blocks, problem.microbatch_size
    devices = problem.cluster.devices
    per_stage = len(devices) // num_stages
    if per_stage == 0 or len(problem.real_kind) < len(problem.types):
        return None
    stages = []
    for s in range(num_stages):
        counts = [0] * problem.num_kinds
        for d in devices[s * per_stage:(s + 1) * per_stage][:b]:
            counts[problem.real_kind[problem.type_index[d.type]]] += 1
        first, last = s * nb // num_stages, (s + 1) * nb // num_stages - 1
        st = _best_shares(problem, num_stages, s, first, last, counts, recompute)
        if st is None:
            return None
        stages.append(st)
    objective = problem.objective_units(stages)
    return None if objective is None else _Choice(tuple(stages), objective)


# ---------------------------------------------------------------- the CP-SAT model


class _StageModel:
    """The CP-SAT model for a fixed number of stages (see the module docstring).

    ``kinds``: the kinds offered (default all); the others take no devices.
    """

    def __init__(self, problem: _Problem, num_stages: int, kinds: Sequence[int] | None = None):
        self.problem = p = problem
        self.num_stages = S = num_stages
        self.kv = list(range(p.num_kinds)) if kinds is None else sorted(kinds)
        self.model = cp_model.CpModel()
        nb, b = p.num_blocks, p.microbatch_size
        self._elements: dict[tuple[str, int], cp_model.IntVar | int] = {}
        self.rows: dict[int, cp_model.IntVar] = {}  # per cut: the most samples one device moves
        self.cut = [0] + [self.model.new_int_var(s, nb - S + s, f"cut_{s}") for s in range(1, S)] + [nb]
        self.n, self.q, self.used = {}, {}, {}
        for s in range(S):
            for v in self.kv:
                self.n[s, v] = self.model.new_int_var(0, p.kind_top[v], f"n_s{s}_k{v}")
                self.q[s, v] = self.model.new_int_var(0, b, f"q_s{s}_k{v}")
                self.used[s, v] = self.model.new_bool_var(f"used_s{s}_k{v}")
        self.tp_kinds = [v for v in self.kv if p.kinds[v].tp > 1]
        self.rc = {s: (self.model.new_bool_var(f"rc_s{s}") if p.allow_recompute else None) for s in range(S)}
        max_time = max(b * max(max(m.time_prefix[-1], m.rc_prefix[-1], _MIN_SAMPLE_UNITS)
                               for v in self.kv for m in p.members[v])
                       + max((p.fixed_rc_prefix[v][-1] for v in self.tp_kinds), default=0), max(p.send))
        self.C = [self.model.new_int_var(0, max_time, f"C_s{s}") for s in range(S)]
        self.send = [self._cut_send(s) for s in range(1, S)]
        max_ar = (max(pre[-1] for pre in p.ar_prefix) + p.tied_volume
                  + 2 * 3 * b * max(p.link_lat_units))
        self.AR = [self.model.new_int_var(0, max_ar, f"AR_s{s}") for s in range(S)]
        self.z = self.model.new_int_var(0, max_time, "z_bottleneck_stage")
        self.w = self.model.new_int_var(0, max_ar, "w_slowest_allreduce")
        self.add_contiguous_stages()
        self.add_shares()
        self.add_device_counts()
        self.add_tp_rules()
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

    def _cut_send(self, s: int):
        """Cut s's transfer: X0[cut] + rows * Xs[cut], rows >= every share on either side
        (NOTE: [a cut moves each device's own rows])."""
        p, b = self.problem, self.problem.microbatch_size
        rows = self.model.new_int_var(1, b, f"rows_cut{s}")
        for v in self.kv:
            self.model.add(rows >= self.q[s - 1, v])
            self.model.add(rows >= self.q[s, v])
        self.rows[s] = rows
        per = self._at("Xs", p.send_per_sample, s)
        if isinstance(per, int):
            return self._at("X0", p.send_fixed, s) + per * rows
        moved = self.model.new_int_var(0, b * max(p.send_per_sample), f"moved_cut{s}")
        self.model.add_multiplication_equality(moved, [rows, per])
        return self._at("X0", p.send_fixed, s) + moved

    def _interval(self, name: str, array: Sequence[int], s: int):
        return self._at(name, array, s + 1) - self._at(name, array, s)

    def add_contiguous_stages(self) -> None:
        """cut[s] + 1 <= cut[s+1]: every stage runs at least one block, in order."""
        for s in range(self.num_stages):
            self.model.add(self.cut[s] + 1 <= self.cut[s + 1])

    def add_shares(self) -> None:
        """sum_v n[s,v] q[s,v] >= b, 1 <= sum_v n[s,v] <= b (== dp when pinned), and
        n[s,v] >= 1 <=> q[s,v] >= 1 <=> used[s,v]."""
        b = self.problem.microbatch_size
        self.nq = {}
        for s in range(self.num_stages):
            for v in self.kv:
                n, q, used = self.n[s, v], self.q[s, v], self.used[s, v]
                self.model.add(n >= 1).only_enforce_if(used)
                self.model.add(q >= 1).only_enforce_if(used)
                self.model.add(n == 0).only_enforce_if(~used)
                self.model.add(q == 0).only_enforce_if(~used)
                self.nq[s, v] = self.model.new_int_var(0, b * self.problem.kind_top[v], f"nq_s{s}_k{v}")
                self.model.add_multiplication_equality(self.nq[s, v], [n, q])
            self.model.add(sum(self.nq[s, v] for v in self.kv) >= b)
            self.model.add(sum(self.n[s, v] for v in self.kv) >= 1)
            self.model.add(sum(self.n[s, v] for v in self.kv) <= b)
            if self.problem.dp is not None:
                self.model.add(sum(self.n[s, v] for v in self.kv) == self.problem.dp)

    def add_device_counts(self) -> None:
        """sum_s sum_v uses[v,k] n[s,v] <= N_k for every device type k (devices may stay idle), and
        sum_s n[s,v] <= groups of kind v the nodes hold."""
        p = self.problem
        for k, available in enumerate(p.available):
            terms = [p.kind_uses[v][k] * self.n[s, v] for s in range(self.num_stages) for v in self.kv
                     if p.kind_uses[v][k]]
            if terms:
                self.model.add(sum(terms) <= available)
        for v in self.tp_kinds:
            self.model.add(sum(self.n[s, v] for s in range(self.num_stages)) <= p.kind_limit[v])

    def add_tp_rules(self) -> None:
        """A stage with a TP kind uses that kind alone: used[s,v] + used[s,u] <= 1 (v TP, u != v); and
        only on blocks it can split: used[s,v] => bad_v(s) == 0 (blocks with tp_units below its need)."""
        p = self.problem
        for s in range(self.num_stages):
            for v in self.tp_kinds:
                for u in self.kv:
                    if u != v and (p.kinds[u].tp == 1 or u > v):
                        self.model.add_bool_or([~self.used[s, v], ~self.used[s, u]])
                bad = p.bad_prefix[p.kind_need[v]]
                if bad[-1]:
                    self.model.add(self._interval(f"bad{p.kind_need[v]}", bad, s) == 0).only_enforce_if(
                        self.used[s, v])

    def add_stage_times(self) -> None:
        """C[s] >= q[s,v] t[s,v] + fixed[s,v]; t >= every member's per-sample time (Tk, or Rk when
        rc[s]); fixed: the TP all-reduces' latency per micro-batch."""
        p, b = self.problem, self.problem.microbatch_size
        for s in range(self.num_stages):
            for v in self.kv:
                # A model whose costs round to zero time units still needs a non-empty domain.
                hi = max(max(m.time_prefix[-1], m.rc_prefix[-1], _MIN_SAMPLE_UNITS) for m in p.members[v])
                t = self.model.new_int_var(_MIN_SAMPLE_UNITS, hi, f"t_s{s}_k{v}")
                rc = self.rc[s]
                for i, m in enumerate(p.members[v]):
                    plain = self._interval(f"T{v}.{i}", m.time_prefix, s)
                    if rc is None:
                        self.model.add(t >= plain)
                    else:
                        self.model.add(t >= plain).only_enforce_if(~rc)
                        self.model.add(t >= self._interval(f"R{v}.{i}", m.rc_prefix, s)).only_enforce_if(rc)
                compute = self.model.new_int_var(0, b * hi, f"compute_s{s}_k{v}")
                self.model.add_multiplication_equality(compute, [self.q[s, v], t])
                if p.fixed_prefix[v] is None:
                    self.model.add(self.C[s] >= compute)
                    continue
                fixed = self.model.new_int_var(0, p.fixed_rc_prefix[v][-1], f"fixed_s{s}_k{v}")
                if rc is None:
                    self.model.add(fixed >= self._interval(f"F{v}", p.fixed_prefix[v], s))
                else:
                    self.model.add(fixed >= self._interval(f"F{v}", p.fixed_prefix[v], s)).only_enforce_if(~rc)
                    self.model.add(fixed >= self._interval(f"FR{v}", p.fixed_rc_prefix[v], s)).only_enforce_if(rc)
                self.model.add(self.C[s] >= compute + fixed).only_enforce_if(self.used[s, v])

    def add_memory(self) -> None:
        """When used[s,v], for each member m: (2 + adam) P_m(s) + q[s,v] a_m[s] <= mem_m, with
        a_m[s] = f_s A_m(s), or f_s I[cut[s]] + A_m(s) when rc[s] (cost_models.memory.stage_memory_bytes)."""
        p, b = self.problem, self.problem.microbatch_size
        for s in range(self.num_stages):
            f = p.in_flight(self.num_stages, s)
            rc = self.rc[s]
            per_sample_of: dict[int, object] = {}

            def per_sample(key, act_prefix):
                if id(act_prefix) in per_sample_of:
                    return per_sample_of[id(act_prefix)]
                acts = self._interval(f"A{key}", act_prefix, s)
                hi = f * (act_prefix[-1] + max(p.in_bytes))
                var = self.model.new_int_var(0, hi, f"act_per_sample_s{s}{key}")
                if rc is None:
                    self.model.add(var == f * acts)
                else:
                    self.model.add(var == f * acts).only_enforce_if(~rc)
                    self.model.add(var == f * self._at("I", p.in_bytes, s) + acts).only_enforce_if(rc)
                per_sample_of[id(act_prefix)] = (var, hi)
                return var, hi

            # The real types' arrays first, shared by every real type (the model's variable order
            # does not change with TP kinds around).
            if any(m.act_prefix is p.act_prefix for v in self.kv for m in p.members[v]):
                per_sample("", p.act_prefix)
                self._interval("P", p.param_prefix, s)
            for v in self.kv:
                for i, m in enumerate(p.members[v]):
                    key = "" if m.act_prefix is p.act_prefix else f"_k{v}.{i}"
                    var, hi = per_sample(key, m.act_prefix)
                    act_mem = self.model.new_int_var(0, b * hi, f"act_mem_s{s}_k{v}.{i}")
                    self.model.add_multiplication_equality(act_mem, [self.q[s, v], var])
                    params = self._interval("P" if m.param_prefix is p.param_prefix else f"P{v}.{i}",
                                            m.param_prefix, s)
                    static = int(STATIC_BYTES_PER_PARAM_BYTE) * params
                    self.model.add(static + act_mem <= m.mem_bytes).only_enforce_if(self.used[s, v])

    def add_allreduce(self) -> None:
        """cls[s, 1+k] only if the stage is type k alone within one node (TP groups of type k inside
        nodes included: n tp <= L_k); then AR[s] >= ceil(F(n_s) Wc(s) / 1000) + 2 (n_s - 1) lat_c for
        the chosen class c, with W from the stage's TP kind (its largest shard) when it uses one.
        With several stages, W leaves out the tied parameters and ``tied`` is their all-reduce over
        the first and the last stage's n on the inter-node link (NOTE: [tied parameters in the
        objective])."""
        p, nt, b = self.problem, len(self.problem.types), self.problem.microbatch_size
        S = self.num_stages
        for s in range(S):
            cls = [self.model.new_bool_var(f"cls_s{s}_c{c}") for c in range(nt + 1)]
            self.model.add_exactly_one(cls)
            for k in range(nt):
                mine = [v for v in self.kv if not p.kinds[v].cross_node
                        and all(m == k for m, _ in p.kinds[v].members)]
                if mine:
                    self.model.add(sum(p.kinds[u].tp * self.n[s, u] for u in mine) <= p.node_max[k]
                                   ).only_enforce_if(cls[1 + k])
                for v in self.kv:
                    if v not in mine:
                        self.model.add(self.n[s, v] == 0).only_enforce_if(cls[1 + k])
            n_total = self.model.new_int_var(1, b, f"ntotal_s{s}")
            self.model.add(n_total == sum(self.n[s, v] for v in self.kv))
            factor = self.model.new_int_var(0, _PERMILLE, f"ring_factor_s{s}")
            self.model.add_element(n_total, p.ring_factor, factor)
            ar_prefix = p.split_ar_prefix if S > 1 else p.ar_prefix
            volume_hi = max(pre[-1] for pre in ar_prefix)
            volume = self.model.new_int_var(0, volume_hi, f"ar_volume_s{s}")
            if self.tp_kinds:
                plain = self.model.new_bool_var(f"plain_s{s}")
                self.model.add(sum(self.used[s, v] for v in self.tp_kinds) == 0).only_enforce_if(plain)
                self.model.add(sum(self.used[s, v] for v in self.tp_kinds) >= 1).only_enforce_if(~plain)
                for c in range(nt + 1):
                    self.model.add(volume >= self._interval(f"W{c}", ar_prefix[c], s)).only_enforce_if(
                        [cls[c], plain])
                for v in self.tp_kinds:
                    for c, prefix in p.kind_ar[v].items():
                        self.model.add(volume >= self._interval(f"W{c}k{v}", prefix, s)).only_enforce_if(
                            [cls[c], self.used[s, v]])
            else:
                for c in range(nt + 1):
                    self.model.add(volume == self._interval(f"W{c}", ar_prefix[c], s)).only_enforce_if(cls[c])
            scaled = self.model.new_int_var(0, _PERMILLE * volume_hi, f"ar_scaled_s{s}")
            self.model.add_multiplication_equality(scaled, [factor, volume])
            for c in range(nt + 1):
                latency = 2 * p.link_lat_units[c] * _PERMILLE
                self.model.add(_PERMILLE * self.AR[s] >= scaled + latency * (n_total - 1)).only_enforce_if(cls[c])
        self.tied = 0
        if S > 1 and p.tied_bytes:
            n_tied = self.model.new_int_var(2, 2 * b, "n_tied")
            self.model.add(n_tied == sum(self.n[s, v] for s in (0, S - 1) for v in self.kv))
            factor = self.model.new_int_var(0, _PERMILLE, "ring_factor_tied")
            self.model.add_element(n_tied, p.ring_factor, factor)
            self.tied = self.model.new_int_var(0, p.tied_volume + 2 * 2 * b * p.link_lat_units[0], "tied_allreduce")
            self.model.add(_PERMILLE * self.tied >= factor * p.tied_volume
                           + 2 * p.link_lat_units[0] * _PERMILLE * (n_tied - 1))

    def add_bottlenecks(self) -> None:
        """z >= C[s], z >= X[cut[s]], w >= AR[s] (+ tied for the first and the last stage); valid cut
        z >= z_min (every device busy on its share of the work: at an optimum z is the largest of
        the C and X)."""
        for s in range(self.num_stages):
            self.model.add(self.z >= self.C[s])
            self.model.add(self.w >= self.AR[s] + (self.tied if s in (0, self.num_stages - 1) else 0))
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
        """objective <= best: no worse plan matters, and the cutoff lets the solver prove "no better
        plan with this many stages" from bounds alone. Not strict, so the incumbent itself (when it is
        this model's hint) stays a feasible starting point that CP-SAT improves on."""
        self.model.add(self.objective <= best_units)

    def add_hint(self, choice: _Choice) -> None:
        p = self.problem
        for s, st in enumerate(choice.stages):
            if s > 0:
                self.model.add_hint(self.cut[s], st.first_block)
            for v in self.kv:
                self.model.add_hint(self.n[s, v], st.counts[v])
                self.model.add_hint(self.q[s, v], st.shares[v])
                self.model.add_hint(self.used[s, v], st.counts[v] > 0)
            if self.rc[s] is not None:
                self.model.add_hint(self.rc[s], st.recompute)
            cost = p.stage_cost(self.num_stages, s, st)
            self.model.add_hint(self.C[s], cost[0])
            self.model.add_hint(self.AR[s], cost[1])
        costs = [p.stage_cost(self.num_stages, s, st) for s, st in enumerate(choice.stages)]
        times = [c[0] for c in costs]
        sends = p.cut_sends(choice.stages)
        for s, (a, st) in enumerate(zip(choice.stages, choice.stages[1:]), start=1):
            self.model.add_hint(self.rows[s], max(max(a.shares), max(st.shares)))
        self.model.add_hint(self.z, max(times + sends + p.cycle_floors(times, sends)))
        self.model.add_hint(self.w, p.slowest_ar(choice.stages, costs))
        if not isinstance(self.tied, int):
            self.model.add_hint(self.tied, p.tied_units(choice.stages))

    def solve(self, deterministic_time: float, wall_limit_s: float, seed: int, num_workers: int,
              on_progress: Callable[[float, float], None] | None):
        """(status name, choice or None, bound units or None, whether the wall limit stopped it,
        deterministic time used)."""
        solver = cp_model.CpSolver()
        # NOTE: [deterministic search] The deterministic limit (CP-SAT's work units, counted the same
        # on any machine and under any load), a fixed seed and a fixed worker count make the result a
        # function of the input alone. The wall limit is only a safety net (the caller's time_limit_s,
        # far above the normal time); when it stops a model first, the plan may differ run to run, and
        # the solver report says so (SolverReport.wall_limit_hit).
        solver.parameters.max_deterministic_time = deterministic_time
        solver.parameters.max_time_in_seconds = max(wall_limit_s, 0.01)
        solver.parameters.random_seed = seed
        solver.parameters.num_workers = num_workers
        callback = _ProgressCallback(on_progress) if on_progress is not None else None
        status = solver.solve(self.model, callback)
        if status == cp_model.MODEL_INVALID:
            raise AssertionError(f"planner built an invalid CP-SAT model: {self.model.validate()}")
        # Stopped by the clock, not by the work budget or a proof.
        wall_hit = (status in (cp_model.UNKNOWN, cp_model.FEASIBLE) and solver.deterministic_time < deterministic_time
                    and solver.wall_time >= 0.99 * solver.parameters.max_time_in_seconds)
        used = solver.deterministic_time
        if status == cp_model.INFEASIBLE:
            return "INFEASIBLE", None, None, False, used
        if status == cp_model.UNKNOWN:
            return "UNKNOWN", None, round(solver.best_objective_bound), wall_hit, used
        assert status in (cp_model.OPTIMAL, cp_model.FEASIBLE), solver.status_name(status)
        p = self.problem
        stages = []
        for s in range(self.num_stages):
            first, end = solver.value(self.cut[s]), solver.value(self.cut[s + 1])
            counts = tuple(solver.value(self.n[s, v]) if v in self.kv else 0 for v in range(p.num_kinds))
            shares = tuple(solver.value(self.q[s, v]) if v in self.kv else 0 for v in range(p.num_kinds))
            rc = bool(solver.value(self.rc[s])) if self.rc[s] is not None else False
            stages.append(_Stage(first, end - 1, counts, shares, rc))
        # C, z and w are only bounded below, so a non-optimal solution may overstate them.
        objective = p.objective_units(stages)
        assert objective is not None, "the model admitted a plan the cost function rejects"
        return (solver.status_name(status), _Choice(tuple(stages), objective), round(solver.best_objective_bound),
                wall_hit, used)

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
    """Concrete devices per stage, TP group after TP group (sorted). Requests go TP groups
    first (largest first, so they pack into nodes), then by size: one stage's devices of one type
    go to the node of that type with the fewest free devices that still holds them whole (best
    fit), else across the nodes with the most free devices, so they span as few nodes as possible;
    a TP group of one type stays inside one node whenever the free devices allow it."""
    cluster = problem.cluster
    free: dict[int, list[int]] = {n: [] for n in range(len(cluster.nodes))}
    for d in cluster.devices:
        free[d.node].append(d.index)
    requests = sorted(
        ((problem.kinds[v].tp, st.counts[v], s, v) for s, st in enumerate(stages) for v in range(problem.num_kinds)
         if st.counts[v]),
        key=lambda r: (-r[0], -r[1], r[2], r[3]),
    )
    placed: list[list[tuple[int, ...]]] = [[] for _ in stages]

    def nodes_of(k: int) -> list[int]:
        return [i for i, node in enumerate(cluster.nodes) if node.device == problem.types[k].name]

    def take_one(k: int) -> int:
        i = min((i for i in nodes_of(k) if free[i]), key=lambda i: (-len(free[i]), i))
        return free[i].pop(0)

    for tp, n, s, v in requests:
        kind = problem.kinds[v]
        k = kind.members[0][0]
        same_type = all(m == k for m, _ in kind.members)
        if not same_type or kind.cross_node:
            for _ in range(n):
                placed[s].append(tuple(take_one(m) for m, _ in kind.members))
            continue
        nodes = nodes_of(k)
        whole = [i for i in nodes if len(free[i]) >= n * tp]
        order = [min(whole, key=lambda i: (len(free[i]), i))] if whole else sorted(
            nodes, key=lambda i: (-len(free[i]), i))
        groups: list[tuple[int, ...]] = []
        for i in order:
            while len(groups) < n and len(free[i]) >= tp:
                groups.append(tuple(free[i][:tp]))
                free[i] = free[i][tp:]
        while len(groups) < n:  # no node has a whole group left: the group spans nodes
            groups.append(tuple(take_one(k) for _ in range(tp)))
        placed[s].extend(groups)
    return [tuple(d for group in sorted(groups) for d in group) for groups in placed]


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
    real = {d.index: problem.real_kind.get(problem.type_index[d.type]) for d in problem.cluster.devices}
    stages = []
    for st, devices in zip(choice.stages, devices_per_stage):
        used = [v for v, c in enumerate(st.counts) if c]
        tp_kind = used[0] if len(used) == 1 and problem.kinds[used[0]].tp > 1 else None
        size = 1 if tp_kind is None else problem.kinds[tp_kind].tp
        groups = [devices[i:i + size] for i in range(0, len(devices), size)]
        kinds = [tp_kind if tp_kind is not None else real[g[0]] for g in groups]
        caps = [st.shares[v] for v in kinds]
        times = [problem.kind_units(v, st.first_block, st.last_block, st.recompute) for v in kinds]
        shares = _device_shares(caps, times, problem.microbatch_size)
        tp = 1 if tp_kind is None else problem.kinds[tp_kind].tp
        parts = () if tp_kind is None else problem.kinds[tp_kind].parts
        stages.append(StageDecision(st.first_block, st.last_block, tuple(d for g in groups for d in g),
                                    tuple(q for q in shares for _ in range(tp)), st.recompute, tp, parts))
    return PlanDecision(tuple(stages), problem.num_microbatches, problem.microbatch_size, problem.schedule)


# ---------------------------------------------------------------- the search


def _microbatch_options(global_batch: int, num_microbatches: int | None, dp: int | None = None) -> list[int]:
    if num_microbatches is not None:
        return [num_microbatches]
    # A pinned dp needs micro-batches of at least dp samples (one per replica).
    top = min(global_batch // (dp or 1), MAX_MICROBATCHES)
    divisors = [m for m in range(1, top + 1) if global_batch % m == 0]
    # Keep the search in seconds: divisors at least ~1.8x apart (1, 2, 4, 8, ... or 1, 3, 8, 24, ...).
    picked, last = [], 0.0
    for m in divisors:
        if not picked or math.log(m) - last >= math.log(1.8) or m == divisors[-1]:
            picked.append(m)
            last = math.log(m)
    return picked


def _screen(problem: _Problem, ladder: Sequence[int], layouts_of: str = "all") -> dict[int, _Choice]:
    """Heuristic plan per stage count on the ladder (only those that fit)."""
    out = {}
    if not problem.may_fit():
        return out
    for num_stages in ladder:
        choice = _heuristic(problem, num_stages, recompute=False, layouts_of=layouts_of)
        if problem.allow_recompute:
            with_rc = _heuristic(problem, num_stages, recompute=True, layouts_of=layouts_of)
            if with_rc is not None and (choice is None or with_rc.objective_units < choice.objective_units):
                choice = with_rc
        if choice is not None:
            out[num_stages] = choice
    return out


def _polish(problem: _Problem, choice: _Choice) -> _Choice:
    """Hill-climb a heuristic plan with local moves, keeping its stage count: shift a cut by one
    block, move one group of a kind to the neighbouring stage, take an idle group into a stage or
    leave one idle; shares are re-chosen by :func:`_best_shares` and every move is priced by
    :meth:`_Problem.objective_units`. The best move of each round is taken, until none improves
    or POLISH_ROUNDS rounds. Deterministic, and cheap beside a CP-SAT model; it hands CP-SAT a
    better hint and incumbent, so less CP-SAT work reaches the same plan."""
    stages, best = list(choice.stages), choice.objective_units
    num_stages, nv = len(stages), problem.num_kinds

    def stage(i: int, first: int, last: int, counts) -> _Stage | None:
        if sum(counts) == 0:
            return None
        return _best_shares(problem, num_stages, i, first, last, counts, stages[i].recompute)

    for _ in range(POLISH_ROUNDS):
        spare = [problem.kind_limit[v] - sum(st.counts[v] for st in stages) for v in range(nv)]
        moves: list[dict[int, _Stage | None]] = []
        for i in range(num_stages - 1):  # shift the cut between stages i and i + 1
            a, c = stages[i], stages[i + 1]
            for cut in (c.first_block - 1, c.first_block + 1):
                if a.first_block < cut <= c.last_block:
                    moves.append({i: stage(i, a.first_block, cut - 1, a.counts),
                                  i + 1: stage(i + 1, cut, c.last_block, c.counts)})
        for i, st in enumerate(stages):
            for v in range(nv):
                more, fewer = list(st.counts), list(st.counts)
                more[v] += 1
                fewer[v] -= 1
                if spare[v] > 0:
                    moves.append({i: stage(i, st.first_block, st.last_block, more)})
                if st.counts[v] == 0:
                    continue
                moves.append({i: stage(i, st.first_block, st.last_block, fewer)})
                for j in (i - 1, i + 1):  # one group to a neighbour
                    if 0 <= j < num_stages:
                        other = list(stages[j].counts)
                        other[v] += 1
                        moves.append({i: stage(i, st.first_block, st.last_block, fewer),
                                      j: stage(j, stages[j].first_block, stages[j].last_block, other)})
        found = None
        for move in moves:
            if any(st is None for st in move.values()):
                continue
            trial = [move.get(i, st) for i, st in enumerate(stages)]
            objective = problem.objective_units(trial)
            if objective is not None and objective < best:
                best, found = objective, trial
        if found is None:
            break
        stages = found
    return choice if best >= choice.objective_units else _Choice(tuple(stages), best)


def _pick_by_prediction(problem: _Problem, choice: _Choice, screened, found, costs: ModelCosts, cluster: Cluster):
    """The search's plan, or a close runner-up that the one predictor (hetcompile.predict, the numbers
    plan.json reports) expects to be faster.

    NOTE: [objective vs predictor] The CP-SAT objective is a closed form of the 1F1B/GPipe
    timeline (fill and drain, bottleneck, round-trip floors, every cut priced on the inter-node
    link); the predictor simulates the schedule event by event on the actual links. They agree
    within a few percent, and on plans that close the two can rank differently. So the best plan
    and the best heuristic plans within PREDICTED_SLACK of it (at most PREDICTED_CANDIDATES) are
    simulated, and the fastest predicted wins (ties: the lower objective, then search order).
    """
    from hetcompile.predict import predict

    pool = [(problem, choice)] + _close_plans(choice, screened, found, PREDICTED_SLACK)
    best = None
    for order, (other, cand) in enumerate(pool[:PREDICTED_CANDIDATES]):
        decision = _to_decision(other, cand)
        step_s = predict(decision, costs, cluster, other.schedule)[0]["step_time_s"]
        key = (round(step_s * TIME_UNITS_PER_S), cand.objective_units, order)
        if best is None or key < best[0]:
            best = (key, other, cand)
    if best[2] is not choice:
        logger.debug("predictor prefers a runner-up: objective %d -> %d", choice.objective_units,
                     best[2].objective_units)
    return best[1], best[2]


def _close_plans(choice: _Choice, screened, found, slack: float) -> list[tuple[_Problem, _Choice]]:
    """The search's other plans within ``slack`` times ``choice``'s objective, best first (ties: the
    heuristic plans of the screened pairs in order, then CP-SAT's in the order found)."""
    others = [(other, per_s[num_stages]) for other, per_s in screened for num_stages in sorted(per_s)] + found
    pool = [(cand.objective_units, i, other, cand) for i, (other, cand) in enumerate(others)
            if cand is not choice and cand.objective_units <= slack * choice.objective_units]
    pool.sort(key=lambda x: (x[0], x[1]))
    return [(other, cand) for _, _, other, cand in pool]


def _real_kinds(problem: _Problem, hint: _Choice | None) -> list[int]:
    return sorted(problem.real_kind.values())


def _offered_kinds(problem: _Problem, hint: _Choice | None) -> list[int] | None:
    """The kinds a CP-SAT model gets: every real type, and the TP kinds of the degrees its hint uses
    (None: all kinds). Keeps the model the size of a TP-free one unless the heuristics found TP useful."""
    if not problem.has_tp_kinds or hint is None or problem.tp is not None:
        return None
    degrees = {problem.kinds[v].tp for st in hint.stages for v, c in enumerate(st.counts) if c}
    return [v for v, kind in enumerate(problem.kinds) if kind.tp == 1 or kind.tp in degrees]


def _check_pins(costs: ModelCosts, cluster: Cluster, tp, pp, dp, num_microbatches, max_stages) -> None:
    """Reject a pinned shape that cannot fit before searching: one paragraph naming the problem and the fix."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{name} is {value!r}; it must be a positive integer (or None to let the planner choose).")
    if tp is not None and tp > 1:
        narrow = [b for b in costs.blocks if too_narrow(b, tp)]
        if narrow:
            names = ", ".join(f"{b.name} ({b.tp_units})" for b in narrow[:3]) + (", ..." if len(narrow) > 3 else "")
            raise UserError(
                f"--tp {tp} splits every stage {tp} ways, but {len(narrow)} of the model's {costs.num_blocks} blocks "
                f"split fewer ways (tp_units: {names}); each TP member needs at least one unit (an attention "
                f"head, say). " + (f"Pin --tp {min(b.tp_units for b in costs.blocks)} or less, or leave --tp out: "
                                   "the planner then uses TP only on stages whose blocks split."
                                   if min(b.tp_units for b in costs.blocks) > 1 else
                                   "Leave --tp out (or pin --tp 1): the planner then uses TP only on stages whose "
                                   "blocks split."))
        largest = max(cluster.count_of(t.name) for t in cluster.device_types)
        if tp > largest and not (tp == 2 and len(cluster.device_types) > 1):
            raise UserError(f"--tp {tp} needs TP groups of {tp} devices of one type, and the cluster has at most "
                            f"{largest} of any type. Pin --tp {largest} or less, or leave --tp out.")
    if pp is not None:
        limit = min(costs.num_blocks, max_stages or costs.num_blocks)
        if pp > limit:
            raise UserError(f"--pp {pp} asks for {pp} pipeline stages, but "
                            + (f"the model has {costs.num_blocks} blocks (layers), and each stage needs at least "
                               "one" if pp > costs.num_blocks else f"max_stages is {max_stages}")
                            + f". Pin --pp {limit} or less, or leave --pp out.")
    if dp is not None:
        b = costs.global_batch // num_microbatches if num_microbatches else costs.global_batch
        if dp > b:
            raise UserError(f"--dp {dp} asks for {dp} data-parallel replicas per stage, but a micro-batch has {b} "
                            "sample(s) and each replica needs at least one. Pin a smaller --dp, use fewer "
                            "micro-batches, or a larger global batch.")
    need = (tp or 1) * (pp or 1) * (dp or 1)
    if need > cluster.num_devices:
        raise UserError(f"The pinned shape ({_shape_text(tp, pp, dp)}) needs at least {need} devices (tp x pp x dp), "
                        f"and the cluster has {cluster.num_devices}. Lower a pin, or leave it out (--tp/--pp/--dp) to "
                        "let the planner choose.")


def _shape_text(tp, pp, dp) -> str:
    return ", ".join(f"{name}={'any' if v is None else v}" for name, v in (("tp", tp), ("pp", pp), ("dp", dp)))


def _pinned_no_fit_error(problem: _Problem, tp, pp, dp) -> UserError:
    return UserError(
        f"The pinned shape ({_shape_text(tp, pp, dp)}) fits no plan on this cluster: with these pins some device "
        f"runs out of memory or devices run out. The model has {problem.memory_facts()}. Fixes: raise --tp or --pp (each device holds a smaller slice "
        "of the model), lower --dp (fewer devices per stage leave more for the others), add devices, or leave "
        "the pins out to let the planner choose."
    )


def solve(
    costs: ModelCosts,
    cluster: Cluster,
    *,
    num_microbatches: int | None = None,
    schedule: str = "1f1b",
    max_stages: int | None = None,
    time_limit_s: float = 300.0,
    seed: int = 0,
    num_workers: int = 1,
    allow_recompute: bool | None = None,
    on_progress: Callable[[float, float], None] | None = None,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    effort: float = 1.0,
) -> tuple[PlanDecision, SolverReport]:
    """Choose stages, device groups, batch shares, TP degrees, recompute, micro-batch count and
    schedule minimising the predicted step time.

    ``num_microbatches=None`` lets the planner choose among the divisors of the
    global batch (up to MAX_MICROBATCHES); ``schedule="auto"`` chooses among
    GPipe, 1F1B and interleaved 1F1B ("interleaved": the best 1F1B plan, interleaved). ``allow_recompute=None`` (default) turns recompute on only
    when no plan fits without it. ``on_progress(objective_s, bound_s)`` is
    called at every improving CP-SAT solution. With a fixed ``seed`` and
    ``num_workers`` the same input gives the same plan: the search stops at deterministic
    budgets, and ``time_limit_s`` is only a wall-clock safety net far above the normal time
    (when it fires, ``SolverReport.wall_limit_hit`` says so and the plan may vary).
    ``tp``, ``pp``, ``dp`` pin every stage's TP degree, the number of stages and every
    stage's data-parallel replicas; the planner chooses what is not pinned, and a pinned
    shape that cannot fit raises :class:`UserError`. ``effort`` scales the searches' deterministic
    budgets (HetHub's bound searches each device type alone at half: NOTE: [bound searches] in
    hetcompile/baselines.py). TP groups stay inside a node; groups
    across nodes (mixed types, or more devices than a node) are tried only when nothing else fits.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = tuple(Block(i, f"h.{i}", 1e12, 1e6, 1000, 250, 1e3, 1e3) for i in range(2))
    >>> cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}]})
    >>> decision, report = solve(ModelCosts(blocks, 8, "bf16"), cluster, num_microbatches=2)
    >>> [(s.first_block, s.last_block, s.devices, s.shares) for s in decision.stages], report.status
    ([(0, 1, (0, 1), (2, 2))], 'OPTIMAL')
    """
    start = time.perf_counter()
    _check_pins(costs, cluster, tp, pp, dp, num_microbatches, max_stages)
    # Interleaving is decided after the search, on the best 1F1B plan (NOTE: [interleaving a solved plan]).
    schedules = SCHEDULES if schedule == "auto" else ("1f1b",) if schedule == "interleaved" else (schedule,)
    recompute_options = [False, True] if allow_recompute is None else [bool(allow_recompute)]
    # TP groups across nodes only when nothing fits inside nodes (with or without recompute).
    levels = [(rc, cross) for cross in (False, True) for rc in recompute_options]
    result, limit, found = None, 1, []
    for allow_rc, cross in levels:
        problems = [_Problem(costs, cluster, m, sched, allow_rc, tp=tp, dp=dp, cross_node_tp=cross)
                    for m in _microbatch_options(costs.global_batch, num_microbatches, dp) for sched in schedules]
        if cross and not any(kind.cross_node for kind in problems[0].kinds):
            continue
        if not problems[0].kinds:
            continue
        limit = problems[0].max_stages(max_stages)
        ladder = [pp] if pp is not None else stage_ladder(limit)
        complete = pp is not None or len(ladder) == limit
        # NOTE: [TP after the plain search] With TP free and TP kinds at hand, the heuristics run
        # with and without TP groups, and the best of all is the incumbent. CP-SAT then polishes
        # the plain pairs (real types only, the smaller models) within HINT_SLACK of it, then the TP
        # pairs within HINT_SLACK, on a smaller budget; a TP plan replaces the
        # plain one only when it is faster. When no plain plan fits, TP gets the whole budget.
        two_phase = tp is None and problems[0].has_tp_kinds
        plain = [] if cross else [(problem, _screen(problem, ladder, "plain" if two_phase else "all"))
                                  for problem in problems]
        # TP heuristics only where the plain ones come within 2x of the best, or where no plain plan
        # fits at all (there TP groups, which shard the weights, are what may fit).
        best_plain = [min((c.objective_units for c in per_s.values()), default=math.inf) for _, per_s in plain]
        near = [problem for i, problem in enumerate(problems)
                if not plain or best_plain[i] == math.inf or best_plain[i] <= 2 * min(best_plain)]
        with_tp = [(problem, _screen(problem, ladder, "tp")) for problem in near] if two_phase else []
        if not allow_rc and allow_recompute is None and limit > FULL_STAGE_LADDER and not any(
                per_s for _, per_s in plain + with_tp):
            continue  # a large instance where no heuristic plan fits: go straight to recompute
        # The most promising heuristic plans, polished by local moves.
        ranked = sorted(((choice.objective_units, i, num_stages) for i, (_, per_s) in enumerate(plain + with_tp)
                         for num_stages, choice in per_s.items()))
        for _, i, num_stages in ranked[:POLISHED_PLANS]:
            problem, per_s = (plain + with_tp)[i]
            per_s[num_stages] = _polish(problem, per_s[num_stages])
        # The best heuristic plan, with or without TP, is the incumbent every CP-SAT model must beat.
        screened_best = None
        for problem, per_s in plain + with_tp:
            for choice in per_s.values():
                if screened_best is None or choice.objective_units < screened_best[1].objective_units:
                    screened_best = (problem, choice)
        if plain:
            result = _solve_best(plain, ladder, complete, start, time_limit_s, seed, num_workers, on_progress,
                                 kinds_of=_real_kinds if two_phase else _offered_kinds, incumbent=screened_best,
                                 deterministic_budget=effort * DETERMINISTIC_TIME_PER_SEARCH, found=found)
        if with_tp:
            budget = MAX_SOLVED_MODELS if result is None or any(per_s for _, per_s in with_tp) else 0
            tp_result = _solve_best(with_tp, ladder, complete, start, time_limit_s, seed, num_workers, on_progress,
                                    incumbent=result[:2] if result else None, max_models=budget,
                                    deterministic_budget=effort * (DETERMINISTIC_TIME_PER_SEARCH if result is None
                                                                   else DETERMINISTIC_TIME_PER_TP_SEARCH),
                                    found=found)
            if result is not None and tp_result is not None:
                tp_result = (*tp_result[:2], result[2] and tp_result[2], min(result[3], tp_result[3]),
                             result[4] + tp_result[4], result[5] or tp_result[5])
            result = tp_result or result
        if result is not None:
            break
    if result is None:
        if (tp, pp, dp) != (None, None, None):
            raise _pinned_no_fit_error(problems[0], tp, pp, dp)
        raise problems[0].no_fit_error(limit)
    problem, choice, all_optimal, bound, num_variables, wall_hit = result
    if not all_optimal:
        problem, choice = _pick_by_prediction(problem, choice, plain + with_tp, found, costs, cluster)
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
        wall_limit_hit=wall_hit,
    )
    logger.info("plan: M=%d %s S=%d objective=%.6f s gap=%.4f (%s)", problem.num_microbatches, problem.schedule,
                len(choice.stages), report.objective_s, gap, report.status)
    decision = _to_decision(problem, choice)
    if schedule in ("auto", "interleaved"):
        required = schedule == "interleaved"
        runners_up = _interleave_runners_up(decision, choice, plain + with_tp, found, required)
        decision = best_interleaving(decision, costs, cluster, required=required, runners_up=runners_up)
    return decision, report


def _interleave_runners_up(decision: PlanDecision, choice: _Choice, screened, found,
                           required: bool) -> list[PlanDecision]:
    """The search's close plans worth interleaving beside ``decision`` (at most INTERLEAVE_RUNNERS_UP,
    best first): within INTERLEAVE_SLACK of its objective and near enough that interleaving could
    make up the difference; asked for interleaving (``required``), the closest that can be
    interleaved, however far."""
    runners_up: list[PlanDecision] = []
    for other, cand in _close_plans(choice, screened, found, math.inf if required else INTERLEAVE_SLACK):
        # Interleaving cuts at most the fill and drain, (p - 1) of the M + p - 1 slots of a step.
        m, p = other.num_microbatches, len(cand.stages)
        if not required and cand.objective_units * m >= choice.objective_units * (m + p - 1):
            continue
        d = _to_decision(other, cand)
        if d != decision and d not in runners_up and interleaved(d, 2) is not None:
            runners_up.append(d)
            if len(runners_up) == INTERLEAVE_RUNNERS_UP:
                break
    return runners_up


def _solve_best(screened, ladder, complete, start, time_limit_s, seed, num_workers, on_progress, *,
                kinds_of=_offered_kinds, incumbent=None, max_models: int = MAX_SOLVED_MODELS,
                hint_slack: float | None = HINT_SLACK,
                deterministic_budget: float = DETERMINISTIC_TIME_PER_SEARCH, found: list | None = None):
    """CP-SAT per (micro-batch count, schedule, stage count), best-screened first; None when nothing fits.

    Every pair either gets a CP-SAT model (hinted with its heuristic plan, cut off at the
    incumbent), or is proven no better by its analytic bound, or, past ``max_models``,
    keeps that bound in the gap. ``kinds_of(problem, hint)``: the kinds a model is offered;
    ``incumbent``: a (problem, choice) to beat; ``hint_slack``: with an incumbent, solve only
    pairs whose hint is within this factor of it; ``deterministic_budget``: the search's CP-SAT
    work (NOTE: [deterministic search]). Returns (problem, choice, proven optimal, bound units,
    variables, whether the wall-clock safety net fired). Every CP-SAT plan is appended to ``found``
    as (problem, choice).
    """
    pairs = [(problem, s, per_s.get(s)) for problem, per_s in screened for s in ladder]
    pairs.sort(key=lambda x: x[2].objective_units if x[2] is not None else math.inf)  # stable: input order on ties
    best: tuple[_Problem, _Choice] | None = incumbent
    for problem, _, hint in pairs:
        if hint is not None and (best is None or hint.objective_units < best[1].objective_units):
            best = (problem, hint)
    if best is not None and on_progress is not None:
        # The heuristic incumbent and the analytic bound, before (and even without) any CP-SAT solution.
        floor = min(problem.lower_bound_units(s) for problem, s, _ in pairs)
        on_progress(best[1].objective_units / TIME_UNITS_PER_S, min(floor, best[1].objective_units) / TIME_UNITS_PER_S)
    # Proven optimal only when every stage count was covered (the ladder is complete).
    all_optimal = complete
    bounds, num_variables, solved, wall_hit, work_left = [], 0, 0, False, deterministic_budget
    deadline = start + time_limit_s  # a safety net only (NOTE: [deterministic search])
    # Pairs whose hint is far from the incumbent wait for a second pass on what budget is left:
    # small instances still get every pair solved (and proven), large ones spend it on the near ones.
    deferred = []
    for second_pass, queue in ((False, pairs), (True, deferred)):
        if second_pass and best is not None:
            # Far pairs rarely beat the incumbent, and large ones take their whole share to say so.
            work_left = min(work_left, SECOND_PASS_SHARE * deterministic_budget)
        for problem, num_stages, hint in queue:
            if not problem.may_fit():
                bounds.append(math.inf)  # proven: no plan of this pair fits memory
                continue
            floor = problem.lower_bound_units(num_stages)
            incumbent = best[1].objective_units if best is not None else None
            if incumbent is not None and floor >= incumbent:
                bounds.append(incumbent)  # proven: no such plan beats the incumbent
                continue
            if not second_pass and hint_slack is not None and incumbent is not None and (
                    hint is None or hint.objective_units > hint_slack * incumbent):
                deferred.append((problem, num_stages, hint))
                continue
            wall_left_s = deadline - time.perf_counter()
            # The variable cap bounds the time spent improving a plan; while none exists, only the
            # deterministic budget and the model count stop the search.
            spent = (solved >= max_models or work_left < 0.01
                     or (num_variables >= MAX_SOLVED_VARIABLES and best is not None))
            if spent or wall_left_s <= 0:
                wall_hit = wall_hit or not spent
                bounds.append(floor)
                all_optimal = False
                continue
            solved += 1
            stage_model = _StageModel(problem, num_stages, kinds_of(problem, hint))
            num_variables += stage_model.num_variables
            if incumbent is not None:
                stage_model.add_incumbent_cutoff(incumbent)
                if hint is not None and hint.objective_units > incumbent:
                    hint = None  # it violates the cutoff
            if hint is not None:
                stage_model.add_hint(hint)
            model_start = time.perf_counter()
            # Large models (a thousand devices, many stages) get a smaller share each: CP-SAT's work
            # units undercount their propagation, and a few of them would take the whole budget.
            cap = DETERMINISTIC_TIME_PER_MODEL * min(1.0, LARGE_MODEL_VARIABLES / stage_model.num_variables)
            status, choice, bound, hit, used = stage_model.solve(min(cap, work_left), wall_left_s, seed, num_workers,
                                                                 on_progress)
            wall_hit, work_left = wall_hit or hit, work_left - used
            logger.debug("M=%d %s S=%d: %s objective=%s hint=%s incumbent=%s bound=%s vars=%d det=%.3f wall=%.3f",
                         problem.num_microbatches, problem.schedule, num_stages, status,
                         choice and choice.objective_units, hint and hint.objective_units, incumbent, bound,
                         stage_model.num_variables, used, time.perf_counter() - model_start)
            if status == "INFEASIBLE":
                bounds.append(incumbent if incumbent is not None else math.inf)
                continue
            if status != "OPTIMAL":
                all_optimal = False
            bounds.append(max(bound or 0, floor))
            if choice is not None and found is not None:
                found.append((problem, choice))
            if choice is not None and (best is None or choice.objective_units < best[1].objective_units):
                best = (problem, choice)
    if wall_hit:
        logger.warning("the planner's wall-clock safety net (time_limit_s=%g) stopped the search before its "
                       "deterministic budget: the plan may differ from run to run; raise the time limit",
                       time_limit_s)
    if best is None:
        return None
    bound = min(bounds) if bounds else best[1].objective_units
    return best[0], best[1], all_optimal, bound, num_variables, wall_hit


# ---------------------------------------------------------------- evaluation and tests


def step_time_s(decision: PlanDecision, costs: ModelCosts, cluster: Cluster, schedule: str) -> float:
    """Predicted step seconds of a decision: the model's objective, evaluated with the
    decision's integer shares (a stage takes as long as its slowest group,
    ``max_g share_g * t(g) + fixed(g)``) and ring all-reduces over the actual devices' links.

    >>> from hetcompile.ir import Block, ModelCosts
    >>> from cost_models.cluster import load_cluster
    >>> blocks = (Block(0, "h.0", 1e12, 0.0, 0, 0, 0.0, 0.0),)
    >>> cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 1}]})
    >>> one = PlanDecision((StageDecision(0, 0, (0,), (4,)),), num_microbatches=2, microbatch_size=4)
    >>> round(step_time_s(one, ModelCosts(blocks, 8, "bf16"), cluster, "1f1b"), 6)  # 8 samples x 3 x 6.41 ms
    0.153846
    """
    problems: dict[int, _Problem] = {}
    stage_times, allreduce_times = [], []
    for st in decision.stages:
        tp = st.tp
        if tp not in problems:
            problems[tp] = _Problem(costs, cluster, decision.num_microbatches, schedule, tp=tp, cross_node_tp=True)
        problem = problems[tp]
        compute_units = 0
        for i in range(0, len(st.devices), tp):
            group = st.devices[i:i + tp]
            v = problem.kind_of_group([cluster.devices[d].type for d in group], st.tp_parts)
            assert v is not None, f"no kind for TP group {group} with parts {st.tp_parts}"
            compute_units = max(compute_units, st.shares[i] * problem.kind_units(v, st.first_block, st.last_block,
                                                                                 st.recompute)
                                + problem.kind_fixed(v, st.first_block, st.last_block, st.recompute))
        stage_times.append(compute_units / TIME_UNITS_PER_S)
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        parts = st.tp_parts or (1,) * tp
        allreduce_times.append(max(
            allreduce_time_s(sum(b.param_bytes * tp_share(b.tp_param_fraction, parts[i], sum(parts)) for b in blocks),
                             cluster, st.devices[i::tp], gradients=True) for i in range(tp)))
    any_problem = problems[1 if 1 in problems else next(iter(problems))]
    sends = [any_problem.cut_send(st.first_block, max(max(a.shares), max(st.shares))) / TIME_UNITS_PER_S
             for a, st in zip(decision.stages, decision.stages[1:])]
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
    tp: int | None = None,
    dp: int | None = None,
) -> tuple[PlanDecision, float]:
    """Exhaustive search over the model's own variables and costs, for tests on tiny instances.

    Returns the best decision and its objective in seconds (the same integer
    cost the CP-SAT model minimises, so the two optima are equal exactly).
    Kinds as :func:`solve` first tries them (TP groups inside nodes only).
    """
    problem = _Problem(costs, cluster, num_microbatches, schedule, allow_recompute, tp=tp, dp=dp)
    limit = problem.max_stages(max_stages)
    nb, b = problem.num_blocks, problem.microbatch_size
    count_options = [range(problem.kind_top[v] + 1) for v in range(problem.num_kinds)]
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
