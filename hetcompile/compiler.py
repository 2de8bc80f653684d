"""The compiler, top to bottom: capture, passes, plan, predict, lower.

>>> plan = compile("examples/gpt2.py", "examples/a100_v100.json")  # doctest: +SKIP
>>> print(plan.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cost_models.cluster import load_cluster
from hetcompile.capture import capture
from hetcompile.errors import UserError
from hetcompile.lowering import lower
from hetcompile.modelfile import ModelFile, load_model_file, module_model_file
from hetcompile.block_profile import block_signatures, optimizer_signature
from hetcompile.planner_process import PlannerProcess
from hetcompile.predict import predict
from hetcompile.report import PHASES
from hetcompile.schedule import SCHEDULES
from passes.annotate_costs import annotate_costs
from passes.causal_attention import causal_attention
from passes.grouped_attention import grouped_attention
from passes.group_blocks import group_blocks
from passes.inline_grad_regions import inline_grad_regions
from passes.mark_replicable import mark_replicable
from passes.partition_ops import annotate_tp

log = logging.getLogger(__name__)


@contextmanager
def _phase(name: str, timings: dict, progress):
    """Time one phase into ``timings``; tell ``progress`` (when given) it started and how long it took.

    ``progress(text, transient=False)``: a transient line is replaced by the next one
    (the CLI redraws it in place on a terminal).
    """
    start = time.perf_counter()
    tag = f"[{PHASES.index(name) + 1}/{len(PHASES)}] {name}" if name in PHASES else name
    _tell(progress, f"{tag} ...", transient=True)
    yield
    timings[name] = time.perf_counter() - start
    _tell(progress, f"{tag:<16} {timings[name]:7.2f} s")


# NOTE: [few full collections] A compile allocates millions of objects that live until it
# ends (torch's and transformers' modules, fake tensors, FX graphs, sympy expressions), and
# CPython's default thresholds scan all of them in a full collection about every 100,000
# survivors: on Llama-3 8B / 64 GPUs eight full collections took 1.0-1.2 s of a 12 s compile,
# against 0.1 s with a full collection ten times rarer. Young generations are collected as usual.
FULL_COLLECTION_EVERY = 100  # collections of the middle generation (CPython's default: 10)


@contextmanager
def _few_full_collections():
    """Collect the oldest generation rarely while compiling (NOTE: [few full collections])."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], max(thresholds[2], FULL_COLLECTION_EVERY))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _tell(progress, text: str, *, transient: bool = False) -> None:
    """Call ``progress``; a plain one-argument callable (``print``) gets only the lasting lines."""
    if not progress:
        return
    try:
        takes_transient = "transient" in inspect.signature(progress).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        takes_transient = False
    if takes_transient:
        progress(text, transient=transient)
    elif not transient:
        progress(text)


def _solver_progress(progress, start_s: float):
    """An ``on_progress(objective_s, bound_s)`` for the planner that reports the search as a transient line."""
    if not progress:
        return None

    def on_progress(objective_s: float, bound_s: float) -> None:
        gap = (objective_s - bound_s) / objective_s if objective_s > 0 else 0.0
        tag = f"[{PHASES.index('solve') + 1}/{len(PHASES)}] solve"
        _tell(progress, f"{tag} ... {time.perf_counter() - start_s:5.1f} s: best step "
                        f"{objective_s * 1e3:.4g} ms, bound {bound_s * 1e3:.4g} ms (gap {gap * 100:.1f}%)",
              transient=True)

    return on_progress


@_few_full_collections()
def compile(model, cluster, example_inputs=None, *, optimizer=None, schedule: str = "auto",
            microbatches: int | None = None, seed: int = 0, max_stages: int | None = None,
            time_limit_s: float = 300.0, progress=None, decision=None, tp: int | None = None,
            pp: int | None = None, dp: int | None = None):
    """Compile a model for a cluster into a :class:`~hetcompile.plan.Plan`.

    ``model`` is the path of a model file (see :mod:`hetcompile.modelfile`), a
    loaded :class:`ModelFile`, or an ``nn.Module`` with ``example_inputs``: the
    global batch, on which the module's output is the loss. A module's plan
    trains its current weights on that batch at every step, with ``optimizer``
    (a picklable ``params -> Optimizer``; default AdamW, lr 1e-3); its class
    must be importable by the ranks.
    ``cluster`` is a spec path, a parsed spec dict, or a ``Cluster``. A
    ``decision`` (a :class:`~hetcompile.planner.PlanDecision`) pins the whole
    plan and skips the solver. ``tp``, ``pp`` and ``dp`` pin parts of it: every
    stage's tensor-parallel degree, the number of pipeline stages, every stage's
    data-parallel replicas; the planner chooses the rest.

    >>> plan = compile("examples/mlp.py", "examples/a100_v100.json", schedule="gpipe")  # doctest: +SKIP
    """
    if schedule not in SCHEDULES and schedule != "auto":
        raise UserError(f"Unknown schedule {schedule!r}. Choose one of: {', '.join(sorted(SCHEDULES))}, "
                        "or 'auto' to let the planner choose.")
    timings: dict[str, float] = {}
    mf = _as_model_file(model, example_inputs, optimizer)
    clu = cluster if hasattr(cluster, "devices") else load_cluster(cluster)
    # Started first: it imports the search and the drawing while the model is captured.
    with PlannerProcess() as planner:
        return _compile(planner, mf, clu, timings, progress, decision=decision, schedule=schedule,
                        microbatches=microbatches, seed=seed, max_stages=max_stages, time_limit_s=time_limit_s,
                        tp=tp, pp=pp, dp=dp)


def _compile(planner: PlannerProcess, mf: ModelFile, clu, timings: dict, progress, *, decision, schedule: str,
             microbatches: int | None, seed: int, max_stages: int | None, time_limit_s: float, tp, pp, dp):
    cap, costs = analyze(mf, seed=seed, timings=timings, progress=progress)
    # None lets the planner choose the micro-batch count jointly with the stages.
    num_microbatches = microbatches
    if num_microbatches is not None and (num_microbatches < 1 or cap.global_batch % num_microbatches):
        raise UserError(f"--microbatches {num_microbatches} does not divide the global batch of "
                        f"{cap.global_batch} samples. Choose a divisor of {cap.global_batch}, or leave it "
                        "out to let the planner choose.")
    # HetHub's bound: each device type alone with its best plan, same model and global batch,
    # searched beside the plan and the lowering (NOTE: [searches side by side] in hetcompile/baselines.py).
    planner.start_bound(costs, clu, schedule=schedule, seed=seed)
    with _phase("solve", timings, progress):
        # Incumbent and bound while CP-SAT searches.
        decision, report = planner.solve(costs, clu, decision=decision, num_microbatches=num_microbatches,
                                         schedule=schedule, max_stages=max_stages, time_limit_s=time_limit_s,
                                         seed=seed, tp=tp, pp=pp, dp=dp,
                                         on_progress=_solver_progress(progress, time.perf_counter()))
        if schedule == "auto":
            schedule = decision.schedule
    with _phase("emit", timings, progress):
        predicted, _ = predict(decision, costs, clu, schedule)
        solver = {"status": report.status, "gap": report.gap, "objective_s": report.objective_s,
                  "best_bound_s": report.best_bound_s, "num_variables": report.num_variables,
                  # True only when the wall-clock safety net cut the search: then the plan may vary run to run.
                  "wall_limit_hit": report.wall_limit_hit}
        plan = lower(cap, decision, clu, schedule=schedule, seed=seed, model_file=mf.name,
                     block_names=[b.name for b in costs.blocks], predicted=predicted, solver=solver,
                     model_source=mf.source_text(), data_files=mf.data_files, before_emit=planner.start_draw)
    with _phase("draw", timings, progress):  # drawn in the planner process while the programs were emitted
        plan = dataclasses.replace(plan, sources={**plan.sources, **planner.drawn()})
    with _phase("bound", timings, progress):
        upper_bound = sum(planner.bound().values())
    predicted["upper_bound_samples_per_s"] = upper_bound
    predicted["efficiency"] = predicted["samples_per_s"] / upper_bound if upper_bound > 0 else 0.0
    # The block costs travel in plan.json: inspect/explain re-predict alternatives from OUT alone.
    return dataclasses.replace(plan, costs=dataclasses.asdict(costs),
                               timings={**timings, "solver_wall_s": report.wall_s})


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
        mark_replicable(cap)
        causal_attention(cap)
        grouped_attention(cap)
        annotate_costs(cap)
        costs = annotate_tp(cap, group_blocks(cap))
        # The keys of the blocks' and the optimizer's measured times in a device profile
        # (hetcompile/block_profile.py).
        costs = dataclasses.replace(costs, optimizer=optimizer_signature(mf), blocks=tuple(
            dataclasses.replace(b, signature=sig) for b, sig in zip(costs.blocks, block_signatures(cap, costs))))
    return cap, costs


def _as_model_file(model, example_inputs, optimizer=None) -> ModelFile:
    if isinstance(model, ModelFile):
        return model
    if isinstance(model, (str, Path)):
        return load_model_file(model)
    if isinstance(model, torch.nn.Module):
        return module_model_file(model, example_inputs, optimizer)
    raise UserError(f"hetcompile.compile: model must be a model file path or a torch.nn.Module, got "
                    f"{type(model).__name__}. Pass the path of a file that defines get_model() and get_batch(step).")
