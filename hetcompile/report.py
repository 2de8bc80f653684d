"""Human-readable text about a plan: the compile summary."""

from __future__ import annotations

from collections import Counter


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _devices(types: list[str]) -> str:
    return ", ".join(f"{n}x {t}" for t, n in sorted(Counter(types).items()))


def summary(plan) -> str:
    """The short report the CLI prints after compiling (also ``Plan.summary()``)."""
    by_rank = {r.rank: r for r in plan.ranks}
    all_types = [n["device"] for n in plan.cluster["nodes"] for _ in range(n["count"])]
    lines = [f"plan {plan.fingerprint}: {plan.model_file} on {_devices(all_types)}",
             f"  schedule {plan.schedule}, {plan.num_microbatches} micro-batches of {plan.microbatch_size} samples "
             f"(global batch {plan.global_batch}), {plan.world_size} ranks"]
    if plan.timings:
        phases = " | ".join(f"{k} {_time(v)}" for k, v in plan.timings.items() if k != "solver_wall_s")
        lines.append(f"  compile: {phases}")
    lines.append("")
    header = f"  {'stage':<6}{'devices':<26}{'blocks':<44}{'samples/micro-batch':<22}{'fwd+bwd':>10}"
    lines.append(header)
    for st, pred in zip(plan.stages, plan.predicted["stages"]):
        types = [by_rank[r].device_type for r in st.ranks]
        # "pre: transformer.wte, ..." -> "pre": the full names are in stage_S.py and plan.json.
        first, last = (n.split(":")[0] for n in (st.block_names[0], st.block_names[-1]))
        blocks = first if first == last else f"{first} .. {last}"
        count = st.last_block - st.first_block + 1
        blocks = f"{blocks[:30]} ({count} block{'s' if count > 1 else ''})"
        shares = " + ".join(f"{s}" for s in st.shares)
        lines.append(f"  {st.index:<6}{_devices(types):<26}{blocks:<44}{shares:<22}"
                     f"{_time(pred['fwd_s'] + pred['bwd_s']):>10}")
    p = plan.predicted
    lines += ["",
              f"  predicted: step {_time(p['step_time_s'])}, {p['samples_per_s']:.1f} samples/s, "
              f"bubble {p['bubble_fraction'] * 100:.0f}%"]
    worst: dict[str, dict] = {}
    for m in p["memory"]:
        w = worst.get(m["device_type"])
        if w is None or m["mem_bytes"] > w["mem_bytes"]:
            worst[m["device_type"]] = m
    for t, m in sorted(worst.items()):
        lines.append(f"  memory {t:<12} peak {_bytes(m['mem_bytes'])} of {_bytes(m['capacity_bytes'])} "
                     f"({100 * m['mem_bytes'] / m['capacity_bytes']:.1f}%)")
    if plan.idle_devices:
        lines.append(f"  idle devices: {list(plan.idle_devices)} (using them would not speed up the step)")
    s = plan.solver
    lines.append(f"  solver: {s['status']}, gap {s['gap'] * 100:.2f}%, {s['num_variables']} variables")
    return "\n".join(lines)
