"""The plan: decisions (who runs what, in which order) and predictions, as plain data.

``plan.json`` is the canonical serialisation (sorted keys, fixed float
formatting), so the same inputs give a byte-identical file. Decisions and
predictions are kept apart: ``predicted`` holds what the cost model expects,
everything else is what the emitted programs do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hetcompile.errors import UserError

SCHEMA_VERSION = 2  # 2: a rank runs several stages (interleaved schedule)
TIMINGS_FILE = "timings.json"  # compile phase -> seconds, next to plan.json


@dataclass(frozen=True)
class StageInput:
    """One input of a stage's forward: a parameter, buffer, constant, batch tensor or a value from another stage."""

    name: str  # the stage function's argument name
    kind: str  # "param" | "buffer" | "constant" | "input" | "value"
    target: str = ""  # state-dict name (param/buffer) or constant key
    input_index: int = -1  # position in the flattened batch (kind "input")


@dataclass(frozen=True)
class ParamShard:
    """A parameter split for tensor parallelism: TP rank r holds the indices ``ranges[r]`` of ``dim``."""

    param: str  # state-dict name
    dim: int
    ranges: tuple[tuple[tuple[int, int], ...], ...]  # per TP rank: half-open intervals


@dataclass(frozen=True)
class StageSpec:
    """A pipeline stage: a contiguous run of blocks, run data-parallel by ``ranks``."""

    index: int
    first_block: int
    last_block: int
    block_names: tuple[str, ...]
    ranks: tuple[int, ...]
    shares: tuple[int, ...]  # samples of each micro-batch per rank, in ``ranks`` order
    inputs: tuple[StageInput, ...]
    outputs: tuple[str, ...]  # values sent to later stages, and the loss on the last stage
    recompute: bool = False  # keep only the stage's inputs in forward; rerun it in backward
    tp: int = 1  # tensor-parallel degree: ranks[i*tp:(i+1)*tp] are the TP group of replica i
    tp_parts: tuple[int, ...] = ()  # relative shard sizes of a TP group's members; () = even
    param_shards: tuple[ParamShard, ...] = ()  # how each split parameter is cut (passes/partition_ops.py)
    left_whole: tuple[str, ...] = ()  # matmuls TP could not split, and why (they run replicated)


@dataclass(frozen=True)
class RankSpec:
    """One process of the job: a device, the stages it runs and its slice of every micro-batch."""

    rank: int
    device_index: int  # index in the cluster's device list
    device_type: str
    node: int
    stages: tuple[int, ...]  # one, or with the interleaved schedule s, s + p, ... (same ranks and shares)
    replica: int
    sample_lo: int  # samples [sample_lo, sample_hi) of each micro-batch
    sample_hi: int
    tp_rank: int = 0  # position in the stage's tensor-parallel group


@dataclass(frozen=True)
class ValueSpec:
    """A tensor that crosses stages: its producer, consumers and shape (``"B*k"`` marks the batch dim)."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    shape: tuple[Any, ...]  # ints, and "B*k" for a dim of k * (samples) rows
    dtype: str
    batch_coef: int  # k when dim 0 is k * samples; 0 for a value without the batch (sent whole)
    requires_grad: bool


@dataclass(frozen=True)
class GradGroup:
    """Ranks that hold the same parameters and sum their gradients (data parallel, tied weights)."""

    ranks: tuple[int, ...]
    params: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A compiled plan. ``save`` writes ``plan.json`` and the per-rank programs."""

    schema_version: int
    fingerprint: str
    model_file: str
    seed: int
    global_batch: int
    num_microbatches: int
    microbatch_size: int
    schedule: str
    cluster: dict
    stages: tuple[StageSpec, ...]
    ranks: tuple[RankSpec, ...]
    values: tuple[ValueSpec, ...]
    grad_groups: tuple[GradGroup, ...]
    loss: str  # name of the loss value, an output of the last stage
    idle_devices: tuple[int, ...]
    predicted: dict  # predictions, apart from the decisions above
    solver: dict
    # The model's blocks (hetcompile.ir.ModelCosts as plain data), so that inspect and explain
    # can re-predict alternatives from the output directory alone, without re-capturing.
    costs: dict = field(default_factory=dict)
    # The output directory's other files, name -> text or bytes: the programs, and the timeline once drawn.
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    timings: dict = field(default_factory=dict, compare=False, repr=False)  # compile phase -> seconds

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def chunks(self) -> int:
        """Stages per rank: 1, or more with the interleaved schedule."""
        return len(self.ranks[0].stages)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("sources")
        d.pop("timings")  # wall times vary run to run; plan.json stays byte-identical
        return d

    @classmethod
    def from_json(cls, d: dict, sources: dict | None = None, timings: dict | None = None, *,
                  check: bool = True) -> "Plan":
        if check:
            check_plan_json(d)
        d = dict(d)
        d["stages"] = tuple(StageSpec(**{**s, "block_names": tuple(s["block_names"]), "ranks": tuple(s["ranks"]),
                                         "shares": tuple(s["shares"]), "outputs": tuple(s["outputs"]),
                                         "tp_parts": tuple(s.get("tp_parts", ())),
                                         "param_shards": tuple(ParamShard(p["param"], p["dim"], tuple(
                                             tuple(tuple(iv) for iv in r) for r in p["ranges"]))
                                                               for p in s.get("param_shards", ())),
                                         "left_whole": tuple(s.get("left_whole", ())),
                                         "inputs": tuple(StageInput(**i) for i in s["inputs"])})
                            for s in d["stages"])
        d["ranks"] = tuple(RankSpec(**{**r, "stages": tuple(r["stages"])}) for r in d["ranks"])
        d["values"] = tuple(ValueSpec(**{**v, "consumers": tuple(v["consumers"]), "shape": tuple(v["shape"])})
                            for v in d["values"])
        d["grad_groups"] = tuple(GradGroup(tuple(g["ranks"]), tuple(g["params"])) for g in d["grad_groups"])
        d["idle_devices"] = tuple(d["idle_devices"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, sources=sources or {}, timings=timings or {})

    def to_json_text(self) -> str:
        return dumps(self.to_json())

    def save(self, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write plan.json and the programs into ``out_dir`` atomically (a temporary directory renamed at the end)."""
        from hetcompile.output import write_atomically

        from hetcompile.timeline import timeline_files

        # The compiler draws the timeline while HetHub's bound is searched (its "draw" phase).
        drawn = {} if "timeline.png" in self.sources else timeline_files(self)
        files = {"plan.json": self.to_json_text(), **self.sources, **drawn}
        if self.timings:
            # Apart from plan.json: wall times vary run to run, plan.json must not.
            files[TIMINGS_FILE] = dumps(self.timings)
        return write_atomically(Path(out_dir), files, force=force)

    def summary(self) -> str:
        """The short report the CLI prints after compiling.

        >>> print(load("out/gpt2").summary())  # doctest: +SKIP
        """
        from hetcompile.report import summary

        return summary(self)

    def explain(self, *, time_limit_s: float = 10.0) -> str:
        """Why this plan: its bottleneck and the predicted step time of rejected alternatives.

        >>> print(load("out/gpt2").explain())  # doctest: +SKIP
        """
        from hetcompile.explain import explain, format_explain

        return format_explain(explain(self, time_limit_s=time_limit_s))

    def timeline(self, path: str | Path) -> Path:
        """Write the predicted timeline: a ``.json`` path gets a Chrome trace (Perfetto), anything else a PNG.

        >>> load("out/gpt2").timeline("gpt2.png")  # doctest: +SKIP
        """
        from hetcompile.timeline import chrome_trace, timeline_png

        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(chrome_trace(self)) + "\n")
        else:
            path.write_bytes(timeline_png(self))
        return path

    def model_costs(self):
        """The model's blocks as :class:`~hetcompile.ir.ModelCosts` (stored in plan.json by the compiler)."""
        from hetcompile.ir import Block, ModelCosts, SharedParams

        if not self.costs:
            raise UserError("This plan has no model costs (plan.json has no \"costs\"); it was made by an older "
                            "hetcompile. Recompile the plan to inspect its alternatives.")
        return ModelCosts(tuple(Block(**b) for b in self.costs["blocks"]), self.costs["global_batch"],
                          self.costs["dtype"], tuple(SharedParams(tuple(p["blocks"]), p["param_bytes"],
                                                                  p["num_param_tensors"])
                                                     for p in self.costs.get("shared_params", ())))

    def program(self, rank: int) -> str:
        """The emitted source of one rank.

        >>> print(load("out/gpt2").program(0))  # doctest: +SKIP
        """
        if f"rank_{rank}.py" not in self.sources:
            raise UserError(f"Rank {rank} does not exist: this plan has ranks 0..{self.world_size - 1}.")
        return self.sources[f"rank_{rank}.py"]


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, 2-space indent, floats rounded to 6 significant digits."""
    return json.dumps(_round(obj), sort_keys=True, indent=2) + "\n"


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(dumps(list(parts)).encode()).hexdigest()[:16]


def load(path: str | Path) -> Plan:
    """Load a saved plan (the directory that ``hetcompile`` wrote, or its plan.json).

    >>> plan = load("out/gpt2")  # doctest: +SKIP
    """
    path = Path(path)
    plan_file = path / "plan.json" if path.is_dir() else path
    if not plan_file.is_file():
        raise UserError(f"No plan at {str(path)!r}: expected a directory written by `hetcompile MODEL --cluster "
                        "SPEC -o DIR`, holding plan.json. Compile a plan first, or fix the path.")
    try:
        d = json.loads(plan_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{plan_file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
                        "Recompile the plan.") from e
    try:
        check_plan_json(d)
    except UserError as e:
        raise UserError(f"{plan_file}: {e}") from None
    sources = {p.name: p.read_text() for p in plan_file.parent.glob("*.py")}
    timings_file = plan_file.parent / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    return Plan.from_json(d, sources, timings, check=False)


def plan_schema() -> dict:
    """The JSON Schema of plan.json (``hetcompile/plan_schema.json``, shipped in the package)."""
    return json.loads((Path(__file__).parent / "plan_schema.json").read_text())


def check_plan_json(d: Any) -> None:
    """Raise UserError naming what is wrong when ``d`` is not a plan.json this hetcompile reads.

    The version is checked first: a newer file may fail the schema for reasons
    that only an upgrade fixes, and the user should be told that, not the symptom.
    """
    import jsonschema

    if not isinstance(d, dict):
        raise UserError(f"plan.json must hold a JSON object, found {type(d).__name__}. Recompile the plan.")
    version = d.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"plan.json has no valid schema_version (found {version!r}); it was not written by "
                        "hetcompile or was edited by hand. Recompile the plan.")
    if version > SCHEMA_VERSION:
        raise UserError(f"plan.json has schema_version {version}, newer than the version {SCHEMA_VERSION} this "
                        "hetcompile reads: it was written by a newer hetcompile. Upgrade hetcompile, or recompile "
                        "the plan with this one.")
    if version < SCHEMA_VERSION:
        raise UserError(f"plan.json has schema_version {version}, older than the version {SCHEMA_VERSION} this "
                        "hetcompile reads. Recompile the plan with this version of hetcompile.")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(plan_schema()).iter_errors(d))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise UserError(f"plan.json does not match the plan schema at {where or 'the top level'}: "
                        f"{error.message}. The file was damaged or edited by hand; recompile the plan.")
