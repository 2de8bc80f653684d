"""Compile time: the full ``hetcompile`` command (capture, passes, plan, emit) on big clusters.

    .venv/bin/python benchmarks/compile_time.py [--rows 0,1,...] [--repeats 3] [--no-write]

Each row runs ``python -m hetcompile.cli MODEL --cluster SPEC -o OUT --force``
in a fresh process ``--repeats`` times and reports the median run: its wall time
(beside every run's), its phases (from ``plan.timings``, measured by the same
process through the Python API) and its peak RSS. Clusters have three device types (H100 : A100 : V100 = 1 : 2 : 1,
8 per node). Targets: GPT-3 175B-shaped on 1,024 GPUs < 60 s and < 4 GiB;
Llama-3 8B-shaped on 64 GPUs < 10 s. Writes the "Compile time" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import MODELS, write_model_file  # noqa: E402
from benchmarks.plan_quality import write_section as _write_any_section  # noqa: E402

SECTION = "## Compile time"
# (model, GPUs): the two targets, then each axis of the ladder (64/256/1,024 GPUs; 32/80/96 layers).
LADDER = [
    ("llama3-8b", 64),
    ("llama2-70b", 256),
    ("gpt3-175b", 1024),
    ("llama3-8b", 1024),
    ("gpt3-175b", 256),  # on 64 GPUs it does not fit: 2.8 TB of weights, gradients and Adam state
]
TARGETS = {("gpt3-175b", 1024): (60.0, 4.0), ("llama3-8b", 64): (10.0, None)}

# Runs in the child: the API path the CLI takes, plus the phase timings and peak RSS.
_CHILD = """
import json, os, resource, sys, time
start = time.perf_counter()
import hetcompile
from hetcompile.cli import main
rc = main([sys.argv[1], "--cluster", sys.argv[2], "-o", sys.argv[3], "--force"])
wall = time.perf_counter() - start
plan = json.load(open(sys.argv[3] + "/plan.json"))
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "child_rss_GiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                  "stages": len(plan["stages"]), "ranks": len(plan["ranks"]), "solver": plan["solver"],
                  "efficiency": plan["predicted"].get("efficiency")}), flush=True)
os._exit(rc)  # as the command ends (NOTE: [quick exit] in hetcompile/cli.py)
"""


def cluster_spec(num_gpus: int) -> dict:
    quarter = num_gpus // 4
    mix = [("H100-80GB", quarter), ("A100-80GB", 2 * quarter), ("V100-32GB", quarter)]
    return {"nodes": [{"device": name, "count": 8} for name, n in mix for _ in range(n // 8)], "inter_node_GBps": 12.5}


def run_row(model: str, num_gpus: int, tmp: Path) -> dict:
    model_file = write_model_file(model, tmp)
    spec = tmp / f"cluster_{num_gpus}.json"
    spec.write_text(json.dumps(cluster_spec(num_gpus)))
    out = tmp / f"out_{model}_{num_gpus}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(model_file), str(spec), str(out)],
                          capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
    outer_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{model} on {num_gpus} GPUs failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    phases = {}
    for line in done.stdout.splitlines():  # the CLI's summary line "compile: capture 1.2 s | ..."
        if line.strip().startswith("compile:"):
            phases["summary"] = line.strip().removeprefix("compile:").strip().replace(" | ", ", ")
    return {"model": model, "layers": MODELS[model].num_layers, "gpus": num_gpus, "process_s": outer_s, **result,
            **phases}


HEADER = ("| model | layers | GPUs | wall s (process, median) | every run s | phases (median run) | peak RSS GiB "
          "| largest child's peak RSS GiB | stages | ranks | solver | target |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def fmt(r: dict) -> str:
    target = TARGETS.get((r["model"], r["gpus"]))
    verdict = ""
    if target:
        ok = r["process_s"] < target[0] and (target[1] is None or r["peak_rss_GiB"] < target[1])
        verdict = f"< {target[0]:g} s" + (f", < {target[1]:g} GiB" if target[1] else "") + (": met" if ok else ": MISSED")
    solver = r["solver"]
    runs = ", ".join(f"{t:.1f}" for t in r["runs_s"])
    return (f"| {r['model']} | {r['layers']} | {r['gpus']} | {r['process_s']:.1f} | {runs} | {r.get('summary', '')} "
            f"| {r['peak_rss_GiB']:.2f} | {r['child_rss_GiB']:.2f} | {r['stages']} | {r['ranks']} | {solver['status']} "
            f"(gap {solver['gap'] * 100:.1f}%) | {verdict} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(str(i) for i in range(len(LADDER))))
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per row; the row reports the median run (this VM's speed swings by tens of %%)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = [LADDER[int(i)] for i in args.rows.split(",")]
    load_at_start = os.getloadavg()[0]
    results = []
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for model, gpus in rows:
            try:
                runs = sorted((run_row(model, gpus, Path(tmp)) for _ in range(args.repeats)),
                              key=lambda r: r["process_s"])
            except RuntimeError as e:
                print(f"| {model} | {MODELS[model].num_layers} | {gpus} | failed: {str(e).splitlines()[1][:200]} |")
                continue
            r = {**runs[(len(runs) - 1) // 2], "runs_s": [run["process_s"] for run in runs]}
            results.append(r)
            print(fmt(r), flush=True)
    if not args.no_write:
        command = "`.venv/bin/python benchmarks/compile_time.py" + (
            f" --rows {args.rows}" if len(rows) != len(LADDER) else "") + (
            f" --repeats {args.repeats}`" if args.repeats != 3 else "`")
        lines = [SECTION, "", f"Produced by {command} on the 2-core development machine (1-minute load average "
                 f"{load_at_start:.2f} at the start; others' jobs would inflate the times). Wall time is the whole "
                 "`hetcompile` process, imports included. The planner runs in a process forked before the capture "
                 "(NOTE: [planner process] in hetcompile/planner_process.py), which forks one more per device type "
                 "for HetHub's bound (`bound`: the wait for them after the emit and the draw of the timeline); "
                 "children share the compiler's pages until they write them, so their peak RSS mostly overlaps "
                 "its own.",
                 "", HEADER, RULE] + [fmt(r) for r in results] + [""]
        _write_any_section("\n".join(lines), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
