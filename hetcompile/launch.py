"""`hetcompile run`: launch every rank of a plan on this machine with torchrun (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hetcompile.errors import UserError
from hetcompile.plan import Plan, load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(plan_dir: str | Path, *, steps: int, save_params: str | Path | None = None,
        timeout_s: float = 300.0, stream=None) -> list[float]:
    """Train ``steps`` steps with every rank of the plan as a local process; returns the losses.

    Prints ``step K loss X`` per step (from rank 0). With ``save_params``, writes
    the full state dict after the last step, keyed as ``get_model().state_dict()``.

    >>> losses = run("out/gpt2", steps=3)  # doctest: +SKIP
    """
    plan_dir = Path(plan_dir)
    plan = load(plan_dir)
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}.")
    stream = stream or sys.stdout
    with tempfile.TemporaryDirectory(prefix="hetcompile-run-") as shards:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={plan.world_size}", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               str(plan_dir / "main.py"), "--steps", str(steps)]
        if save_params:
            cmd += ["--save-params", shards]
        env = {**os.environ, "HETCOMPILE_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
               "HETCOMPILE_TIMEOUT_S": str(int(timeout_s)),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        losses, log = [], []
        for line in proc.stdout:
            log.append(line)
            if line.startswith("step "):
                losses.append(float(line.split()[3]))
                stream.write(line)
                stream.flush()
        proc.wait()
        if proc.returncode != 0:
            raise UserError(f"Training plan {plan_dir} failed (torchrun exit code {proc.returncode}). "
                            f"{_first_failure(log)}")
        if save_params:
            state = merge_params(plan, plan_dir, Path(shards))
            Path(save_params).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, save_params)
    return losses


def _first_failure(log: list[str]) -> str:
    """The error of the first rank that failed, from torchrun's ``[rankN]:`` prefixed output."""
    for i, line in enumerate(log):
        if line.startswith("[rank") and "Traceback" in line:
            prefix = line.split(":", 1)[0]
            block = [entry.split(":", 1)[1] for entry in log[i:] if entry.startswith(prefix + ":")]
            return f"{prefix.strip('[]')} raised:\n" + "".join(block[-12:])
    return "Its last lines of output:\n" + "".join(log[-30:])


def merge_params(plan: Plan, plan_dir: Path, shards: Path) -> dict[str, torch.Tensor]:
    """The full state dict, keyed as ``get_model().state_dict()``, from the ranks' parameter files."""
    from hetcompile.modelfile import load_model_file

    trained: dict[str, torch.Tensor] = {}
    for r in plan.ranks:
        trained.update(torch.load(shards / f"rank_{r.rank}.pt", weights_only=True))
    model = load_model_file(plan_dir / "model.py").build_model(plan.seed)
    # Tied parameters appear under several names; the plan trains each under one of them.
    canonical = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), []).append(name)
    alias = {}
    for names in canonical.values():
        source = next((n for n in names if n in trained), None)
        for n in names:
            alias[n] = source
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        source = alias.get(key)
        state[key] = trained[source].clone() if source is not None else value.detach().clone()
    return state
