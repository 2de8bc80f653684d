"""Predictions for a decision: stage times from the cost models, then the schedule simulator.

This is the one predictor: the compile summary, ``plan.json``'s ``predicted``
section and the timeline all come from :func:`predict`.
"""

from __future__ import annotations

from cost_models.comm import allreduce_time_s, p2p_time_s
from cost_models.memory import stage_memory_bytes, tp_share
from cost_models.roofline import block_overhead_s, block_time_s, optimizer_time_s, stage_call_overhead_s
from hetcompile.ir import ModelCosts
from hetcompile.schedule import Timeline, make_schedule, simulate


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
    loss_sync_s = allreduce_time_s(8, cluster, [d for st in decision.stages for d in st.devices])
    stages = decision.stages
    for s, st in enumerate(stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        f_s, b_s = 0.0, 0.0
        tp, parts = _tp_parts(st)
        # Replicas of one type with one share take the same time: price each pair once.
        # TP: a member with part p of P runs (1 - f) + f p/P of each block (f = tp_flops_fraction).
        for type_name, share, part in sorted({(devices[d].type, share, parts[i % tp])
                                              for i, (d, share) in enumerate(zip(st.devices, st.shares))}):
            dev_type = cluster.type_of(type_name)
            per = [block_time_s(b, dev_type, costs.dtype, samples=share) for b in blocks]
            fixed = [block_overhead_s(b, dev_type) for b in blocks]  # per call, whatever the share
            fixed.append(stage_call_overhead_s(dev_type))  # the stage's own call and backward call
            x = [tp_share(b.tp_flops_fraction, part, sum(parts)) for b in blocks]
            f_s = max(f_s, share * sum(p[0] * y for p, y in zip(per, x)) + sum(o[0] for o in fixed))
            b_s = max(b_s, share * sum(p[1] * y for p, y in zip(per, x)) + sum(o[1] for o in fixed))
        if tp > 1:  # each block all-reduces its TP activations over the group, forward and backward alike
            tp_comm_s = max(sum(allreduce_time_s(b.tp_comm_bytes_per_sample * st.shares[i], cluster,
                                                 st.devices[i:i + tp]) for b in blocks)
                            for i in range(0, len(st.devices), tp))
            f_s, b_s = f_s + tp_comm_s, b_s + tp_comm_s
        fwd.append(f_s)
        bwd.append(b_s + (f_s if st.recompute else 0.0))  # recompute: forward again
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
        # Under TP, member i of every replica all-reduces its own shard with its peers.
        allreduce.append(max(allreduce_time_s(_shard_bytes(blocks, parts[i], sum(parts)), cluster,
                                              list(st.devices[i::tp])) for i in range(tp)))
        num_tensors = sum(b.num_param_tensors for b in blocks)
        optimizer_s = max(optimizer_time_s(num_tensors, param_bytes, cluster.type_of(devices[d].type))
                          for d in st.devices)
        # Only a profiled cost model charges the step's tail (the datasheet one predicts compute and links).
        update.append(optimizer_s + loss_sync_s if optimizer_s > 0 else 0.0)
    return {"fwd_s": fwd, "bwd_s": bwd, "send_fwd_s": send_fwd, "send_bwd_s": send_bwd, "allreduce_s": allreduce,
            "update_s": update, **_notices(decision, cluster, notice_fwd, notice_bwd)}


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
    devices = cluster.devices
    measured = all(cluster.type_of(devices[d].type).profile is not None
                   and cluster.type_of(devices[d].type).profile.comm is not None
                   for st in decision.stages for d in st.devices)
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
    timeline = simulate(make_schedule(schedule, len(decision.stages), decision.num_microbatches,
                                      decision.chunks), **times)
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
        "stages": [{"fwd_s": times["fwd_s"][s], "bwd_s": times["bwd_s"][s], "send_fwd_s": times["send_fwd_s"][s],
                    "send_bwd_s": times["send_bwd_s"][s], "allreduce_s": times["allreduce_s"][s],
                    "update_s": times["update_s"][s],
                    **{k: times[k][s] for k in ("notice_fwd_s", "notice_bwd_s") if k in times},
                    "peak_in_flight": timeline.peak_in_flight[s]} for s in range(len(decision.stages))],
        "memory": [memory[d] for d in sorted(memory)],
    }, timeline
