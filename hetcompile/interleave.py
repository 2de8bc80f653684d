"""Interleaved 1F1B: the planner's last step, which cuts each device group's layers into chunks.

NOTE: [interleaving a solved plan]
The CP-SAT search (hetcompile/planner.py) chooses stages, device groups, shares,
TP and recompute for a pipeline of ``p`` stages. Interleaving keeps all of that
and only changes which layers each group runs: group g's ``L_g`` layers are cut
into ``chunks`` pieces of ``L_g / chunks`` layers, and the model goes round the
groups ``chunks`` times (stage ``c * p + g`` is chunk c of group g). Every group
keeps its number of layers, so the load balance the solver found is kept, while
the pipeline's fill and drain shrink ``chunks`` times; the price is ``chunks``
times more activation transfers between groups and more micro-batches in flight
on the first groups. The one predictor (hetcompile/predict.py) weighs the two:
a chunk count is taken only when the predicted step is faster and every device
still fits in memory.

The search hands over its plan and its close runners-up (hetcompile/planner.py,
INTERLEAVE_SLACK and INTERLEAVE_RUNNERS_UP), not only the best: a runner-up may
have the micro-batch count or the layers per group that interleaving needs.
Handing over far more (every plan within 2x, up to 50) left all 18 plans of
``benchmarks/plan_quality.py`` as they were (2026-11-24). The chunk count is
not a CP-SAT variable: a plan that is good only interleaved and far from every
plan the search found would be missed.
"""

from __future__ import annotations

import dataclasses
import logging

from hetcompile.errors import UserError
from hetcompile.predict import predict

logger = logging.getLogger(__name__)

MAX_CHUNKS = 4  # Megatron's usual range; more chunks add transfers faster than they cut the bubble


def interleaved(decision, chunks: int):
    """``decision`` (one stage per device group) with each group's layers cut into ``chunks`` stages,
    or None when some group has fewer layers than chunks or the micro-batches are not a multiple
    of the groups.

    >>> from hetcompile.planner import PlanDecision, StageDecision
    >>> plan = PlanDecision((StageDecision(0, 3, (0,), (2,)), StageDecision(4, 5, (1,), (2,))), 2, 2)
    >>> [(s.first_block, s.last_block, s.devices) for s in interleaved(plan, 2).stages]
    [(0, 1, (0,)), (2, 2, (1,)), (3, 4, (0,)), (5, 5, (1,))]
    """
    groups = decision.stages
    p = len(groups)
    if decision.chunks != 1 or p < 2 or decision.num_microbatches % p:
        return None
    sizes = [st.last_block - st.first_block + 1 for st in groups]
    if min(sizes) < chunks:
        return None
    stages, first = [], 0
    for c in range(chunks):
        for st, n in zip(groups, sizes):
            layers = n // chunks + (c < n % chunks)  # the first chunks take the remainder
            stages.append(dataclasses.replace(st, first_block=first, last_block=first + layers - 1))
            first += layers
    return dataclasses.replace(decision, stages=tuple(stages), schedule="interleaved")


def best_interleaving(decision, costs, cluster, *, required: bool = False, runners_up=()):
    """The fastest of ``decision`` and the interleavings that fit in memory (NOTE: [interleaving a
    solved plan]) of ``decision`` and of ``runners_up`` (close plans of the search, best first);
    with ``required`` (the user asked for the interleaved schedule) the fastest interleaving that
    fits, or a UserError saying why there is none.

    A runner-up can win only interleaved: it may have the micro-batch count, or the layers per
    group, that interleaving needs, or a pipeline whose fill and drain interleaving cuts more.
    """

    def fits(predicted) -> bool:
        return all(m["mem_bytes"] <= m["capacity_bytes"] for m in predicted["memory"])

    candidates = [c for d in (decision, *runners_up)
                  for c in (interleaved(d, chunks) for chunks in range(2, MAX_CHUNKS + 1)) if c]
    best, best_s = None, float("inf")
    if candidates and not required:  # (a simulation of a big plan takes a second: only when needed)
        best, best_s = decision, predict(decision, costs, cluster, decision.schedule)[0]["step_time_s"]
    for candidate in candidates:
        predicted, _ = predict(candidate, costs, cluster, "interleaved")
        logger.debug("interleave %d groups x %d chunks (M=%d): %.6f s (fits %s), against %.6f s",
                     len(candidate.stages) // candidate.chunks, candidate.chunks, candidate.num_microbatches,
                     predicted["step_time_s"], fits(predicted), best_s)
        if fits(predicted) and predicted["step_time_s"] < best_s:
            best, best_s = candidate, predicted["step_time_s"]
    if best is None and not required:
        return decision
    if best is None:
        p, m = len(decision.stages), decision.num_microbatches
        raise UserError(
            f"The interleaved schedule does not apply to the best plan found: it has {p} pipeline stage"
            f"{'s' if p > 1 else ''} ({m} micro-batch{'es' if m != 1 else ''}), and interleaving needs at least 2 "
            "stages, a micro-batch count that is a multiple of the stages, at least 2 layers per stage and room "
            "in memory for the extra micro-batches in flight. Use --schedule 1f1b, or pin more stages with --pp "
            "and a micro-batch count with --microbatches.")
    return best
