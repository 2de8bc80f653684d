"""The compiler, top to bottom: capture, passes, plan, predict, lower.

>>> plan = compile("examples/gpt2.py", "examples/a100_v100.json")  # doctest: +SKIP
>>> print(plan.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cost_models.cluster import load_cluster
from hetcompile.capture import capture
from hetcompile.errors import UserError
from hetcompile.lowering import lower
from hetcompile.modelfile import ModelFile, load_model_file
from hetcompile.planner import SolverReport, solve
from hetcompile.predict import predict
from hetcompile.schedule import SCHEDULES
from passes.annotate_costs import annotate_costs
from passes.group_blocks import group_blocks
from passes.inline_grad_regions import inline_grad_regions

log = logging.getLogger(__name__)


@contextmanager
def _phase(name: str, timings: dict, progress):
    start = time.perf_counter()
    if progress:
        progress(f"{name} ...")
    yield
    timings[name] = time.perf_counter() - start
    if progress:
        progress(f"{name} done in {timings[name]:.2f} s")


def default_microbatches(global_batch: int) -> int:
    """4 micro-batches when the batch allows it, else the largest divisor of the batch below 4."""
    return next(m for m in (4, 3, 2, 1) if global_batch % m == 0)


def compile(model, cluster, example_inputs=None, *, schedule: str = "1f1b", microbatches: int | None = None,
            seed: int = 0, max_stages: int | None = None, time_limit_s: float = 30.0, progress=None,
            decision=None):
    """Compile a model for a cluster into a :class:`~hetcompile.plan.Plan`.

    ``model`` is the path of a model file (see :mod:`hetcompile.modelfile`), a
    loaded :class:`ModelFile`, or an ``nn.Module`` with ``example_inputs`` (a
    batch whose model output is the loss; such a plan can be inspected and
    saved, and runs with the module's class importable and the same batch).
    ``cluster`` is a spec path, a parsed spec dict, or a ``Cluster``. A
    ``decision`` (a :class:`~hetcompile.planner.PlanDecision`) pins the whole
    plan and skips the solver.

    >>> plan = compile("examples/mlp.py", "examples/a100_v100.json", schedule="gpipe")  # doctest: +SKIP
    """
    if schedule not in SCHEDULES:
        raise UserError(f"Unknown schedule {schedule!r}. Choose one of: {', '.join(sorted(SCHEDULES))}.")
    timings: dict[str, float] = {}
    mf = _as_model_file(model, example_inputs)
    clu = cluster if hasattr(cluster, "devices") else load_cluster(cluster)
    cap, costs = analyze(mf, seed=seed, timings=timings, progress=progress)
    num_microbatches = microbatches or default_microbatches(cap.global_batch)
    if num_microbatches < 1 or cap.global_batch % num_microbatches:
        raise UserError(f"--microbatches {num_microbatches} does not divide the global batch of "
                        f"{cap.global_batch} samples. Choose a divisor of {cap.global_batch}.")
    with _phase("solve", timings, progress):
        if decision is None:
            decision, report = solve(costs, clu, num_microbatches=num_microbatches, schedule=schedule,
                                     max_stages=max_stages, time_limit_s=time_limit_s, seed=seed)
        else:
            report = SolverReport(status="PINNED", gap=0.0, objective_s=0.0, best_bound_s=0.0, wall_s=0.0,
                                  num_variables=0)
    with _phase("emit", timings, progress):
        predicted, _ = predict(decision, costs, clu, schedule)
        solver = {"status": report.status, "gap": report.gap, "objective_s": report.objective_s,
                  "best_bound_s": report.best_bound_s, "num_variables": report.num_variables}
        plan = lower(cap, decision, clu, schedule=schedule, seed=seed, model_file=mf.path.name,
                     block_names=[b.name for b in costs.blocks], predicted=predicted, solver=solver,
                     model_source=mf.path.read_text())
    return dataclasses.replace(plan, timings={**timings, "solver_wall_s": report.wall_s})


def analyze(model, *, seed: int = 0, timings: dict | None = None, progress=None):
    """Capture and run the passes: the annotated graph and the blocks' costs (plain data).

    >>> cap, costs = analyze("examples/gpt2.py")  # doctest: +SKIP
    >>> costs.num_blocks
    6
    """
    timings = {} if timings is None else timings
    mf = _as_model_file(model, None)
    with _phase("capture", timings, progress):
        cap = capture(mf, seed=seed)
    with _phase("passes", timings, progress):
        inline_grad_regions(cap.gm)
        annotate_costs(cap)
        costs = group_blocks(cap)
    return cap, costs


def _as_model_file(model, example_inputs) -> ModelFile:
    if isinstance(model, ModelFile):
        return model
    if isinstance(model, (str, Path)):
        return load_model_file(model)
    if isinstance(model, torch.nn.Module):
        raise UserError("hetcompile.compile needs a model file for now: pass the path of a file that defines "
                        "get_model() and get_batch(step). Emitted programs rebuild the model from that file "
                        "on every rank.")
    raise UserError(f"hetcompile.compile: model must be a model file path, got {type(model).__name__}.")
