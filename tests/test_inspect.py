"""Plan inspection: inspect, explain, diff, the timeline, progress, and plan.json's schema check.

Two plans of the MLP example are compiled once per module: a pinned one
(three stages on five ranks, uneven shares, like test_end_to_end) and the
planner's own choice, so that diff has something to find.
"""

import inspect
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest

import hetcompile
from hetcompile.cli import _TerminalProgress, main
from hetcompile.errors import UserError
from hetcompile.explain import explain, format_explain
from hetcompile.inspection import diff_plans, format_inspect, inspect_plan, layer_ranges
from hetcompile.plan import SCHEMA_VERSION, load
from hetcompile.planner import PlanDecision, StageDecision
from hetcompile.schedule import make_schedule, simulate
from hetcompile.timeline import busiest_stage, plan_timeline, rank_spans

CLUSTER = {"nodes": [{"device": "A100-80GB", "count": 3}, {"device": "V100-32GB", "count": 2}]}
STAGE_KEYS = ("fwd_s", "bwd_s", "send_fwd_s", "send_bwd_s", "allreduce_s")


def _pinned(num_blocks: int, microbatch_size: int, microbatches: int) -> PlanDecision:
    """Three stages on five ranks: A100s 3:1, one A100, then V100s 1:3 (as in test_end_to_end)."""
    b, mid = microbatch_size, num_blocks // 2
    return PlanDecision(stages=(
        StageDecision(0, mid - 1, (0, 1), (b - b // 4, b // 4)),
        StageDecision(mid, num_blocks - 2, (2,), (b,)),
        StageDecision(num_blocks - 1, num_blocks - 1, (3, 4), (b // 4, b - b // 4)),
    ), num_microbatches=microbatches, microbatch_size=b)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """(pinned plan, its dir, solved plan, its dir, progress of the pinned compile, progress of the solved one)."""
    from hetcompile.modelfile import load_model_file

    root = tmp_path_factory.mktemp("inspect")
    mf = load_model_file(Path(__file__).resolve().parent.parent / "examples" / "mlp.py")
    events = []
    pinned = hetcompile.compile(mf, CLUSTER, schedule="1f1b", decision=_pinned(14, 8, 4),
                                progress=lambda text, transient=False: events.append((text, transient)))
    solved_events = []
    solved = hetcompile.compile(mf, CLUSTER, schedule="gpipe", time_limit_s=5,
                                progress=lambda text, transient=False: solved_events.append((text, transient)))
    return (pinned, pinned.save(root / "pinned"), solved, solved.save(root / "solved"), events, solved_events)


def test_inspect_json_agrees_with_plan_json(plans, capsys):
    _, out, _, _, _, _ = plans
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan_json = json.loads((out / "plan.json").read_text())
    predicted = plan_json["predicted"]
    for key in ("step_time_s", "samples_per_s", "bubble_fraction"):
        assert report["predicted"][key] == predicted[key]
    assert report["num_stages"] == len(plan_json["stages"]) == 3
    assert report["world_size"] == len(plan_json["ranks"]) == 5
    device_type = {r["rank"]: r["device_type"] for r in plan_json["ranks"]}
    for st, st_json, pred in zip(report["stages"], plan_json["stages"], predicted["stages"]):
        assert st["layers"] == st_json["block_names"]
        assert [r["rank"] for r in st["ranks"]] == st_json["ranks"]
        assert [r["share"] for r in st["ranks"]] == st_json["shares"]
        assert sum(st["devices"].values()) == len(st_json["ranks"])
        assert all(device_type[r["rank"]] == r["device_type"] for r in st["ranks"])
        assert st["tp_degree"] == 1
        for key in STAGE_KEYS:
            assert st[key] == pred[key]
        assert st["compute_s"] == pytest.approx(pred["fwd_s"] + pred["bwd_s"], rel=1e-5)
        assert st["comm_s"] == pytest.approx(pred["send_fwd_s"] + pred["send_bwd_s"], rel=1e-5)
    assert [(m["device_index"], m["mem_bytes"], m["capacity_bytes"]) for m in report["memory"]] == \
        [(m["device_index"], m["mem_bytes"], m["capacity_bytes"]) for m in predicted["memory"]]
    assert report["solver"]["status"] == plan_json["solver"]["status"] == "PINNED"
    assert report["solver"]["gap"] == plan_json["solver"]["gap"]
    assert report["solver"]["wall_s"] is not None  # from timings.json, apart from plan.json


def test_inspect_text_shows_stages_memory_and_solver(plans, capsys):
    _, out, _, _, _, _ = plans
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == format_inspect(inspect_plan(load(out))) + "\n"
    for needle in ("stage", "2x A100-80GB", "2x V100-32GB", "samples per micro-batch: 6 on r0 (A100-80GB), 2 on r1 (A100-80GB)",
                   "bubble", "samples/s", "solver PINNED", "efficiency", "of 74.5 GiB"):
        assert needle in text, needle


def _events_by_track(trace: dict) -> dict:
    tracks = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            tracks[e["pid"], e["tid"]].append(e)
    return tracks


@pytest.mark.parametrize("which", [0, 2])
def test_timeline_spans_do_not_overlap_and_span_the_step(plans, which):
    plan, out = plans[which], plans[which + 1]
    trace = json.loads((out / "timeline.json").read_text())
    step_us = plan.predicted["step_time_s"] * 1e6
    tracks = _events_by_track(trace)
    assert {pid for pid, _ in tracks} == {r.rank for r in plan.ranks}, "one track group per rank"
    for (rank, tid), events in tracks.items():
        events.sort(key=lambda e: e["ts"])
        for a, b in zip(events, events[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6 * step_us, (rank, tid, a["name"], b["name"])
    for r in plan.ranks:  # every rank runs F and B of every micro-batch
        names = [e["name"] for (pid, _), events in tracks.items() if pid == r.rank for e in events]
        for m in range(plan.num_microbatches):
            assert f"F mb{m}" in names and f"B mb{m}" in names
    start = min(e["ts"] for events in tracks.values() for e in events)
    end = max(e["ts"] + e["dur"] for events in tracks.values() for e in events)
    assert start == 0
    assert end == pytest.approx(step_us, rel=1e-5)
    kinds = {e["cat"] for events in tracks.values() for e in events}
    if len(plan.stages) > 1:
        assert {"F", "B", "send", "recv", "allreduce"} <= kinds
    png = (out / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 500_000


def test_timeline_of_64_ranks_has_no_overlap_and_renders(tmp_path):
    plan = _synthetic_plan(num_stages=16, per_stage=4, num_microbatches=16)
    spans = rank_spans(plan)
    assert len(spans) == 64
    for rank, rs in spans.items():
        by_track = defaultdict(list)
        for sp in rs:
            by_track[sp.track].append(sp)
        for track in by_track.values():
            track.sort(key=lambda sp: sp.start_s)
            assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(track, track[1:]))
    assert max(sp.end_s for rs in spans.values() for sp in rs) == pytest.approx(plan.predicted["step_time_s"])
    path = plan.timeline(tmp_path / "t64.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_explain_names_the_simulators_bottleneck(plans):
    plan = plans[0]
    stages = plan.predicted["stages"]
    timeline = simulate(make_schedule(plan.schedule, len(stages), plan.num_microbatches),
                        **{k: [st[k] for st in stages] for k in STAGE_KEYS})
    busy = defaultdict(float)
    for span in timeline.spans:
        if span.kind in ("F", "B"):
            busy[span.stage] += span.duration_s
    expected = max(sorted(busy), key=busy.get)
    report = explain(plan, time_limit_s=5)
    assert report["bottleneck"]["stage"] == expected == busiest_stage(plan_timeline(plan))
    assert report["bottleneck"]["bound"] in ("compute", "memory", "link")
    assert report["bottleneck"]["reason"]
    names = [a["name"] for a in report["alternatives"]]
    assert names == ["even split", "fastest type only", "at most 2 stages"]
    for alt in report["alternatives"]:
        assert alt["reason"]
        assert alt["step_time_s"] is None or alt["step_time_s"] > 0
    text = format_explain(report)
    assert f"bottleneck: stage {expected}" in text and "even split" in text


def test_stored_costs_reproduce_the_prediction(plans):
    """explain re-predicts alternatives from plan.json's costs: they must give the plan's own numbers."""
    from cost_models.cluster import load_cluster
    from hetcompile.predict import predict

    plan = load(plans[1])
    by_rank = {r.rank: r for r in plan.ranks}
    decision = PlanDecision(tuple(StageDecision(st.first_block, st.last_block,
                                                tuple(by_rank[r].device_index for r in st.ranks), st.shares)
                                  for st in plan.stages), plan.num_microbatches, plan.microbatch_size)
    predicted, _ = predict(decision, plan.model_costs(), load_cluster(plan.cluster), plan.schedule)
    assert predicted["step_time_s"] == pytest.approx(plan.predicted["step_time_s"], rel=1e-4)


def test_diff(plans, capsys):
    pinned, out_pinned, solved, out_solved, _, _ = plans
    assert diff_plans(pinned, pinned) == []
    assert main(["diff", str(out_pinned), str(out_pinned)]) == 0
    assert "the plans are the same" in capsys.readouterr().out
    lines = diff_plans(pinned, solved)
    text = "\n".join(lines)
    assert "schedule: 1f1b -> gpipe" in text
    assert "predicted step_time_s" in text
    if len(solved.stages) != len(pinned.stages):
        assert f"stages: 3 -> {len(solved.stages)}" in text
    assert main(["diff", str(out_pinned), str(out_solved)]) == 1
    assert capsys.readouterr().out.strip() == text


def test_load_round_trip_and_python_api(plans, tmp_path):
    pinned, out, _, _, _, _ = plans
    loaded = load(out)
    assert loaded.to_json_text() == pinned.to_json_text()  # floats in plan.json are rounded
    assert loaded.to_json_text() == (out / "plan.json").read_text()
    assert "costs" in json.loads((out / "plan.json").read_text())
    assert "timings" not in json.loads((out / "plan.json").read_text())
    assert loaded.program(0) == (out / "rank_0.py").read_text()
    with pytest.raises(UserError, match="ranks 0..4"):
        loaded.program(99)
    assert loaded.summary().startswith("plan ")
    trace = json.loads(loaded.timeline(tmp_path / "t.json").read_text())
    assert trace["traceEvents"]
    assert loaded.timeline(tmp_path / "t.png").read_bytes() == (out / "timeline.png").read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "newer"),
    (lambda d: d.update(schema_version=0), "older"),
    (lambda d: d.pop("schema_version"), "no valid schema_version"),
    (lambda d: d["stages"][1].update(shares="3"), "stages[1].shares"),
    (lambda d: d.pop("ranks"), "'ranks' is a required property"),
    (lambda d: d["predicted"].update(step_time_s=-1), "predicted.step_time_s"),
])
def test_bad_plan_json_is_a_clear_error(plans, tmp_path, capsys, edit, message):
    d = json.loads((plans[1] / "plan.json").read_text())
    edit(d)
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetcompile: error: ") and "Traceback" not in err
    assert "plan.json" in err and ("recompile" in err.lower() or "upgrade" in err.lower())


def test_not_json_is_a_clear_error(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load(tmp_path)


def test_progress_reports_phases_in_order(plans):
    events = plans[4]
    lasting = [text.split()[1] for text, transient in events if not transient]
    assert lasting == ["capture", "passes", "solve", "emit", "draw", "bound"]
    assert all(text.endswith(" s") for text, transient in events if not transient)
    assert any(transient for _, transient in events)
    # While CP-SAT searches: its incumbent and best bound (when the planner reports them).
    from hetcompile.planner import solve

    if "on_progress" in inspect.signature(solve).parameters:
        assert any("bound" in text and transient for text, transient in plans[5]), plans[5]


def test_terminal_progress_redraws_transient_lines():
    stream = io.StringIO()
    progress = _TerminalProgress(stream)
    progress("[1/4] capture ...", transient=True)
    progress("[1/4] capture   1.00 s")
    progress("[3/4] solve ... best", transient=True)
    progress.close()
    assert stream.getvalue() == ("  [1/4] capture ...\r\033[K  [1/4] capture   1.00 s\n"
                                 "  [3/4] solve ... best\r\033[K")


def test_layer_ranges():
    assert layer_ranges(["pre: a, b", "h.0", "h.1", "h.3", "post: loss"]) == "pre, h.0-1, h.3, post"


def _synthetic_plan(num_stages: int, per_stage: int, num_microbatches: int):
    """A plan without a model: enough for the timeline (decisions + the one predictor's numbers)."""
    import dataclasses

    from cost_models.cluster import load_cluster
    from hetcompile.ir import Block, ModelCosts
    from hetcompile.plan import Plan, RankSpec, StageSpec
    from hetcompile.predict import predict

    mb = 16
    blocks = tuple(Block(i, f"layers.{i}", 5e11, 1e8, 200_000_000, 50_000_000, 2e7, 4e6)
                   for i in range(2 * num_stages))
    costs = ModelCosts(blocks, num_microbatches * mb, "bf16")
    n = num_stages * per_stage
    cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": n // 2},
                                      {"device": "V100-32GB", "count": n - n // 2}]})
    stages = tuple(StageDecision(2 * s, 2 * s + 1, tuple(range(s * per_stage, (s + 1) * per_stage)),
                                 (mb // per_stage,) * per_stage) for s in range(num_stages))
    decision = PlanDecision(stages, num_microbatches, mb)
    predicted, _ = predict(decision, costs, cluster, "1f1b")
    devices = cluster.devices
    ranks = tuple(RankSpec(d, d, devices[d].type, devices[d].node, (s,), i, i * share, (i + 1) * share)
                  for s, st in enumerate(stages) for i, (d, share) in enumerate(zip(st.devices, st.shares)))
    specs = tuple(StageSpec(s, st.first_block, st.last_block, tuple(b.name for b in blocks[st.first_block:
                            st.last_block + 1]), st.devices, st.shares, (), ()) for s, st in enumerate(stages))
    return Plan(SCHEMA_VERSION, "synthetic", "synthetic.py", 0, num_microbatches * mb, num_microbatches, mb, "1f1b",
                cluster.to_json(), specs, ranks, (), (), "loss", (), predicted,
                {"status": "PINNED", "gap": 0.0}, costs=dataclasses.asdict(costs))


def test_bottleneck_known_answers():
    """Slower V100 stages bound by compute; the same plan with a full device next door is memory-bound."""
    import dataclasses

    from cost_models.cluster import load_cluster
    from hetcompile.explain import _bottleneck

    plan = _synthetic_plan(num_stages=4, per_stage=2, num_microbatches=8)
    cluster = load_cluster(plan.cluster)
    b = _bottleneck(plan, plan_timeline(plan), cluster)
    assert b["stage"] in (2, 3) and "V100" in b["devices"]  # stages 2-3 run on the slower V100s
    assert b["bound"] == "compute" and "FLOP-bound" in b["reason"]
    memory = [dict(m, mem_bytes=int(0.95 * m["capacity_bytes"])) if b["stage"] in m["stages"] else m
              for m in plan.predicted["memory"]]
    full = dataclasses.replace(plan, predicted={**plan.predicted, "memory": memory})
    b = _bottleneck(full, plan_timeline(full), cluster)
    assert b["bound"] == "memory" and "95%" in b["reason"]


def test_reports_show_tp_degree_and_parts():
    """A stage with TP shows its degree and uneven parts in inspect, diff and the compile summary."""
    import dataclasses

    from hetcompile.report import format_tp, summary

    plan = _synthetic_plan(2, 2, 4)
    plan = dataclasses.replace(plan, solver={**plan.solver, "num_variables": 0})
    tp_plan = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0], tp=2, tp_parts=(3, 1)),
                                                plan.stages[1]))
    assert format_tp(2, (3, 1)) == "TP 2 (3:1)" and format_tp(4) == "TP 4" and format_tp(1) == ""
    report = inspect_plan(tp_plan)
    assert (report["stages"][0]["tp_degree"], report["stages"][0]["tp_parts"]) == (2, [3, 1])
    assert "2 (3:1)" in format_inspect(report)
    assert "TP 2 (3:1)" in summary(tp_plan) and "TP 2" not in summary(plan)
    assert "stage 0 TP: none -> TP 2 (3:1)" in diff_plans(plan, tp_plan)


def test_explain_names_a_shared_all_reduce_that_ends_the_step(examples):
    """GPT-2 on A100 + V100 (the README's example) in two stages: its tied embedding is summed over
    both stages' six devices across the nodes after the last backward, longer than either stage's
    own all-reduce. (Unpinned, the planner avoids that: NOTE: [tied parameters in the objective].)"""
    plan = hetcompile.compile(str(examples / "gpt2.py"), str(examples / "a100_v100.json"), time_limit_s=5, pp=2)
    (shared,) = plan.predicted["shared_allreduce"]
    assert shared["seconds"] > max(st["allreduce_s"] for st in plan.predicted["stages"])
    report = explain(plan, time_limit_s=5)
    assert report["bottleneck"]["bound"] == "link"
    assert "the all-reduce of the parameters stages 0 and 1 share (tied weights) over 6 devices" in \
        report["bottleneck"]["reason"]
