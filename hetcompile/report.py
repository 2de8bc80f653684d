"""Human-readable text about a plan: the compile summary."""

from __future__ import annotations

import re
import textwrap
from collections import Counter

# The phases of a compile, in order ("[k/6]" progress lines, the summary's "compile:" line).
# "draw" (the wait for the timeline, drawn while "emit" runs) and "bound" (the wait for HetHub's
# upper bound, whose searches start before the solve) are mostly waits: both run in the planner's
# process (NOTE: [planner process] in hetcompile/planner_process.py).
PHASES = ("capture", "passes", "solve", "emit", "draw", "bound")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def format_shares(shares) -> str:
    """Samples per device: "2 + 2 + 1" for a few devices, runs folded beyond: "1 x32" or "2 x4 + 1 x8"."""
    if len(shares) <= 6:
        return " + ".join(str(s) for s in shares)
    runs: list[list[int]] = []
    for s in shares:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return " + ".join(f"{s} x{n}" if n > 1 else str(s) for s, n in runs)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def layer_ranges(names) -> str:
    """Block names, shortened: runs of numbered layers become one range.

    >>> layer_ranges(["pre: transformer.wte, ...", "transformer.h.0", "transformer.h.1", "transformer.h.2", "post"])
    'pre, transformer.h.0-2, post'
    """
    out: list[list] = []  # [prefix, first, last] or [name]
    for full in names:
        name = full.split(":")[0].strip()  # "pre: a, b, ..." -> "pre": the full list is in plan.json
        m = _NUMBERED.match(name)
        if m and out and len(out[-1]) == 3 and out[-1][0] == m.group(1) and out[-1][2] + 1 == int(m.group(2)):
            out[-1][2] = int(m.group(2))
        elif m:
            out.append([m.group(1), int(m.group(2)), int(m.group(2))])
        else:
            out.append([name])
    return ", ".join(p[0] if len(p) == 1 else f"{p[0]}{p[1]}" if p[1] == p[2] else f"{p[0]}{p[1]}-{p[2]}"
                     for p in out)


def format_ranges(indices) -> str:
    """Sorted integers as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ", ".join(out)


def format_rate(per_s: float) -> str:
    """Throughput to 4 significant digits, with thousands separators: 39,780 or 98.47."""
    return f"{float(f'{per_s:.4g}'):,.0f}" if per_s >= 1000 else f"{per_s:.4g}"


def format_time(seconds: float) -> str:
    """Seconds for people: ``format_time(0.0123) == "12.3 ms"``."""
    if seconds == 0:
        return "0"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.3g} us"
    return f"{seconds * 1e9:.3g} ns"  # tiny example models: "0 us" would hide the differences


def format_bytes(n: float) -> str:
    """Bytes for people, binary units: ``format_bytes(3 * 2**30) == "3.0 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_devices(types: list[str]) -> str:
    """``["A100", "V100", "A100"]`` -> ``"2x A100, 1x V100"``."""
    return ", ".join(f"{n}x {t}" for t, n in sorted(Counter(types).items()))


def format_tp(tp: int, parts=()) -> str:
    """A stage's tensor parallelism for people: "" without, "TP 2", or "TP 2 (3:1)" with uneven shards.

    >>> format_tp(2, (3, 1))
    'TP 2 (3:1)'
    """
    if tp <= 1:
        return ""
    return f"TP {tp}" + (f" ({':'.join(map(str, parts))})" if parts else "")


def summary(plan) -> str:
    """The short report the CLI prints after compiling (also ``Plan.summary()``)."""
    by_rank = {r.rank: r for r in plan.ranks}
    all_types = [n["device"] for n in plan.cluster["nodes"] for _ in range(n["count"])]
    lines = [f"plan {plan.fingerprint}: {plan.model_file} on {format_devices(all_types)}",
             f"  schedule {plan.schedule}, {_count(plan.num_microbatches, 'micro-batch', 'micro-batches')} of "
             f"{_count(plan.microbatch_size, 'sample')} "
             f"(global batch {plan.global_batch}), {plan.world_size} ranks"]
    if plan.timings:
        # Phase order, also for timings read back from timings.json (whose keys are sorted).
        keys = sorted((k for k in plan.timings if k != "solver_wall_s"),
                      key=lambda k: PHASES.index(k) if k in PHASES else len(PHASES))
        phases = " | ".join(f"{k} {format_time(plan.timings[k])}" for k in keys)
        lines.append(f"  compile: {phases}")
    lines.append("")
    rows = []
    for st, pred in zip(plan.stages, plan.predicted["stages"]):
        types = [by_rank[r].device_type for r in st.ranks]
        # "pre: transformer.wte, ..." -> "pre": the full names are in stage_S.py and plan.json.
        blocks = layer_ranges(st.block_names)
        shares = format_shares(st.shares)
        devices = format_devices(types) + (f", {format_tp(st.tp, st.tp_parts)}" if st.tp > 1 else "")
        if st.tp > 1:
            shares = format_shares(st.shares[::st.tp]) + " per group"
        rows.append((st.index, devices, blocks, shares, format_time(pred["fwd_s"] + pred["bwd_s"])))
    width = max([24] + [len(r[1]) for r in rows]) + 2
    lines.append(f"  {'stage':<6}{'devices':<{width}}{'layers':<44}{'samples/micro-batch':<22}{'fwd+bwd':>10}")
    for index, devices, blocks, shares, time_text in rows:
        lines.append(f"  {index:<6}{devices:<{width}}{blocks:<44}{shares:<22}{time_text:>10}")
    p = plan.predicted
    lines += ["",
              f"  predicted: step {format_time(p['step_time_s'])}, {format_rate(p['samples_per_s'])} samples/s, "
              f"bubble {p['bubble_fraction'] * 100:.0f}%"
              + (f", {p['efficiency'] * 100:.0f}% of the upper bound {format_rate(p['upper_bound_samples_per_s'])} samples/s"
                 if p.get("efficiency") is not None and p.get("upper_bound_samples_per_s") else "")]
    worst: dict[str, dict] = {}
    for m in p["memory"]:
        w = worst.get(m["device_type"])
        if w is None or m["mem_bytes"] > w["mem_bytes"]:
            worst[m["device_type"]] = m
    for t, m in sorted(worst.items()):
        lines.append(f"  memory {t:<12} peak {format_bytes(m['mem_bytes'])} of {format_bytes(m['capacity_bytes'])} "
                     f"({100 * m['mem_bytes'] / m['capacity_bytes']:.1f}%)")
    if plan.idle_devices:
        lines.append(f"  idle devices: {format_ranges(plan.idle_devices)} (using them would not speed up the step)")
    for st in plan.stages:
        if st.left_whole:  # what tensor parallelism could not split runs whole on every member
            lines.append(f"  stage {st.index} tensor parallel: {len(st.left_whole)} matmul"
                         f"{'s' if len(st.left_whole) > 1 else ''} left whole, e.g. {st.left_whole[0]} "
                         f"(all in stage_{st.index}_tp0.py)")
    lines += _shared_cores(plan.cluster)
    s = plan.solver
    lines.append(f"  solver: {s['status']}, gap {s['gap'] * 100:.2f}%, {s['num_variables']} variables")
    return "\n".join(lines)


def _shared_cores(cluster: dict) -> list[str]:
    """A note per CPU node that declares more devices (one rank of ``num_threads`` threads each) than
    its type's profile had cores: those ranks share cores (the predictor slows their compute for it,
    NOTE: [shared cores] in hetcompile/predict.py)."""
    lines = []
    for i, node in enumerate(cluster["nodes"]):
        profile = cluster["devices"].get(node["device"], {}).get("profile") or {}
        cores, threads = profile.get("num_cores", 0), profile.get("num_threads", 1)
        if profile.get("device") == "cpu" and cores and node["count"] * threads > cores:
            fit = max(cores // threads, 1)
            note = (f"note: node {i} declares {node['count']} {node['device']} devices of {threads} "
                    f"thread{'s' if threads > 1 else ''} each, but its profile was measured with {cores} cores; "
                    f"its ranks will share cores and compute more slowly, as the prediction assumes. Declare at "
                    f"most {fit} per node to give each rank a core of its own.")
            lines += textwrap.wrap(note, 110, initial_indent="  ", subsequent_indent="        ")
    return lines
