"""Predictions for a decision: stage times from the cost models, then the schedule simulator.

This is the one predictor: the compile summary, ``plan.json``'s ``predicted``
section and the timeline all come from :func:`predict`.
"""

from __future__ import annotations

from cost_models.comm import allreduce_time_s, p2p_time_s
from cost_models.memory import stage_memory_bytes
from cost_models.roofline import block_overhead_s, block_time_s, optimizer_time_s
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
    # Every rank joins end_step's all-reduce of the loss, so every stage pays it.
    loss_sync_s = allreduce_time_s(8, cluster, [d for st in decision.stages for d in st.devices])
    stages = decision.stages
    for s, st in enumerate(stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        f_s, b_s = 0.0, 0.0
        # Replicas of one type with one share take the same time: price each pair once.
        for type_name, share in sorted({(devices[d].type, share) for d, share in zip(st.devices, st.shares)}):
            dev_type = cluster.type_of(type_name)
            per = [block_time_s(b, dev_type, costs.dtype, samples=share) for b in blocks]
            fixed = [block_overhead_s(b, dev_type) for b in blocks]  # per call, whatever the share
            f_s = max(f_s, share * sum(p[0] for p in per) + sum(o[0] for o in fixed))
            b_s = max(b_s, share * sum(p[1] for p in per) + sum(o[1] for o in fixed))
        fwd.append(f_s)
        bwd.append(b_s + (f_s if st.recompute else 0.0))  # recompute: forward again
        out_bytes = decision.microbatch_size * costs.blocks[st.last_block].out_bytes_per_sample
        if s + 1 < len(stages):
            bw, lat = link(cluster, st.devices, stages[s + 1].devices)
            send_fwd.append(p2p_time_s(out_bytes, bw, lat))
        else:
            send_fwd.append(0.0)
        if s > 0:
            prev = stages[s - 1]
            in_bytes = decision.microbatch_size * costs.blocks[prev.last_block].out_bytes_per_sample
            bw, lat = link(cluster, prev.devices, st.devices)
            send_bwd.append(p2p_time_s(in_bytes, bw, lat))
        else:
            send_bwd.append(0.0)
        param_bytes = sum(b.param_bytes for b in blocks)
        allreduce.append(allreduce_time_s(param_bytes, cluster, list(st.devices)))
        num_tensors = sum(b.num_param_tensors for b in blocks)
        optimizer_s = max(optimizer_time_s(num_tensors, param_bytes, cluster.type_of(devices[d].type))
                          for d in st.devices)
        # Only a profiled cost model charges the step's tail (the datasheet one predicts compute and links).
        update.append(optimizer_s + loss_sync_s if optimizer_s > 0 else 0.0)
    return {"fwd_s": fwd, "bwd_s": bwd, "send_fwd_s": send_fwd, "send_bwd_s": send_bwd, "allreduce_s": allreduce,
            "update_s": update}


def predict(decision, costs: ModelCosts, cluster, schedule: str) -> tuple[dict, Timeline]:
    """What the cost model expects of ``decision``: step time, throughput, bubbles, memory per device."""
    times = stage_times(decision, costs, cluster)
    timeline = simulate(make_schedule(schedule, len(decision.stages), decision.num_microbatches), **times)
    devices = cluster.devices
    memory = []
    for s, st in enumerate(decision.stages):
        blocks = costs.blocks[st.first_block:st.last_block + 1]
        param_bytes = sum(b.param_bytes for b in blocks)
        act = sum(b.act_bytes_per_sample for b in blocks)
        in_bytes = costs.blocks[st.first_block - 1].out_bytes_per_sample if st.first_block > 0 else 0.0
        for d, share in zip(st.devices, st.shares):
            dev_type = cluster.type_of(devices[d].type)
            memory.append({
                "device_index": d, "device_type": dev_type.name, "stage": s,
                "mem_bytes": int(stage_memory_bytes(param_bytes, act, in_bytes, share, timeline.peak_in_flight[s],
                                                    st.recompute)),
                "capacity_bytes": int(dev_type.mem_bytes),
            })
    memory.sort(key=lambda m: m["device_index"])
    step = timeline.step_time_s
    return {
        "step_time_s": step,
        "samples_per_s": costs.global_batch / step if step > 0 else 0.0,
        "bubble_fraction": timeline.bubble_fraction,
        "stages": [{"fwd_s": times["fwd_s"][s], "bwd_s": times["bwd_s"][s], "send_fwd_s": times["send_fwd_s"][s],
                    "send_bwd_s": times["send_bwd_s"][s], "allreduce_s": times["allreduce_s"][s],
                    "update_s": times["update_s"][s],
                    "peak_in_flight": timeline.peak_in_flight[s]} for s in range(len(decision.stages))],
        "memory": memory,
    }, timeline
