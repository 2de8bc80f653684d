"""Why a plan: its bottleneck, what bounds it, and the alternatives it beat (``hetcompile explain OUT``).

Works from the output directory alone: the model's block costs are stored in
``plan.json`` (``costs``), the cluster too, and every alternative is predicted
by the one predictor, :func:`hetcompile.predict.predict` (stage times, then
the schedule simulator), exactly as the plan itself was.

>>> import hetcompile
>>> print(format_explain(explain(hetcompile.load("out/gpt2"))))  # doctest: +SKIP

NOTE: [Which stage is the bottleneck]
The simulator's view: the stage whose compute track is busy the longest in the
predicted step (:func:`hetcompile.timeline.busiest_stage`). In steady state
every stage runs at that stage's pace, so it is the one to speed up. What
bounds it is read off the same numbers, in this order: the exposed gradient
all-reduce or the activation transfers when they rival its compute (a link),
a full device next to it or in it (memory: layers cannot move there), else its
compute, split by the roofline into FLOP-bound and memory-bandwidth-bound.
"""

from __future__ import annotations

import logging
import textwrap

from cost_models.cluster import load_cluster
from cost_models.roofline import COMPUTE_EFFICIENCY, MEMORY_EFFICIENCY, block_time_s
from hetcompile.errors import UserError
from hetcompile.predict import link, predict
from hetcompile.report import format_bytes, format_devices, format_rate, format_time, format_tp, layer_ranges
from hetcompile.timeline import busiest_stage, plan_timeline

__all__ = ["explain", "format_explain"]

log = logging.getLogger(__name__)

# A device this full cannot take more layers or samples: the plan's shape is set by memory.
MEMORY_FULL_FRACTION = 0.9
# Transfers per micro-batch at least this fraction of the stage's compute keep it waiting on the link.
LINK_BOUND_FRACTION = 0.5


def _and(items) -> str:
    """``[0, 3]`` -> ``"0 and 3"``; ``[0, 1, 3]`` -> ``"0, 1 and 3"``."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _busy_s(timeline) -> dict[int, float]:
    busy: dict[int, float] = {}
    for span in timeline.spans:
        if span.kind in ("F", "B"):
            busy[span.stage] = busy.get(span.stage, 0.0) + span.duration_s
    return busy


def _bottleneck(plan, timeline, cluster) -> dict:
    """The busiest stage and what bounds it. See NOTE: [Which stage is the bottleneck]."""
    s = busiest_stage(timeline)
    st, preds = plan.stages[s], plan.predicted["stages"]
    pred = preds[s]
    by_rank = {r.rank: r for r in plan.ranks}
    devices = [by_rank[r].device_index for r in st.ranks]
    types = [by_rank[r].device_type for r in st.ranks]
    step_s = timeline.step_time_s
    compute_mb_s = pred["fwd_s"] + pred["bwd_s"]
    busy_s = _busy_s(timeline)[s]
    compute_end_s = max(span.end_s for span in timeline.spans if span.kind in ("F", "B"))
    exposed_allreduce_s = step_s - compute_end_s
    out = {"stage": s, "devices": _devices_text(types, st.tp, st.tp_parts), "layers": layer_ranges(st.block_names),
           "busy_s": busy_s, "busy_fraction": busy_s / step_s if step_s else 0.0,
           "compute_per_microbatch_s": compute_mb_s}

    # 1. A link: the gradient all-reduce after the last backward, exposed at the end of the step.
    if exposed_allreduce_s > 0 and exposed_allreduce_s >= 0.25 * step_s:
        # The longest all-reduce: a stage's own, or one of parameters several stages share.
        k = max(range(len(preds)), key=lambda i: preds[i]["allreduce_s"])
        shared = max(plan.predicted.get("shared_allreduce", ()), key=lambda g: g["seconds"], default=None)
        if shared is not None and shared["seconds"] > preds[k]["allreduce_s"]:
            stages, seconds = shared["stages"], shared["seconds"]
            what = f"the all-reduce of the parameters stages {_and(stages)} share (tied weights)"
            fix = "those stages on one node, or a faster link between them, would help"
        else:
            stages, seconds = [k], preds[k]["allreduce_s"]
            what = f"the gradient all-reduce of stage {k}"
            fix = "fewer data-parallel replicas of that stage, or a faster link between them, would help"
        k_devices = list(dict.fromkeys(by_rank[r].device_index for i in stages for r in plan.stages[i].ranks))
        ring_gbps = min(cluster.link_bw_bytes_per_s(a, b)
                        for a, b in zip(k_devices, k_devices[1:] + k_devices[:1])) / 1e9
        return {**out, "bound": "link",
                "reason": f"{what} over {len(k_devices)} devices ({ring_gbps:g} GB/s ring) takes "
                          f"{format_time(seconds)}, {exposed_allreduce_s / step_s * 100:.0f}% of the step after "
                          f"the last backward; {fix}"}
    # 2. A link: activations (forward) or their gradients (backward) between neighbouring stages.
    # The links next to the stage; every link when the stage idles most of the step (then
    # the step is not set by its compute but by waiting, usually on the slowest transfer).
    near = out["busy_fraction"] >= 0.5
    transfers = []
    for a in range(len(plan.stages) - 1):
        if near and a not in (s - 1, s):
            continue
        group_a = [by_rank[r].device_index for r in plan.stages[a].ranks]
        group_b = [by_rank[r].device_index for r in plan.stages[a + 1].ranks]
        transfers.append((max(preds[a]["send_fwd_s"], preds[a + 1]["send_bwd_s"]), a, a + 1,
                          link(cluster, group_a, group_b)[0] / 1e9))
    if transfers:
        send_s, a, b, gbps = max(transfers)
        if send_s >= LINK_BOUND_FRACTION * compute_mb_s:
            return {**out, "bound": "link",
                    "reason": f"moving a micro-batch's activations between stages {a} and {b} "
                              f"({gbps:g} GB/s) takes {format_time(send_s)} against {format_time(compute_mb_s)} "
                              "of compute; a cut with smaller activations or a faster link would help"}
    # 3. Memory: devices of this stage or its neighbours are full, so layers cannot move to them.
    memory = {m["device_index"]: m for m in plan.predicted["memory"]}
    full = []
    for t in (s - 1, s, s + 1):
        if 0 <= t < len(plan.stages):
            for r in plan.stages[t].ranks:
                m = memory.get(by_rank[r].device_index)
                if m and m["capacity_bytes"] and m["mem_bytes"] >= MEMORY_FULL_FRACTION * m["capacity_bytes"]:
                    full.append((m["mem_bytes"] / m["capacity_bytes"], t, m))
    if full:
        frac, t, m = max(full, key=lambda f: f[0])
        where = "its own devices are" if t == s else f"stage {t}'s devices are"
        return {**out, "bound": "memory",
                "reason": f"{where} full (device {m['device_index']}, {m['device_type']}: "
                          f"{format_bytes(m['mem_bytes'])} of {format_bytes(m['capacity_bytes'])}, {frac * 100:.0f}%), "
                          "so no layers can move off this stage; devices with more memory, or fewer micro-batches "
                          "in flight (1f1b), would help"}
    # 4. Compute: the slowest replica, and whether its blocks are FLOP- or bandwidth-bound.
    return {**out, "bound": "compute", "reason": _compute_reason(plan, s, cluster)}


def _devices_text(types, tp: int, parts) -> str:
    return format_devices(types) + (f", {format_tp(tp, parts)}" if tp > 1 else "")


def _compute_reason(plan, s: int, cluster) -> str:
    st = plan.stages[s]
    by_rank = {r.rank: r for r in plan.ranks}
    costs = plan.model_costs() if plan.costs else None
    # The slowest replica: the largest share on the slowest type sets the stage's pace.
    slowest = max(zip(st.ranks, st.shares),
                  key=lambda rs: rs[1] / cluster.type_of(by_rank[rs[0]].device_type).peak_flops_per_s(
                      costs.dtype if costs else "fp32"))
    rank, share = slowest
    dev = cluster.type_of(by_rank[rank].device_type)
    text = (f"its slowest replica (rank {rank}, {dev.name}) runs {share} sample{'s' if share > 1 else ''} per "
            f"micro-batch through {st.last_block - st.first_block + 1} blocks")
    if costs is None:
        return text
    blocks = costs.blocks[st.first_block:st.last_block + 1]
    flop_s = sum(b.fwd_flops_per_sample for b in blocks) / (dev.peak_flops_per_s(costs.dtype) * COMPUTE_EFFICIENCY)
    byte_s = sum(b.fwd_bytes_per_sample for b in blocks) / (dev.mem_bw_bytes_per_s * MEMORY_EFFICIENCY)
    if flop_s >= byte_s:
        return (f"{text}; its blocks are FLOP-bound ({dev.peak_flops_per_s(costs.dtype) / 1e12:g} TFLOP/s "
                f"{costs.dtype} peak), so only faster devices or more replicas would shorten it")
    return (f"{text}; its blocks are memory-bandwidth-bound ({dev.mem_GBps:g} GB/s HBM), "
            "so larger micro-batches or fused kernels would shorten it")


def _alternatives(plan, cluster, time_limit_s: float) -> list[dict]:
    from hetcompile import baselines
    from hetcompile.planner import solve

    costs = plan.model_costs()
    m, schedule = plan.num_microbatches, plan.schedule
    num_stages = len(plan.stages)
    candidates = [
        ("even split", "equal layers per stage, equal batch per device, every device (type-blind)",
         lambda: baselines.even_split(costs, cluster, num_microbatches=m, schedule=schedule)),
        ("fastest type only", "the planner's best plan on the fastest device type, the others idle",
         lambda: baselines.fastest_type_only(costs, cluster, num_microbatches=m, schedule=schedule,
                                             seed=plan.seed)),
    ]
    if schedule == "interleaved":
        candidates.append(("not interleaved", "the planner's best 1F1B plan, one stage per device group",
                           lambda: solve(costs, cluster, num_microbatches=m, schedule="1f1b",
                                         time_limit_s=time_limit_s, seed=plan.seed)[0]))
    elif num_stages > 1:
        candidates.append((f"at most {num_stages - 1} stage{'s' if num_stages > 2 else ''}",
                           "the planner's best plan with one fewer pipeline stage",
                           lambda: solve(costs, cluster, num_microbatches=m, schedule=schedule,
                                         max_stages=num_stages - 1, time_limit_s=time_limit_s, seed=plan.seed)[0]))
    out = []
    for name, what, make in candidates:
        entry = {"name": name, "what": what, "step_time_s": None, "samples_per_s": None, "num_stages": None,
                 "devices": None, "slower_by": None}
        try:
            decision = make()
        except UserError as e:
            log.info("alternative %r is not possible: %s", name, e)
            # The message's first sentence says why nothing fits; that is why it lost.
            entry["reason"] = f"not possible: {str(e).split('. ')[0].rstrip('.')}"
            out.append(entry)
            continue
        predicted, timeline = predict(decision, costs, cluster, decision.schedule)
        step_s = predicted["step_time_s"]
        entry.update(step_time_s=step_s, samples_per_s=predicted["samples_per_s"],
                     num_stages=len(decision.stages),
                     devices=format_devices([cluster.devices[d].type for st in decision.stages for d in st.devices]),
                     slower_by=step_s / plan.predicted["step_time_s"] - 1 if plan.predicted["step_time_s"] else None)
        entry["reason"] = _why_lost(plan, decision, predicted, timeline, cluster)
        out.append(entry)
    return out


def _same_decision(plan, decision) -> bool:
    mine = [(st.first_block, st.last_block, tuple(sorted(zip(
        [next(r.device_index for r in plan.ranks if r.rank == k) for k in st.ranks], st.shares))))
        for st in plan.stages]
    theirs = [(st.first_block, st.last_block, tuple(sorted(zip(st.devices, st.shares)))) for st in decision.stages]
    if [(st.tp, tuple(st.tp_parts)) for st in plan.stages] != [(st.tp, st.tp_parts) for st in decision.stages]:
        return False
    return mine == theirs and decision.num_microbatches == plan.num_microbatches


def _why_lost(plan, decision, predicted, timeline, cluster) -> str:
    if _same_decision(plan, decision):
        return "the same decision as this plan"
    over = [m for m in predicted["memory"] if m["mem_bytes"] > m["capacity_bytes"]]
    if over:
        m = max(over, key=lambda m: m["mem_bytes"] / m["capacity_bytes"])
        return (f"does not fit: device {m['device_index']} ({m['device_type']}) would need "
                f"{format_bytes(m['mem_bytes'])} of {format_bytes(m['capacity_bytes'])}")
    mine_s = plan.predicted["step_time_s"]
    step_s = predicted["step_time_s"]
    if step_s < mine_s * (1 - 1e-6) and plan.solver.get("status") == "PINNED":
        return (f"predicted {(1 - step_s / mine_s) * 100:.1f}% faster: this plan's decision was pinned by hand "
                "(compile(..., decision=...)), not chosen by the planner")
    if step_s < mine_s * (1 - 1e-6) and plan.schedule == "interleaved" != decision.schedule:
        return (f"predicted {(1 - step_s / mine_s) * 100:.1f}% faster: the interleaved schedule was asked for, and "
                "its extra transfers cost more here than the fill and drain it saves; --schedule auto takes the "
                "faster")
    if step_s < mine_s * (1 - 1e-6):
        return (f"predicted {(1 - step_s / mine_s) * 100:.1f}% faster by the simulator; the planner's objective "
                "(fill-drain plus M-1 times the slowest stage, transfers priced at inter-node speed) ranked it "
                "lower, or the solver stopped early: recompile with a longer --time-limit")
    k = busiest_stage(timeline)
    st = decision.stages[k]
    s_pred = predicted["stages"][k]
    theirs = s_pred["fwd_s"] + s_pred["bwd_s"]
    b = busiest_stage(plan_timeline(plan))
    mine_pred = plan.predicted["stages"][b]
    mine = mine_pred["fwd_s"] + mine_pred["bwd_s"]
    types = format_devices([cluster.devices[d].type for d in st.devices])
    costs = plan.model_costs()
    blocks = costs.blocks[st.first_block:st.last_block + 1]
    # The replica that sets the stage's pace: largest share x per-sample time.
    slow_d, slow_share = max(zip(st.devices, st.shares), key=lambda ds: ds[1] * sum(
        sum(block_time_s(b, cluster.type_of(cluster.devices[ds[0]].type), costs.dtype)) for b in blocks))
    slow = f"{slow_share} sample{'s' if slow_share > 1 else ''} on one {cluster.devices[slow_d].type}"
    text = (f"its bottleneck, stage {k} ({types}, {st.last_block - st.first_block + 1} blocks), computes "
            f"{format_time(theirs)} per micro-batch ({slow}) against {format_time(mine)} here")
    if timeline.bubble_fraction > plan.predicted["bubble_fraction"] + 0.05:
        text += f"; bubbles {timeline.bubble_fraction * 100:.0f}% against {plan.predicted['bubble_fraction'] * 100:.0f}%"
    tail = max([s_pred["allreduce_s"] for s_pred in predicted["stages"]]
               + [g["seconds"] for g in predicted.get("shared_allreduce", ())])
    if tail > 0.2 * step_s:
        text += f"; its gradient all-reduce takes {format_time(tail)}"
    return text


def explain(plan, *, time_limit_s: float = 10.0) -> dict:
    """Why ``plan``: its bottleneck and what bounds it, and the rejected alternatives with why each lost.

    Plain data (times in seconds); :func:`format_explain` renders it. The
    alternatives re-plan with the stored costs and need ``costs`` in plan.json.
    """
    cluster = load_cluster(plan.cluster)
    timeline = plan_timeline(plan)
    busy = _busy_s(timeline)
    by_rank = {r.rank: r for r in plan.ranks}
    stages = [{"stage": st.index, "devices": _devices_text([by_rank[r].device_type for r in st.ranks], st.tp,
                                                          st.tp_parts),
               "compute_per_microbatch_s": pred["fwd_s"] + pred["bwd_s"],
               "busy_fraction": busy.get(st.index, 0.0) / timeline.step_time_s if timeline.step_time_s else 0.0}
              for st, pred in zip(plan.stages, plan.predicted["stages"])]
    return {
        "plan": plan.fingerprint,
        "schedule": plan.schedule,
        "num_microbatches": plan.num_microbatches,
        "step_time_s": plan.predicted["step_time_s"],
        "samples_per_s": plan.predicted["samples_per_s"],
        "bubble_fraction": plan.predicted["bubble_fraction"],
        "bottleneck": _bottleneck(plan, timeline, cluster),
        "stages": stages,
        # Plans without stored block costs cannot re-plan; the rest of the explanation still holds.
        "alternatives": _alternatives(plan, cluster, time_limit_s) if plan.costs else [],
    }


def _wrap(text: str, indent: str, width: int = 110) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def format_explain(report: dict) -> str:
    """The explanation as text (what ``hetcompile explain OUT`` prints)."""
    b = report["bottleneck"]
    lines = [f"plan {report['plan']}: predicted step {format_time(report['step_time_s'])}, "
             f"{format_rate(report['samples_per_s'])} samples/s ({report['schedule']}, {report['num_microbatches']} "
             f"micro-batches, bubble {report['bubble_fraction'] * 100:.0f}%)",
             "",
             f"bottleneck: stage {b['stage']} ({b['devices']}; {b['layers']})",
             f"  computes {format_time(b['compute_per_microbatch_s'])} per micro-batch, busy "
             f"{b['busy_fraction'] * 100:.0f}% of the step",
             *_wrap(f"bound by {b['bound']}: {b['reason']}", "  "),
             "",
             "stages (busy: forward + backward time over the step)"]
    for st in report["stages"]:
        mark = "  <- bottleneck" if st["stage"] == b["stage"] else ""
        lines.append(f"  stage {st['stage']:<3}{st['devices']:<30}{format_time(st['compute_per_microbatch_s']):>10} "
                     f"per micro-batch, busy {st['busy_fraction'] * 100:3.0f}%{mark}")
    if not report["alternatives"]:
        lines += ["", "alternatives: none (plan.json has no block costs; recompile the plan to compare)"]
        return "\n".join(lines)
    lines += ["", "alternatives (same cost model and simulator)",
              f"  {'this plan':<24}{format_time(report['step_time_s']):>10}  {format_rate(report['samples_per_s']):>10} samples/s"]
    for alt in report["alternatives"]:
        if alt["step_time_s"] is None:
            lines.append(f"  {alt['name']:<24}{'-':>10}")
            lines += _wrap(f"why: {alt['reason']}", " " * 26)
            continue
        slower = "" if alt["slower_by"] is None else f" ({alt['slower_by'] * 100:+.0f}% step time)"
        lines.append(f"  {alt['name']:<24}{format_time(alt['step_time_s']):>10}  {format_rate(alt['samples_per_s']):>10} "
                     f"samples/s{slower}, {alt['num_stages']} stage{'s' if alt['num_stages'] > 1 else ''} on "
                     f"{alt['devices']}")
        lines += _wrap(f"why: {alt['reason']}", " " * 26)
    return "\n".join(lines)
