"""The predicted timeline of a plan, per rank: Chrome trace JSON and a PNG (Gantt + memory bars).

Everything here is derived from ``plan.json`` alone: :func:`plan_timeline`
re-runs the schedule simulator (:func:`hetcompile.schedule.simulate`) on the
per-stage times stored in ``plan.predicted["stages"]``, so the pictures and
the predicted step time come from the same numbers.

>>> import hetcompile
>>> plan = hetcompile.load("out/gpt2")  # doctest: +SKIP
>>> trace = chrome_trace(plan)  # doctest: +SKIP
>>> png_bytes = timeline_png(plan)  # doctest: +SKIP

NOTE: [One track per rank]
The simulator works per stage: every data-parallel replica of a stage runs the
stage's action list, each forward and backward taking the slowest replica's
time (the next stage needs every replica's piece). A rank's track is its
stage's spans. Transfers appear on both ends: ``send F`` on the sender and
``recv F`` on every rank of the receiving stage, over the same interval.
Sends are asynchronous, so communication spans can overlap one another; they
go on as many comm lanes as needed for no two spans of a lane to overlap.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from hetcompile.report import format_ranges, format_rate, format_tp
from hetcompile.schedule import BACKWARD, FORWARD, Timeline, make_schedule, simulate

__all__ = ["RankSpan", "busiest_stage", "chrome_trace", "measured_trace", "plan_timeline", "rank_spans", "shown_ranks",
           "timeline_png"]

COMPUTE_TRACK = "compute"
# Beyond this many ranks the pictures show one row per stage (NOTE: [One track per rank]).
MAX_RANK_ROWS = 16

# Colour per span kind: compute stands out, communication is muted, the all-reduce is warm.
_COLORS = {FORWARD: "#4C72B0", BACKWARD: "#DD8452", "update": "#55A868", "send": "#7F7F7F", "recv": "#B8B8B8",
           "allreduce": "#C44E52"}
_LABELS = {FORWARD: "forward", BACKWARD: "backward", "update": "optimizer, loss", "send": "send", "recv": "recv",
           "allreduce": "all-reduce"}


@dataclass(frozen=True)
class RankSpan:
    """One interval of one rank: compute (``F``/``B``) or communication (send/recv/all-reduce)."""

    rank: int
    track: str  # "compute", or "comm N" (the N-th comm lane of this rank)
    kind: str  # "F", "B", "update" (optimizer step and the loss's all-reduce), "send", "recv" or "allreduce"
    name: str  # what the trace shows, e.g. "F mb0", "send F mb0 -> stage 2"
    microbatch: int  # -1 for the all-reduce
    start_s: float
    end_s: float
    stage: int = -1  # the stage a compute span runs (a rank runs several with the interleaved schedule)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def plan_timeline(plan) -> Timeline:
    """Re-simulate one step of ``plan`` from its stored per-stage times.

    >>> plan_timeline(plan).step_time_s == plan.predicted["step_time_s"]  # doctest: +SKIP
    True
    """
    stages = plan.predicted["stages"]
    times = {k: [st[k] for st in stages] for k in ("fwd_s", "bwd_s", "send_fwd_s", "send_bwd_s", "allreduce_s")}
    # Receive notices (NOTE: [receives posted in program order]) and the step's tail: only profiled
    # plans have them; plans of older versions have no update or shared all-reduces.
    times.update({k: [st[k] for st in stages] for k in ("notice_fwd_s", "notice_bwd_s", "update_s")
                  if k in stages[0]})
    times["shared_allreduce_s"] = [(g["stages"], g["seconds"]) for g in plan.predicted.get("shared_allreduce", ())]
    return simulate(make_schedule(plan.schedule, len(stages), plan.num_microbatches, plan.chunks), **times)


def busiest_stage(timeline: Timeline) -> int:
    """The simulator's bottleneck: the stage whose compute track is busy the longest (ties: lowest index)."""
    busy: dict[int, float] = {}
    for span in timeline.spans:
        if span.kind in (FORWARD, BACKWARD):
            busy[span.stage] = busy.get(span.stage, 0.0) + span.duration_s
    return max(sorted(busy), key=lambda s: busy[s])


def shown_ranks(plan) -> list:
    """The ranks that get a row, in stage order: all of them, or one per stage beyond MAX_RANK_ROWS ranks.

    Every replica of a stage has its stage's spans (NOTE: [One track per rank]), so one
    row per stage loses nothing the simulator knows; the row shown is the stage's rank
    whose device is fullest, so the memory panel shows the stage's tightest headroom.
    """
    ordered = sorted(plan.ranks, key=lambda r: (r.stages, r.rank))
    if len(ordered) <= MAX_RANK_ROWS:
        return ordered
    fill = {m["device_index"]: m["mem_bytes"] / max(m["capacity_bytes"], 1) for m in plan.predicted["memory"]}
    best: dict[tuple[int, ...], object] = {}
    for r in ordered:
        if r.stages not in best or fill.get(r.device_index, 0.0) > fill.get(best[r.stages].device_index, 0.0):
            best[r.stages] = r
    return [best[s] for s in sorted(best)]


def stages_text(rank) -> str:
    """A rank's stages for people: "2", or "1+3" with the interleaved schedule."""
    return "+".join(map(str, rank.stages))


def _row_label(plan, rank, short: bool) -> str:
    if plan.world_size <= MAX_RANK_ROWS:
        tp = f" tp{rank.tp_rank}" if plan.stages[rank.stages[0]].tp > 1 else ""
        return f"r{rank.rank} s{stages_text(rank)}{tp} {rank.device_type}" if short else _rank_label(rank)
    stage = plan.stages[rank.stages[0]]
    by_rank = {r.rank: r for r in plan.ranks}
    types = {}
    for r in stage.ranks:
        types[by_rank[r].device_type] = types.get(by_rank[r].device_type, 0) + 1
    what = ", ".join(f"{n}x {t}" for t, n in sorted(types.items()))
    if stage.tp > 1:
        what += f", {format_tp(stage.tp, stage.tp_parts)}"
    return (f"s{stages_text(rank)} ({what})" if short
            else f"stage {stages_text(rank)} · {what} · shown: rank {rank.rank}")


def rank_spans(plan, timeline: Timeline | None = None, ranks=None) -> dict[int, list[RankSpan]]:
    """Per rank (all, or those in ``ranks``), its spans sorted by start; comm spans spread over
    lanes that never overlap.

    See NOTE: [One track per rank].
    """
    timeline = plan_timeline(plan) if timeline is None else timeline
    wanted = None if ranks is None else {r.rank for r in ranks}
    ranks_of_stage: dict[int, list[int]] = {}
    for r in plan.ranks:
        if wanted is None or r.rank in wanted:
            for s in r.stages:
                ranks_of_stage.setdefault(s, []).append(r.rank)
    shown = sorted({r for rs in ranks_of_stage.values() for r in rs})
    tag = (lambda s: f" s{s}") if plan.chunks > 1 else (lambda s: "")  # interleaved: which stage ran
    compute: dict[int, list[RankSpan]] = {r: [] for r in shown}
    comm: dict[int, list[tuple]] = {r: [] for r in shown}
    for span in timeline.spans:
        s, m = span.stage, span.microbatch
        if span.kind in (FORWARD, BACKWARD):
            for r in ranks_of_stage.get(s, []):
                compute[r].append(RankSpan(r, COMPUTE_TRACK, span.kind, f"{span.kind}{tag(s)} mb{m}", m,
                                           span.start_s, span.end_s, stage=s))
        elif span.kind == "update":
            if span.duration_s > 0:
                for r in ranks_of_stage.get(s, []):
                    compute[r].append(RankSpan(r, COMPUTE_TRACK, "update", "optimizer step, loss", -1,
                                               span.start_s, span.end_s, stage=s))
        elif span.kind == "allreduce":
            if span.duration_s > 0:
                for r in ranks_of_stage.get(s, []):
                    comm[r].append(("allreduce", "all-reduce grads", -1, span.start_s, span.end_s))
        elif span.duration_s > 0:  # send_F / send_B
            direction = span.kind[-1]
            peer = s + 1 if direction == FORWARD else s - 1
            for r in ranks_of_stage.get(s, []):
                comm[r].append(("send", f"send {direction} mb{m} -> stage {peer}", m, span.start_s, span.end_s))
            for r in ranks_of_stage.get(peer, []):
                comm[r].append(("recv", f"recv {direction} mb{m} <- stage {s}", m, span.start_s, span.end_s))
    out: dict[int, list[RankSpan]] = {}
    for r in sorted(compute):
        lanes_end_s: list[float] = []
        spans = list(compute[r])
        for kind, name, m, start_s, end_s in sorted(comm[r], key=lambda c: (c[3], c[4], c[1])):
            # First lane free at start_s (greedy interval colouring: the fewest lanes for these spans).
            lane = next((i for i, e in enumerate(lanes_end_s) if e <= start_s), len(lanes_end_s))
            if lane == len(lanes_end_s):
                lanes_end_s.append(end_s)
            lanes_end_s[lane] = end_s
            spans.append(RankSpan(r, f"comm {lane}", kind, name, m, start_s, end_s))
        out[r] = sorted(spans, key=lambda sp: (sp.start_s, sp.track, sp.name))
    return out


def _rank_label(rank) -> str:
    return (f"rank {rank.rank} · stage{'s' if len(rank.stages) > 1 else ''} {stages_text(rank)} · "
            f"{rank.device_type} (device {rank.device_index})")


def timeline_files(plan) -> dict[str, str | bytes]:
    """The output directory's pictures of the predicted step: timeline.json (Perfetto) and timeline.png."""
    timeline = plan_timeline(plan)
    return {"timeline.json": json.dumps(chrome_trace(plan, timeline)) + "\n",
            "timeline.png": timeline_png(plan, timeline)}


def chrome_trace(plan, timeline: Timeline | None = None) -> dict:
    """Chrome trace-event JSON (Perfetto, chrome://tracing): one process per rank, times in microseconds.

    Each rank has a ``compute`` thread (forward, backward) and ``comm N``
    threads (send, recv, all-reduce).
    """
    ordered = shown_ranks(plan)
    spans = rank_spans(plan, timeline, ordered)
    events: list[dict] = []
    for position, r in enumerate(ordered):
        tracks = [COMPUTE_TRACK] + sorted({sp.track for sp in spans[r.rank]} - {COMPUTE_TRACK})
        events += _process_events(r.rank, _row_label(plan, r, short=False), position, tracks)
        tid_of = {track: tid for tid, track in enumerate(tracks)}
        for sp in spans[r.rank]:
            events.append({"name": sp.name, "cat": sp.kind, "ph": "X", "pid": r.rank, "tid": tid_of[sp.track],
                           "ts": sp.start_s * 1e6, "dur": sp.duration_s * 1e6,
                           "args": {"stages": list(r.stages), "microbatch": sp.microbatch}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"plan": plan.fingerprint, "schedule": plan.schedule,
                          "step_time_s": plan.predicted["step_time_s"]}}


def _process_events(pid: int, label: str, position: int, tracks) -> list[dict]:
    """Chrome trace metadata of one rank: its name, its place in the list, its tracks (thread ids in order)."""
    return ([{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}},
             {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": position}}]
            + [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}}
               for tid, track in enumerate(tracks)])


def measured_trace(plan, spans_by_rank: dict[int, list]) -> dict:
    """A run's measured last step (NOTE: [measured trace] in hetcompile/runtime/context.py) as a
    Chrome trace laid out like :func:`chrome_trace`'s prediction: one process per rank, a
    ``compute`` thread (forward and backward, the waits for received values inside them, the
    optimizer) and a ``comm 0`` thread (all-reduces). Times from the start of the rank's step.
    """
    by_rank = {r.rank: r for r in plan.ranks}
    events: list[dict] = []
    for position, rank in enumerate(sorted(spans_by_rank)):
        events += _process_events(rank, _rank_label(by_rank[rank]) + " · measured", position,
                                  (COMPUTE_TRACK, "comm 0"))
        for kind, name, mb, start_s, dur_s in spans_by_rank[rank]:
            events.append({"name": name, "cat": kind, "ph": "X", "pid": rank, "tid": int(kind == "allreduce"),
                           "ts": start_s * 1e6, "dur": dur_s * 1e6, "args": {"microbatch": mb}})
    step_s = max((start_s + dur_s for spans in spans_by_rank.values() for *_, start_s, dur_s in spans), default=0.0)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"plan": plan.fingerprint, "schedule": plan.schedule, "measured_step_s": step_s,
                          "predicted_step_s": plan.predicted["step_time_s"]}}


def _time_unit(step_s: float) -> tuple[float, str]:
    if step_s >= 1:
        return 1.0, "s"
    if step_s >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def preload() -> None:
    """Import and warm up what :func:`timeline_png` draws with (matplotlib: about half a second),
    ahead of the drawing (NOTE: [planner process] in hetcompile/planner_process.py)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().set_title("warm-up")
    fig.savefig(io.BytesIO(), format="png", dpi=10)


def timeline_png(plan, timeline: Timeline | None = None, *, dpi: int = 100) -> bytes:
    """The timeline as a PNG: a Gantt chart per rank and each rank's device memory against capacity.

    Rows are ranks in stage order; the memory panel shares the rows. Idle
    devices (no rank) are listed under the chart. Same plan, same bytes.
    """
    # A bare Figure, not pyplot: no global backend switch and no window, in a notebook or on a server.
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    timeline = plan_timeline(plan) if timeline is None else timeline
    ordered = shown_ranks(plan)
    spans = rank_spans(plan, timeline, ordered)
    n = len(ordered)
    scale, unit = _time_unit(timeline.step_time_s)
    step = timeline.step_time_s * scale
    memory = {m["device_index"]: m for m in plan.predicted["memory"]}

    # Row height shrinks with the rank count so 64 ranks stay on one readable page.
    row_in = 0.42 if n <= 8 else 0.3 if n <= 24 else 0.2
    label_size = 9 if n <= 24 else 7
    labels = [_row_label(plan, r, short=True) for r in ordered]
    fig_w, fig_h = 14.0, 1.8 + row_in * n
    # Room on the left for the longest rank label (about 0.6 em per character).
    left = (0.25 + max(map(len, labels)) * label_size * 0.6 / 72) / fig_w
    fig = Figure(figsize=(fig_w, fig_h))
    ax, axm = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4.2, 1], "wspace": 0.04})
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.6 / fig_h, bottom=0.9 / fig_h)
    px_per_unit = (fig_w * dpi * (0.97 - left) * 4.2 / 5.2) / max(step, 1e-30)
    # One collection per kind for the whole chart: per-row artists make 64 ranks take seconds.
    boxes: dict[str, list] = {k: [] for k in _COLORS}
    chunks = plan.chunks
    half_px = 0.5 / px_per_unit
    for y, r in enumerate(ordered):
        last: dict[tuple[str, str], list] = {}  # per track and kind: the box drawn last
        for sp in spans[r.rank]:
            x0, x1 = sp.start_s * scale, sp.end_s * scale
            y0, y1 = (y - 0.38, y + 0.18) if sp.track == COMPUTE_TRACK else (y + 0.2, y + 0.38)
            box = last.get((sp.track, sp.kind))
            if box is not None and x0 - box[1][0] < half_px and (x1 - x0 < half_px or box[1][0] - box[0][0] < half_px):
                box[1] = (x1, y0)  # too thin to see apart from the box before: widen that one
                box[2] = (x1, y1)
            else:
                box = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                boxes[sp.kind].append(box)
                last[sp.track, sp.kind] = box
            # Micro-batch numbers only where they fit (a label wider than its bar is noise), and not
            # for many ranks, where the colours already tell forward from backward.
            # Interleaved: "2.0" is stage 2, micro-batch 0 (a rank runs several stages).
            label = str(sp.microbatch) if chunks == 1 else f"{sp.stage}.{sp.microbatch}"
            if (sp.track == COMPUTE_TRACK and sp.microbatch >= 0 and n <= 24
                    and sp.duration_s * scale * px_per_unit > 7 * len(label) + 4):
                ax.text((x0 + x1) / 2, y - 0.1, label, ha="center", va="center",
                        fontsize=label_size - 1, color="white")
    for kind, verts in boxes.items():
        if verts:
            compute = kind in (FORWARD, BACKWARD)
            # One (N, 4, 2) array: PolyCollection converts a list of 90,000 boxes one by one.
            ax.add_collection(PolyCollection(np.asarray(verts, dtype=float), facecolors=_COLORS[kind], edgecolors="white" if compute else "none",
                                             linewidths=0.4 if compute else 0), autolim=False)
    for y in range(1, n):  # a line between stages shows the pipeline's structure
        if ordered[y].stages != ordered[y - 1].stages:
            for a in (ax, axm):
                a.axhline(y - 0.5, color="#444444", linewidth=0.6)
    ax.axvline(step, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, step * 1.01)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=label_size)
    ax.set_xlabel(f"time ({unit}); dashed line: predicted step {step:.3g} {unit}", fontsize=9)
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.tick_params(axis="x", labelsize=8)
    p = plan.predicted
    ax.set_title(f"{plan.model_file}: {plan.schedule}, {plan.num_microbatches} "
                 f"micro-batch{'es' if plan.num_microbatches != 1 else ''} x "
                 f"{plan.microbatch_size} samples, {plan.world_size} ranks, {len(plan.stages)} stage{'s' if len(plan.stages) > 1 else ''}\n"
                 f"bubble {p['bubble_fraction'] * 100:.0f}%, {format_rate(p['samples_per_s'])} samples/s"
                 + ("; bars: stage.micro-batch" if plan.chunks > 1 else ""),
                 fontsize=10, loc="left")
    fig.legend(handles=[Patch(color=_COLORS[k], label=_LABELS[k]) for k in _COLORS], ncol=6, fontsize=8,
               loc="lower left", bbox_to_anchor=(left, 0.02 / fig_h), frameon=False)

    gib = 2**30
    for y, r in enumerate(ordered):
        m = memory.get(r.device_index)
        if m is None:
            continue
        used, cap = m["mem_bytes"] / gib, m["capacity_bytes"] / gib
        frac = used / cap if cap else 0.0
        color = "#55A868" if frac < 0.8 else "#E1A33B" if frac < 0.95 else "#C44E52"
        axm.barh(y, cap, height=0.6, color="#E6E6E6", edgecolor="#999999", linewidth=0.5)
        axm.barh(y, used, height=0.6, color=color)
        axm.text(cap, y, f" {frac * 100:.0f}%", va="center", ha="left", fontsize=label_size - 1)
    max_cap = max((m["capacity_bytes"] for m in memory.values()), default=gib) / gib
    axm.set_xlim(0, max_cap * 1.3)
    axm.set_xlabel("peak memory (GiB) of capacity", fontsize=9)
    axm.tick_params(axis="x", labelsize=8)
    axm.tick_params(axis="y", left=False)
    axm.set_title("memory per device", fontsize=10, loc="left")
    if plan.idle_devices:
        idle = format_ranges(plan.idle_devices)
        fig.text(0.97, 0.12 / fig_h, f"idle devices (no rank): {idle}", fontsize=8, ha="right")
    buf = io.BytesIO()
    # No "Software" metadata: the same plan gives the same bytes whatever matplotlib wrote them.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
