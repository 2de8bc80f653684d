"""Training checkpoints that survive a change of plan.

A checkpoint is a directory ``ROOT/step_K`` (K = the number of steps trained,
so a resumed run starts at step K) written with ``torch.distributed.checkpoint``
(DCP) by every rank at once, plus a small manifest written last::

    ROOT/step_00000004/
        .metadata, __0_0.distcp, ...   DCP: every rank's tensors
        hetcompile_checkpoint.json     version, step, plan fingerprint (written last: the checkpoint is complete)

# NOTE: [checkpoint keys are parameter names, never ranks or stages]
Every entry is keyed by the *original* parameter name (``get_model()``'s
``named_parameters``), never by a rank or a stage:

    model/NAME              the parameter
    optim/NAME/STATE        the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq;
                            SGD: momentum_buffer), so it follows its parameter to any plan
    rng/rankR               rank R's torch RNG state (restored only by a rank of the same number)

Ranks that hold the same parameter (data-parallel replicas, tied weights on two
stages) save the same key with the same value, and DCP's planner writes one copy.
On resume, each rank of the *new* plan, whatever its stages and shares, asks
DCP for the keys of its own parameters; the shapes come from the checkpoint's
metadata, so optimizer state is rebuilt without a warm-up step.

# NOTE: [tensor-parallel parameters are saved whole]
A member of a tensor-parallel group holds only its slice of a split parameter
(``StageSpec.param_shards``), and of the optimizer state shaped like it. On
save, the group puts each one together (:func:`tp.gather_param`: zeros, its own
slice, all-reduce), one tensor at a time, and every member saves the whole
tensor under the usual key, exactly as a rank without tensor parallelism would.
So the format is the same for every plan: a tensor-parallel plan resumes a
checkpoint of a plan without, and the reverse, at any degree or split. On
resume, a member reads the whole tensors and keeps its slice
(:func:`tp.local_param`). Scalar state (AdamW's step) is the same on every
member and saved as is. The cost: the whole tensors of the split parameters
(and their state) are held in host memory during a save or a load, but only
one at a time on the device.

The step directory is first written as ``ROOT/.step_K.tmp`` and renamed by
rank 0 once every rank has saved: a killed run leaves no half checkpoint that
``--resume`` could pick.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import torch

from hetcompile.errors import UserError
from hetcompile.plan import ParamShard
from hetcompile.runtime import tp

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
MANIFEST = "hetcompile_checkpoint.json"
_STEP_PREFIX = "step_"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's manifest says about it."""

    path: Path  # the step directory
    version: int
    step: int  # steps already trained; a resumed run trains steps step..N-1
    plan_fingerprint: str  # the plan that wrote it (informative: any plan of the same model may resume)
    world_size: int


def step_dir(root: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after ``step`` training steps."""
    return Path(root) / f"{_STEP_PREFIX}{step:08d}"


def read_manifest(path: str | Path) -> CheckpointInfo:
    """Read and version-check the manifest of one checkpoint directory.

    >>> read_manifest("ckpt/step_00000004").step  # doctest: +SKIP
    4
    """
    path = Path(path)
    manifest = path / MANIFEST
    try:
        d = json.loads(manifest.read_text())
        version = d["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest} is missing or damaged ({type(e).__name__}: {e}); this is not a complete "
                        "hetcompile checkpoint. Resume from another step directory, or from its parent "
                        "directory to take the latest complete one.") from None
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(f"Checkpoint {path} has version {version!r}, newer than version {CHECKPOINT_VERSION} "
                        "that this hetcompile reads: it was written by a newer hetcompile. Upgrade hetcompile "
                        "to resume from it.")
    if version < CHECKPOINT_VERSION:
        raise UserError(f"Checkpoint {path} has version {version}, older than version {CHECKPOINT_VERSION} that "
                        "this hetcompile reads. Resume it with the hetcompile that wrote it, or start training "
                        "anew without --resume.")
    return CheckpointInfo(path=path, version=version, step=int(d["step"]),
                          plan_fingerprint=str(d.get("plan_fingerprint", "")), world_size=int(d.get("world_size", 0)))


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """The checkpoint at ``path``: a step directory, or a root whose latest complete step directory is taken.

    >>> find_checkpoint("ckpt").path.name  # doctest: +SKIP
    'step_00000004'
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return read_manifest(path)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such directory. Pass the --checkpoint-dir of an earlier run "
                        "(its latest checkpoint is used) or one of its step_K directories.")
    # Step directories appear only by rename, complete with their manifest; ".step_K.tmp" ones are
    # unfinished saves of a run that was killed, never resumed from.
    steps = sorted(p for p in path.glob(f"{_STEP_PREFIX}*") if (p / MANIFEST).is_file())
    if not steps:
        raise UserError(f"--resume {path}: the directory holds no complete checkpoint (no step_K directory with "
                        f"{MANIFEST}). Pass the --checkpoint-dir of a run that saved at least one checkpoint.")
    return read_manifest(steps[-1])


def check_resumable(info: CheckpointInfo, param_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise UserError unless the checkpoint holds every parameter the plan trains, with its shape."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    missing = [n for n in param_shapes if f"model/{n}" not in saved]
    if missing:
        raise UserError(f"Checkpoint {info.path} has no parameter {missing[0]!r} "
                        f"({len(missing)} of the plan's {len(param_shapes)} parameters are missing): it was "
                        "written for another model. Resume with a plan compiled from the same model file.")
    for name, shape in param_shapes.items():
        got = tuple(saved[f"model/{name}"].size)
        if got != tuple(shape):
            raise UserError(f"Checkpoint {info.path} holds parameter {name!r} with shape {list(got)}, but the plan "
                            f"trains it with shape {list(shape)}: it was written for another configuration of the "
                            "model. Resume with a plan compiled from the same model file.")


def save(root: str | Path, *, step: int, rank: int, world_size: int, plan_fingerprint: str,
         params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
         shards: Sequence[ParamShard] = (), tp_rank: int = 0, tp_group=None) -> Path:
    """Collective: every rank saves its parameters, optimizer state and RNG; rank 0 completes the checkpoint.

    ``shards`` are the splits of this rank's tensor-parallel stage: ``params`` holds member
    ``tp_rank``'s slice of each, and the members of ``tp_group`` put them together (see the
    NOTE above).

    >>> save("ckpt", step=4, rank=0, world_size=2, plan_fingerprint="ab12", params=ctx.params,
    ...      optimizer=ctx.optimizer)  # doctest: +SKIP
    PosixPath('ckpt/step_00000004')
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        # Leftovers of a save that was killed must not mix with this one.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _state(params, optimizer, rank, {s.param: s for s in shards}, tp_rank, tp_group)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
    if rank == 0:
        (tmp / MANIFEST).write_text(json.dumps({
            "format": "hetcompile checkpoint", "version": CHECKPOINT_VERSION, "step": step,
            "plan_fingerprint": plan_fingerprint, "world_size": world_size}, indent=2) + "\n")
        if final.exists():  # the same step saved again (a resumed run): the new one wins
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load(path: str | Path, *, rank: int, params: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer | None, shards: Sequence[ParamShard] = (),
         tp_rank: int = 0) -> CheckpointInfo:
    """Collective: every rank loads the entries of its own parameters (any plan's); returns the manifest.

    ``shards`` and ``tp_rank`` as for :func:`save`: this member keeps its slice of the whole tensors.

    >>> load("ckpt", rank=0, params=ctx.params, optimizer=ctx.optimizer).step  # doctest: +SKIP
    4
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    info = find_checkpoint(path)
    reader = dcp.FileSystemReader(str(info.path))
    saved = reader.read_metadata().state_dict_metadata
    split = {s.param: s for s in shards}
    shapes = {n: tp.full_shape(p, split[n].dim, split[n].ranges) if n in split else tuple(p.shape)
              for n, p in params.items()}
    check_resumable(info, shapes)
    # Parameters load in place, split ones (whole in the checkpoint) into a whole tensor first;
    # optimizer state gets fresh tensors shaped as saved.
    state: dict[str, object] = {f"model/{n}": (torch.empty(shapes[n], dtype=p.dtype) if n in split else p.detach())
                                for n, p in params.items()}
    optim_keys: dict[str, list[str]] = {}
    for key, meta in saved.items():
        kind, _, rest = key.partition("/")
        if kind == "optim":
            name, _, field = rest.rpartition("/")
            if name in params:
                optim_keys.setdefault(name, []).append(field)
                state[key] = (torch.empty(meta.size, dtype=meta.properties.dtype)
                              if isinstance(meta, TensorStorageMetadata) else None)
    rng_key = f"rng/rank{rank}"
    if rng_key in saved:
        state[rng_key] = torch.empty(saved[rng_key].size, dtype=torch.uint8)
    dcp.load(state, storage_reader=reader)

    def own_slice(name: str, value):
        """This member's part of a loaded tensor: its slice of a split parameter's whole tensor."""
        s = split.get(name)
        if s is not None and isinstance(value, torch.Tensor) and tuple(value.shape) == shapes[name]:
            value = tp.local_param(value, s.dim, s.ranges[tp_rank])
        return value

    with torch.no_grad():
        for name in split:
            params[name].copy_(own_slice(name, state[f"model/{name}"]))
    if optimizer is not None:
        for name, fields in optim_keys.items():
            p = params[name]
            optimizer.state[p] = {f: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                                  for f in fields for v in [own_slice(name, state[f"optim/{name}/{f}"])]}
    if rng_key in state:
        torch.set_rng_state(state[rng_key])
    return info


def _state(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None, rank: int,
           split: dict[str, ParamShard], tp_rank: int, tp_group) -> dict:
    """The entries this rank saves, on the host; split parameters and their state put together whole."""

    def whole(name: str, value: torch.Tensor, p: torch.Tensor, field: str | None = None) -> torch.Tensor:
        s = split.get(name)
        value = value.detach()
        if s is None or value.dim() == 0:
            return value.cpu()
        if value.shape != p.shape:
            raise UserError(f"The optimizer's state {field!r} of parameter {name!r} has shape {list(value.shape)}, "
                            f"neither a scalar nor the shape {list(p.shape)} of this member's slice of the "
                            "tensor-parallel parameter, so it cannot be put together for a checkpoint. Use an "
                            "optimizer with per-element state (SGD, Adam, AdamW), or a plan without tensor "
                            "parallelism (--tp 1) to checkpoint.")
        return tp.gather_param(value, s.dim, s.ranges, tp_rank, tp_group).cpu()

    # Every member of a TP group holds the same names in the same order (its stage's inputs), so
    # their gathers below pair up; each whole tensor goes to the host before the next is made.
    state: dict[str, object] = {}
    for name, p in params.items():
        state[f"model/{name}"] = whole(name, p, p)
        per_param = optimizer.state.get(p, {}) if optimizer is not None else {}
        for field in sorted(per_param):
            value = per_param[field]
            # Tensors go through DCP's tensor path; anything else (None, floats) is pickled by DCP.
            state[f"optim/{name}/{field}"] = (whole(name, value, p, field) if isinstance(value, torch.Tensor)
                                              else value)
    state[f"rng/rank{rank}"] = torch.get_rng_state()
    return state
