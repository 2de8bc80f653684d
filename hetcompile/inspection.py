"""Inspect and compare plans: ``hetcompile inspect OUT`` and ``hetcompile diff OUT_A OUT_B``.

:func:`inspect_plan` turns a :class:`~hetcompile.plan.Plan` into one plain
dict (what ``inspect --json`` prints); :func:`format_inspect` renders the same
dict as text, so the terminal and the JSON can never disagree.
:func:`diff_plans` lists what differs between two plans, one line each.

>>> import hetcompile
>>> report = inspect_plan(hetcompile.load("out/gpt2"))  # doctest: +SKIP
>>> report["predicted"]["step_time_s"]  # doctest: +SKIP
0.000120793
"""

from __future__ import annotations

from collections import Counter

from hetcompile.report import format_bytes, format_rate, format_time, format_tp, layer_ranges

__all__ = ["diff_plans", "format_inspect", "inspect_plan", "layer_ranges"]


def inspect_plan(plan) -> dict:
    """The inspect report of ``plan`` as plain data (JSON-ready; times in seconds, memory in bytes)."""
    by_rank = {r.rank: r for r in plan.ranks}
    rank_of_device = {r.device_index: r.rank for r in plan.ranks}
    p = plan.predicted
    stages = []
    for st, pred in zip(plan.stages, p["stages"]):
        types = [by_rank[r].device_type for r in st.ranks]
        stages.append({
            "index": st.index,
            "devices": dict(sorted(Counter(types).items())),
            "num_devices": len(st.ranks),
            "first_block": st.first_block,
            "last_block": st.last_block,
            "layers": list(st.block_names),
            "tp_degree": st.tp,  # ranks[i*tp:(i+1)*tp] are one TP group
            "tp_parts": list(st.tp_parts),  # the group members' shard sizes; [] when even
            "ranks": [{"rank": r, "device_index": by_rank[r].device_index, "device_type": by_rank[r].device_type,
                       "share": share} for r, share in zip(st.ranks, st.shares)],
            # Per micro-batch: the slowest replica's compute, and the stage's outgoing transfers.
            "fwd_s": pred["fwd_s"],
            "bwd_s": pred["bwd_s"],
            "compute_s": pred["fwd_s"] + pred["bwd_s"],
            "send_fwd_s": pred["send_fwd_s"],
            "send_bwd_s": pred["send_bwd_s"],
            "comm_s": pred["send_fwd_s"] + pred["send_bwd_s"],
            "allreduce_s": pred["allreduce_s"],  # once per step, after the last backward
            "peak_in_flight": pred["peak_in_flight"],
        })
    memory = [{"device_index": m["device_index"], "device_type": m["device_type"],
               "rank": rank_of_device.get(m["device_index"]), "stages": m["stages"], "mem_bytes": m["mem_bytes"],
               "capacity_bytes": m["capacity_bytes"],
               "fraction": m["mem_bytes"] / m["capacity_bytes"] if m["capacity_bytes"] else 0.0}
              for m in p["memory"]]
    solver = plan.solver
    return {
        "plan": plan.fingerprint,
        "model_file": plan.model_file,
        "cluster": _cluster_counts(plan.cluster),
        "schedule": plan.schedule,
        "num_microbatches": plan.num_microbatches,
        "microbatch_size": plan.microbatch_size,
        "global_batch": plan.global_batch,
        "num_stages": len(plan.stages),
        "world_size": plan.world_size,
        "stages": stages,
        "memory": memory,
        "idle_devices": list(plan.idle_devices),
        "predicted": {
            "step_time_s": p["step_time_s"],
            "samples_per_s": p["samples_per_s"],
            "bubble_fraction": p["bubble_fraction"],
            # Added by the planner when it knows them; null for plans made before.
            "upper_bound_samples_per_s": p.get("upper_bound_samples_per_s"),
            "efficiency": p.get("efficiency"),
        },
        "solver": {
            "status": solver["status"],
            "gap": solver["gap"],
            "objective_s": solver.get("objective_s"),
            "best_bound_s": solver.get("best_bound_s"),
            "num_variables": solver.get("num_variables"),
            # Wall time lives apart from plan.json (timings.json): it varies run to run.
            "wall_s": solver.get("wall_s", plan.timings.get("solver_wall_s")),
        },
        "compile_timings_s": {k: v for k, v in plan.timings.items() if k != "solver_wall_s"},
    }


def _cluster_counts(cluster: dict) -> dict[str, int]:
    counts: Counter = Counter()
    for node in cluster["nodes"]:
        counts[node["device"]] += node["count"]
    return dict(sorted(counts.items()))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def format_inspect(report: dict) -> str:
    """The inspect report as text (what ``hetcompile inspect OUT`` prints)."""
    cluster = ", ".join(f"{n}x {t}" for t, n in report["cluster"].items())
    lines = [f"plan {report['plan']}: {report['model_file']} on {cluster}",
             f"  {report['num_stages']} stage{'s' if report['num_stages'] > 1 else ''}, {report['world_size']} ranks, "
             f"schedule {report['schedule']}, {report['num_microbatches']} micro-batches x "
             f"{report['microbatch_size']} samples = global batch {report['global_batch']}",
             "",
             "stages (times per micro-batch; compute is the slowest replica's forward + backward)",
             f"  {'stage':<6}{'devices':<24}{'TP':>3}  {'layers':<36}{'compute':>10}{'send':>10}{'all-reduce':>12}"]
    for st in report["stages"]:
        devices = ", ".join(f"{n}x {t}" for t, n in st["devices"].items())
        layers = layer_ranges(st["layers"])
        if len(layers) > 34:
            layers = layers[:31] + "..."
        tp = format_tp(st["tp_degree"], st.get("tp_parts", [])).removeprefix("TP ") or "1"
        lines.append(f"  {st['index']:<6}{devices:<24}{tp:>3}  {layers:<36}"
                     f"{format_time(st['compute_s']):>10}{format_time(st['comm_s']):>10}"
                     f"{format_time(st['allreduce_s']):>12}")
        lines.append(f"  {'':<6}samples per micro-batch: {_shares_text(st['ranks'])}")
    lines += ["", "memory per device (peak: weights, grads, optimizer state, activations in flight)"]
    for m in report["memory"]:
        bar = _bar(m["fraction"])
        lines.append(f"  device {m['device_index']:<4}r{m['rank']:<4}{m['device_type']:<12}stage {'+'.join(map(str, m['stages'])):<4}"
                     f"{format_bytes(m['mem_bytes']):>10} of {format_bytes(m['capacity_bytes']):<10}"
                     f"{bar} {m['fraction'] * 100:5.1f}%")
    if report["idle_devices"]:
        lines.append(f"  idle devices: {report['idle_devices']} (using them would not speed up the step)")
    p = report["predicted"]
    s = report["solver"]
    lines += ["",
              f"predicted step {format_time(p['step_time_s'])}, {format_rate(p['samples_per_s'])} samples/s, "
              f"bubble {_pct(p['bubble_fraction'])}"]
    if p["upper_bound_samples_per_s"] is not None:
        lines.append(f"  efficiency {_pct(p['efficiency'])} of the upper bound "
                     f"{format_rate(p['upper_bound_samples_per_s'])} samples/s")
    else:
        lines.append("  efficiency vs upper bound: n/a (the planner reported no upper bound for this plan)")
    wall = "" if s["wall_s"] is None else f", {format_time(s['wall_s'])}"
    lines.append(f"solver {s['status']}, gap {_pct(s['gap'])}{wall}"
                 + ("" if s["num_variables"] is None else f", {s['num_variables']} variables"))
    return "\n".join(lines)


def _shares_text(ranks: list[dict]) -> str:
    """Ranks with the same type and share on one entry: "6 on r0 (A100-80GB), 1 each on r4-7 (T4-16GB)"."""
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        groups.setdefault((r["share"], r["device_type"]), []).append(r["rank"])
    parts = []
    for (share, device_type), rs in groups.items():
        runs: list[list[int]] = []
        for r in sorted(rs):
            if runs and runs[-1][1] + 1 == r:
                runs[-1][1] = r
            else:
                runs.append([r, r])
        names = ",".join(f"r{a}" if a == b else f"r{a}-{b}" for a, b in runs)
        parts.append(f"{share}{' each' if len(rs) > 1 else ''} on {names} ({device_type})")
    return ", ".join(parts)


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, round(fraction * width))
    if fraction > 0 and filled == 0:
        filled = 1 if fraction >= 0.005 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


# --------------------------------------------------------------------------------------------
# diff


def _changed(a: float, b: float, rel: float = 1e-5) -> bool:
    # plan.json rounds floats to 6 significant digits: smaller differences are noise.
    return abs(a - b) > rel * max(abs(a), abs(b), 1e-30)


def _change(a: float, b: float, fmt) -> str:
    pct = f" ({(b - a) / a * 100:+.1f}%)" if a else ""
    return f"{fmt(a)} -> {fmt(b)}{pct}"


def _stage_devices(st: dict) -> str:
    return ", ".join(f"{n}x {t}" for t, n in st["devices"].items()) + " [devices " + ",".join(
        str(r["device_index"]) for r in st["ranks"]) + "]"


def diff_plans(plan_a, plan_b) -> list[str]:
    """What differs between two plans, one line each; empty when they plan the same thing.

    Decisions first (model, cluster, schedule, micro-batches, stages, shares),
    then predictions and the solver's report. Compile wall times are ignored.

    >>> diff_plans(plan, plan)  # doctest: +SKIP
    []
    """
    a, b = inspect_plan(plan_a), inspect_plan(plan_b)
    out: list[str] = []
    for key in ("model_file", "schedule", "num_microbatches", "microbatch_size", "global_batch"):
        if a[key] != b[key]:
            out.append(f"{key}: {a[key]} -> {b[key]}")
    if a["cluster"] != b["cluster"]:
        counts = [", ".join(f"{n}x {t}" for t, n in r["cluster"].items()) for r in (a, b)]
        out.append(f"cluster: {counts[0]} -> {counts[1]}")
    else:
        changed = sorted(k for k in set(plan_a.cluster) | set(plan_b.cluster)
                         if plan_a.cluster.get(k) != plan_b.cluster.get(k))
        for k in changed:  # same devices, other links, latencies or device numbers
            out.append(f"cluster {k}: {plan_a.cluster.get(k)} -> {plan_b.cluster.get(k)}")
    if plan_a.seed != plan_b.seed:
        out.append(f"seed: {plan_a.seed} -> {plan_b.seed}")
    if a["num_stages"] != b["num_stages"]:
        out.append(f"stages: {a['num_stages']} -> {b['num_stages']}")
    for s in range(max(a["num_stages"], b["num_stages"])):
        if s >= a["num_stages"] or s >= b["num_stages"]:
            st = (a if s < a["num_stages"] else b)["stages"][s]
            sign = "-" if s < a["num_stages"] else "+"
            out.append(f"{sign} stage {s}: {layer_ranges(st['layers'])} on {_stage_devices(st)}")
            continue
        sa, sb = a["stages"][s], b["stages"][s]
        if (sa["first_block"], sa["last_block"]) != (sb["first_block"], sb["last_block"]):
            out.append(f"stage {s} layers: {layer_ranges(sa['layers'])} -> {layer_ranges(sb['layers'])}")
        if _stage_devices(sa) != _stage_devices(sb):
            out.append(f"stage {s} devices: {_stage_devices(sa)} -> {_stage_devices(sb)}")
        shares_a = [r["share"] for r in sa["ranks"]]
        shares_b = [r["share"] for r in sb["ranks"]]
        if shares_a != shares_b:
            out.append(f"stage {s} samples per micro-batch: {shares_a} -> {shares_b}")
        if (sa["tp_degree"], sa["tp_parts"]) != (sb["tp_degree"], sb["tp_parts"]):
            out.append(f"stage {s} TP: {format_tp(sa['tp_degree'], sa['tp_parts']) or 'none'} -> "
                       f"{format_tp(sb['tp_degree'], sb['tp_parts']) or 'none'}")
        for key, label in (("compute_s", "compute per micro-batch"), ("comm_s", "send per micro-batch"),
                           ("allreduce_s", "all-reduce")):
            if _changed(sa[key], sb[key]):
                out.append(f"stage {s} predicted {label}: {_change(sa[key], sb[key], format_time)}")
    if a["idle_devices"] != b["idle_devices"]:
        out.append(f"idle devices: {a['idle_devices']} -> {b['idle_devices']}")
    pa, pb = a["predicted"], b["predicted"]
    for key, fmt in (("step_time_s", format_time), ("samples_per_s", format_rate),
                     ("bubble_fraction", _pct), ("efficiency", _pct)):
        if pa[key] is None or pb[key] is None:
            if (pa[key] is None) != (pb[key] is None):
                out.append(f"predicted {key}: {pa[key]} -> {pb[key]}")
        elif _changed(pa[key], pb[key]) and key in ("bubble_fraction", "efficiency"):
            # A relative change of a fraction reads wrong ("+43%" for 11% -> 16%): show points.
            out.append(f"predicted {key}: {fmt(pa[key])} -> {fmt(pb[key])} "
                       f"({(pb[key] - pa[key]) * 100:+.1f} points)")
        elif _changed(pa[key], pb[key]):
            out.append(f"predicted {key}: {_change(pa[key], pb[key], fmt)}")
    peak_a, peak_b = _peak_by_type(a), _peak_by_type(b)
    for t in sorted(set(peak_a) | set(peak_b)):
        if t not in peak_a or t not in peak_b or _changed(peak_a[t], peak_b[t]):
            fa = format_bytes(peak_a[t]) if t in peak_a else "unused"
            fb = format_bytes(peak_b[t]) if t in peak_b else "unused"
            out.append(f"predicted peak memory on {t}: {fa} -> {fb}")
    sa, sb = a["solver"], b["solver"]
    if sa["status"] != sb["status"] or _changed(sa["gap"], sb["gap"]):
        out.append(f"solver: {sa['status']} gap {_pct(sa['gap'])} -> {sb['status']} gap {_pct(sb['gap'])}")
    return out


def _peak_by_type(report: dict) -> dict[str, int]:
    peak: dict[str, int] = {}
    for m in report["memory"]:
        peak[m["device_type"]] = max(peak.get(m["device_type"], 0), m["mem_bytes"])
    return peak
