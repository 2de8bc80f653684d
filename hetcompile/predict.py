"""Predictions for a decision: stage times from the cost models, then the schedule simulator.

This is the one predictor: the compile summary, ``plan.json``'s ``predicted``
section and the timeline all come from :func:`predict`.
"""

from __future__ import annotations

import bisect
from collections import Counter

from cost_models.comm import allreduce_time_s, p2p_time_s
from cost_models.memory import stage_memory_bytes, tp_share
from cost_models.roofline import block_overhead_s, block_time_s, optimizer_time_s, stage_call_overhead_s
from hetcompile.ir import ModelCosts, SharedParams
from hetcompile.schedule import BACKWARD, FORWARD, SEND_B, SEND_F, Timeline, make_schedule, simulate

# Rounds of the fixed point that slows compute on nodes whose ranks share cores (_share_cores),
# and the relative change of every stage's time at which it stops.
SHARING_ROUNDS = 50
SHARING_TOLERANCE = 1e-4


def link(cluster, group_a, group_b) -> tuple[float, float]:
    """Slowest bandwidth and latency between two device groups: pieces go between every pair."""
    bw = min(cluster.link_bw_bytes_per_s(a, b) for a in group_a for b in group_b)
    lat = max(cluster.link_latency_s(a, b) for a in group_a for b in group_b)
    return bw, lat


def stage_times(decision, costs: ModelCosts, cluster) -> dict[str, list[float]]:
    """Per stage: forward and backward seconds of one micro-batch (slowest replica), sends, all-reduce."""
    devices = cluster.devices
    fwd, bwd, send_fwd, send_bwd, allreduce, update = [], [], [], [], [], []
    notice_fwd, notice_bwd = [], []  # a receive's notice to the sender (NOTE: [receives posted in program order])
    # Every rank joins end_step's all-reduce of the loss, so every stage pays it.
    loss_sync_s = allreduce_time_s(8, cluster, list(dict.fromkeys(d for st in decision.stages for d in st.devices)))
    stages = decision.stages
    shared = _shared_across_stages(decision, costs)
    for s, st in enumerate(stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        tp, parts = _tp_parts(st)
        per_device = _member_compute_s(st, costs, cluster)
        f_s, b_s = max(f for f, _ in per_device), max(b for _, b in per_device)
        if tp > 1:  # each block all-reduces its TP activations over the group, forward and backward alike
            tp_comm_s = max(sum(allreduce_time_s(b.tp_comm_bytes_per_sample * st.shares[i], cluster,
                                                 st.devices[i:i + tp]) for b in blocks)
                            for i in range(0, len(st.devices), tp))
            f_s, b_s = f_s + tp_comm_s, b_s + tp_comm_s
        # NOTE: [posting a transfer] in cost_models/profile.py: each send or receive this stage posts
        # (one per cut and direction) takes its rank's own time.
        posts = _post_s(st, cluster) * ((s > 0) + (s + 1 < len(stages)))
        fwd.append(f_s + posts)
        bwd.append(b_s + (f_s if st.recompute else 0.0) + posts)  # recompute: forward again
        if s + 1 < len(stages):
            out_bytes = _cut_rows(st, stages[s + 1]) * costs.blocks[st.last_block].out_bytes_per_sample
            bw, lat = link(cluster, st.devices, stages[s + 1].devices)
            send_fwd.append(p2p_time_s(out_bytes, bw, lat))
            notice_fwd.append(lat if out_bytes > 0 else 0.0)
        else:
            send_fwd.append(0.0)
            notice_fwd.append(0.0)
        if s > 0:
            prev = stages[s - 1]
            in_bytes = _cut_rows(prev, st) * costs.blocks[prev.last_block].out_bytes_per_sample
            bw, lat = link(cluster, prev.devices, st.devices)
            send_bwd.append(p2p_time_s(in_bytes, bw, lat))
            notice_bwd.append(lat if in_bytes > 0 else 0.0)
        else:
            send_bwd.append(0.0)
            notice_bwd.append(0.0)
        param_bytes = sum(b.param_bytes for b in blocks)
        # Under TP, member i of every replica all-reduces its own shard with its peers; parameters
        # that other stages use too are summed with those (shared_allreduce below), not here.
        crossing = sum(sp.param_bytes for sp, _ in shared if st.first_block <= sp.blocks[0] <= st.last_block)
        allreduce.append(max(allreduce_time_s(max(_shard_bytes(blocks, parts[i], sum(parts)) - crossing, 0.0),
                                              cluster, list(st.devices[i::tp]), gradients=True) for i in range(tp)))
        # A rank steps its optimizer, and joins the loss's all-reduce, once, however many
        # (interleaved) stages it runs.
        first_on_ranks = all(stages[e].devices != st.devices for e in range(s))
        num_tensors = sum(b.num_param_tensors for b in blocks)
        optimizer_s = max(optimizer_time_s(num_tensors, param_bytes, cluster.type_of(devices[d].type),
                                           costs.optimizer, whole_step=first_on_ranks) for d in st.devices)
        # Only a profiled cost model charges the step's tail (the datasheet one predicts compute and links).
        update.append(optimizer_s + loss_sync_s * first_on_ranks if optimizer_s > 0 else 0.0)
    # The all-reduce of each set of parameters that blocks of several stages use (tied embeddings:
    # lowering.grad_groups puts them in a group of every rank of those stages); interleaved stages
    # of one rank hold them once, so each device is one member.
    shared_allreduce = []
    for sp, members in shared:
        group = list(dict.fromkeys(d for s in members for d in stages[s].devices))
        shared_allreduce.append((members, allreduce_time_s(sp.param_bytes, cluster, group, gradients=True)))
    return {"fwd_s": fwd, "bwd_s": bwd, "send_fwd_s": send_fwd, "send_bwd_s": send_bwd, "allreduce_s": allreduce,
            "update_s": update, **_notices(decision, cluster, notice_fwd, notice_bwd),
            "shared_allreduce_s": shared_allreduce}


def _shared_across_stages(decision, costs: ModelCosts) -> list[tuple[SharedParams, tuple[int, ...]]]:
    """The model's shared parameters (ModelCosts.shared_params) that blocks of several stages use,
    with those stages."""
    if not costs.shared_params:
        return []
    stage_of = {b: s for s, st in enumerate(decision.stages) for b in range(st.first_block, st.last_block + 1)}
    out = []
    for sp in costs.shared_params:
        stages = tuple(sorted({stage_of[b] for b in sp.blocks}))
        if len(stages) > 1:
            out.append((sp, stages))
    return out


def _member_compute_s(st, costs: ModelCosts, cluster) -> list[tuple[float, float]]:
    """Per device of a stage: its forward and backward compute seconds of one micro-batch (no TP
    all-reduces, no recompute)."""
    devices = cluster.devices
    blocks = costs.blocks[st.first_block:st.last_block + 1]
    tp, parts = _tp_parts(st)
    priced: dict[tuple, tuple[float, float]] = {}
    out = []
    for i, (d, share) in enumerate(zip(st.devices, st.shares)):
        key = (devices[d].type, share, parts[i % tp])
        if key not in priced:  # replicas of one type with one share take the same time: price each once
            dev_type = cluster.type_of(devices[d].type)
            per = [block_time_s(b, dev_type, costs.dtype, samples=share) for b in blocks]
            fixed = [block_overhead_s(b, dev_type, samples=share) for b in blocks]  # per call
            fixed.append(stage_call_overhead_s(dev_type))  # the stage's own call and backward call
            # TP: a member with part p of P runs (1 - f) + f p/P of each block (f = tp_flops_fraction).
            x = [tp_share(b.tp_flops_fraction, parts[i % tp], sum(parts)) for b in blocks]
            priced[key] = (share * sum(p[0] * y for p, y in zip(per, x)) + sum(o[0] for o in fixed),
                           share * sum(p[1] * y for p, y in zip(per, x)) + sum(o[1] for o in fixed))
        out.append(priced[key])
    return out


def _measured_links(cluster, device: int):
    """The links measured on the runtime for a device's type (its profile's ``comm``), or None."""
    profile = cluster.type_of(cluster.devices[device].type).profile
    return profile.comm if profile is not None else None


def _post_s(st, cluster) -> float:
    """Seconds a rank of the stage spends posting one send or receive: measured on the runtime
    (a profile with links), else 0, like the notices."""
    links = [_measured_links(cluster, d) for d in st.devices]
    return max((c.p2p_post_s for c in links if c is not None), default=0.0)


def _cut_rows(producer, consumer) -> int:
    """Samples of a micro-batch through the busiest device's link at the cut from ``producer`` to
    ``consumer``: each device sends and receives only its own rows (lowering.transfers; one NIC per
    device, cost_models/cluster.py), and a producer TP member feeds ``consumer.tp / producer.tp``
    consumer members."""
    fan_out = -(-consumer.tp // producer.tp)
    return max(max(producer.shares) * fan_out, max(consumer.shares))


def _notices(decision, cluster, notice_fwd, notice_bwd) -> dict[str, list[float]]:
    """The receive notices (NOTE: [receives posted in program order]) when every device's links were
    measured on the runtime (a profile with links): the datasheet model leaves them out."""
    measured = all(_measured_links(cluster, d) is not None for st in decision.stages for d in st.devices)
    return {"notice_fwd_s": notice_fwd, "notice_bwd_s": notice_bwd} if measured else {}


def _tp_parts(st) -> tuple[int, tuple[int, ...]]:
    """A stage's TP degree and its members' parts (even parts spelled out)."""
    return st.tp, st.tp_parts or (1,) * st.tp


def _shard_bytes(blocks, part: int, total: int) -> float:
    """Parameter bytes a TP member with ``part`` of ``total`` holds (all of them without TP)."""
    return sum(b.param_bytes * tp_share(b.tp_param_fraction, part, total) for b in blocks)


def predict(decision, costs: ModelCosts, cluster, schedule: str) -> tuple[dict, Timeline]:
    """What the cost model expects of ``decision``: step time, throughput, bubbles, memory per device."""
    times = stage_times(decision, costs, cluster)
    actions = make_schedule(schedule, len(decision.stages), decision.num_microbatches, decision.chunks)
    timeline = simulate(actions, **times)
    capacity = _shared_core_capacity(decision, cluster)
    if capacity:
        times, timeline = _share_cores(actions, times, timeline, decision, costs, cluster, capacity)
    devices = cluster.devices
    memory: dict[int, dict] = {}  # per device, the sum over its stages
    for s, st in enumerate(decision.stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        in_bytes = costs.blocks[st.first_block - 1].out_bytes_per_sample if st.first_block > 0 else 0.0
        tp, parts = _tp_parts(st)
        for i, (d, share) in enumerate(zip(st.devices, st.shares)):
            # TP: a member keeps (1 - g) + g p/P of the parameters, activations as its compute.
            param_bytes = _shard_bytes(blocks, parts[i % tp], sum(parts))
            act = sum(b.act_bytes_per_sample * tp_share(b.tp_flops_fraction, parts[i % tp], sum(parts))
                      for b in blocks)
            dev_type = cluster.type_of(devices[d].type)
            m = memory.setdefault(d, {"device_index": d, "device_type": dev_type.name, "stages": [], "mem_bytes": 0,
                                      "capacity_bytes": int(dev_type.mem_bytes)})
            m["stages"].append(s)
            m["mem_bytes"] += int(stage_memory_bytes(param_bytes, act, in_bytes, share, timeline.peak_in_flight[s],
                                                     st.recompute))
    step = timeline.step_time_s
    return {
        "step_time_s": step,
        "samples_per_s": costs.global_batch / step if step > 0 else 0.0,
        "bubble_fraction": timeline.bubble_fraction,
        # All-reduces between stages that use the same parameters (tied embeddings), in program order.
        "shared_allreduce": [{"stages": list(stages), "seconds": seconds}
                             for stages, seconds in times["shared_allreduce_s"]],
        "stages": [{"fwd_s": times["fwd_s"][s], "bwd_s": times["bwd_s"][s], "send_fwd_s": times["send_fwd_s"][s],
                    "send_bwd_s": times["send_bwd_s"][s], "allreduce_s": times["allreduce_s"][s],
                    "update_s": times["update_s"][s],
                    **{k: times[k][s] for k in ("notice_fwd_s", "notice_bwd_s") if k in times},
                    "peak_in_flight": timeline.peak_in_flight[s]} for s in range(len(decision.stages))],
        "memory": [memory[d] for d in sorted(memory)],
    }, timeline


def _shared_core_capacity(decision, cluster) -> dict[int, float]:
    """Per node whose ranks outnumber its cores: how many ranks its cores run at full speed at once.

    Only a CPU type profiled with its core count says so (``hetcompile profile`` records them): one
    device is one rank of the profile's ``num_threads`` threads. Nodes that fit are left out.
    """
    devices = cluster.devices
    ranks = Counter(devices[d].node for d in {d for st in decision.stages for d in st.devices})
    capacity = {}
    for node, count in ranks.items():
        profile = cluster.type_of(cluster.nodes[node].device).profile
        if profile is not None and profile.device == "cpu" and profile.num_cores:
            ranks_at_once = profile.num_cores / max(profile.num_threads, 1)
            if count > ranks_at_once:
                capacity[node] = ranks_at_once
    return capacity


def _share_cores(actions, times: dict, timeline: Timeline, decision, costs: ModelCosts, cluster,
                 capacity: dict[int, float]) -> tuple[dict, Timeline]:
    """Stage times and timeline with compute slowed where more ranks compute at once than a node has cores.

    NOTE: [shared cores] A node of more ranks than cores (three CPU ranks on two cores, say)
    shares them: while n ranks compute on c cores, each runs at c/n of its speed (processor
    sharing), and a rank that waits for a message takes none (receives and, on such nodes, the
    all-reduces block: NOTE: [polling collectives] in hetcompile/runtime/collectives.py). The
    simulator gives every rank its own core, so the slowdown is found as a fixed point: from a
    timeline, each forward and backward span is slowed by the mean over its length of
    max(1, ranks computing / rank capacity) on its node (the worst node of its stage), each
    stage's times become its unshared times times its spans' mean slowdown, and the schedule
    is simulated again, until no stage time moves (damped: half of each round's change).
    A replica with a smaller share than the stage's slowest computes only the first part of
    each span (its own time over the slowest's) and leaves its core to the others for the rest.
    The same rounds charge each stage's sends, per direction, the part of them posted while the
    node's cores are full times what the profile measured such a send to take more
    (NOTE: [transfers on full cores] in cost_models/profile.py).
    On one CPU profile, GPT-2 in 2 stages with stage 0 on 2 ranks (shares 3:1) and stage 1 on a
    third, 3 gloo ranks on 2 cores, measured 218.7-247.8 ms a step over 7 runs; predicted 203.6
    ms with a core per rank, 241.2 ms counting every replica busy for the whole span, 216.0 ms
    as here (benchmarks/RESULTS.md, "Predictor accuracy").
    """
    devices = cluster.devices
    # Per stage, its ranks on shared nodes: (node, the part of the stage's forward and of its
    # backward span the rank computes). A replica with a smaller share finishes first and waits.
    members = []
    for st, fwd_s, bwd_s in zip(decision.stages, times["fwd_s"], times["bwd_s"]):
        members.append([(devices[d].node, f / fwd_s if fwd_s > 0 else 1.0,
                         (b + (f if st.recompute else 0.0)) / bwd_s if bwd_s > 0 else 1.0)
                        for d, (f, b) in zip(st.devices, _member_compute_s(st, costs, cluster))
                        if devices[d].node in capacity])
    unshared = {kind: list(times[key]) for kind, key in ((FORWARD, "fwd_s"), (BACKWARD, "bwd_s"),
                                                         (SEND_F, "send_fwd_s"), (SEND_B, "send_bwd_s"))}
    # NOTE: [transfers on full cores] in cost_models/profile.py: a send posted while every core
    # of its node computes takes the profile's full-cores latency instead of its own.
    extra = [_full_cores_extra_s(st, cluster) if row else 0.0 for st, row in zip(decision.stages, members)]
    slowdown = {kind: [1.0] * len(decision.stages) for kind in (FORWARD, BACKWARD)}
    full = {kind: [0.0] * len(decision.stages) for kind in (SEND_F, SEND_B)}
    for _ in range(SHARING_ROUNDS):
        busy = _busy_intervals(timeline, members)
        measured = _mean_slowdown(timeline, members, capacity, busy)
        on_full = _sends_on_full_cores(timeline, members, capacity, busy)
        moved = 0.0
        for kind, per_stage in slowdown.items():
            for s, old in enumerate(per_stage):
                new = 0.5 * (old + measured[kind].get(s, old))
                moved, per_stage[s] = max(moved, abs(new - old) / old), new
        for kind, per_stage in full.items():
            for s, old in enumerate(per_stage):
                new = 0.5 * (old + on_full[kind].get(s, old))
                base = unshared[kind][s]  # a send that takes no time stays at none
                moved, per_stage[s] = max(moved, abs(new - old) * extra[s] / base if base > 0 else 0.0), new
        times = {**times, "fwd_s": [t * x for t, x in zip(unshared[FORWARD], slowdown[FORWARD])],
                 "bwd_s": [t * x for t, x in zip(unshared[BACKWARD], slowdown[BACKWARD])],
                 # a stage with nothing to send (the last forward, the first backward) keeps 0
                 **{key: [t + f * x if t > 0 else 0.0 for t, f, x in zip(unshared[kind], full[kind], extra)]
                    for kind, key in ((SEND_F, "send_fwd_s"), (SEND_B, "send_bwd_s"))}}
        timeline = simulate(actions, **times)
        if moved < SHARING_TOLERANCE:
            break
    return times, timeline


def _full_cores_extra_s(st, cluster) -> float:
    """What a send of the stage takes over its latency when posted on full cores (NOTE: [transfers
    on full cores]): measured on the runtime (a CPU profile with links), else 0."""
    links = [c for c in (_measured_links(cluster, d) for d in st.devices) if c is not None]
    return max((max(c.p2p_full_cores_latency_s - c.p2p_latency_s, 0.0) for c in links), default=0.0)


def _busy_intervals(timeline: Timeline, members: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float]]:
    """(node, start, end) of each rank's computing on a shared node: from each span's start for its
    part of the span (NOTE: [shared cores])."""
    return [(node, span.start_s, span.start_s + (part_f if span.kind == FORWARD else part_b) * span.duration_s)
            for span in timeline.spans if span.kind in (FORWARD, BACKWARD) and span.duration_s > 0
            for node, part_f, part_b in members[span.stage]]


def _sends_on_full_cores(timeline: Timeline, members: list[list[tuple[int, float, float]]],
                         capacity: dict[int, float], busy: list[tuple[int, float, float]]) -> dict[str, dict[int, float]]:
    """Per direction and stage on shared nodes: the part of its sends posted while as many of its
    node's ranks compute as the node has room for (NOTE: [transfers on full cores])."""
    counts: dict[str, dict[int, list[int]]] = {SEND_F: {}, SEND_B: {}}
    for span in timeline.spans:
        if span.kind not in counts or not members[span.stage]:
            continue
        at = span.start_s + 1e-12  # the sender's next compute starts as the send is posted
        full = any(sum(1 for where, start, end in busy if where == node and start <= at < end) >= capacity[node]
                   for node in {node for node, _, _ in members[span.stage]})
        entry = counts[span.kind].setdefault(span.stage, [0, 0])
        entry[0] += full
        entry[1] += 1
    return {kind: {s: k / n for s, (k, n) in per_stage.items()} for kind, per_stage in counts.items()}


def _mean_slowdown(timeline: Timeline, members: list[list[tuple[int, float, float]]],
                   capacity: dict[int, float], busy: list[tuple[int, float, float]]) -> dict[str, dict[int, float]]:
    """Per kind (forward, backward) and stage: the length-weighted mean over its spans of the
    slowdown of its slowest rank on ``timeline`` (NOTE: [shared cores]). ``members``: per stage,
    (node, part of the forward span, part of the backward span) of each rank on a shared node;
    ``busy``: their computing (:func:`_busy_intervals`)."""
    compute = [span for span in timeline.spans if span.kind in (FORWARD, BACKWARD) and span.duration_s > 0]
    edges = sorted({t for span in compute for t in (span.start_s, span.end_s)} | {end for _, _, end in busy})
    # Per node: ranks computing in each interval between consecutive edges, then the running
    # integral of the slowdown over the edges.
    integral = {}
    for node, ranks_at_once in capacity.items():
        change = [0] * len(edges)
        for where, start, end in busy:
            if where == node:
                change[bisect.bisect_left(edges, start)] += 1
                change[bisect.bisect_left(edges, end)] -= 1
        running, total, acc = 0, 0.0, [0.0]
        for i in range(len(edges) - 1):
            running += change[i]
            total += max(1.0, running / ranks_at_once) * (edges[i + 1] - edges[i])
            acc.append(total)
        integral[node] = acc
    weighted: dict[str, dict[int, list[float]]] = {FORWARD: {}, BACKWARD: {}}
    for span in compute:
        i, j = bisect.bisect_left(edges, span.start_s), bisect.bisect_left(edges, span.end_s)
        nodes = {node for node, _, _ in members[span.stage]}
        slow = max(((integral[n][j] - integral[n][i]) / span.duration_s for n in nodes), default=1.0)
        entry = weighted[span.kind].setdefault(span.stage, [0.0, 0.0])
        entry[0] += slow * span.duration_s
        entry[1] += span.duration_s
    return {kind: {s: a / b for s, (a, b) in per_stage.items()} for kind, per_stage in weighted.items()}
