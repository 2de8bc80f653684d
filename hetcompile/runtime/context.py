"""RankContext: the state and the communicator calls of one rank of a plan."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hetcompile.plan import load

# Seconds a rank waits on a peer before giving up (a dead rank must not hang the job).
DEFAULT_TIMEOUT_S = 300


def _device_for(device_type: str) -> tuple[torch.device, str]:
    forced = os.environ.get("HETCOMPILE_DEVICE")
    if forced == "cpu" or device_type.upper() == "CPU" or not torch.cuda.is_available():
        return torch.device("cpu"), "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local), "nccl"  # NCCL, or RCCL on ROCm builds


def _load_model_file(plan_dir: Path):
    from hetcompile.modelfile import load_model_file

    return load_model_file(plan_dir / "model.py")


class RankContext:
    """Everything rank ``rank`` needs to run its part of the plan in ``plan_dir``."""

    def __init__(self, plan_dir: str, *, rank: int, stage):
        self.dir = Path(plan_dir)
        self.plan = load(self.dir)
        self.rank = rank
        self.spec = self.plan.ranks[rank]
        self.stage_spec = self.plan.stages[self.spec.stage]
        self.stage = stage
        self._check_launch()
        self.device, backend = _device_for(self.spec.device_type)
        stage.DEVICE = self.device
        timeout = float(os.environ.get("HETCOMPILE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend, rank=rank, world_size=self.plan.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        # Every rank creates every group, in plan order, as torch.distributed requires.
        self.groups = {g.ranks: dist.new_group(list(g.ranks)) for g in self.plan.grad_groups}
        self.model_file = _load_model_file(self.dir)
        self._load_state()
        self.values = {v.name: v for v in self.plan.values}
        self.value_ids = {v.name: i for i, v in enumerate(self.plan.values)}
        self.num_samples = self.spec.sample_hi - self.spec.sample_lo
        self.is_last = self.spec.stage == len(self.plan.stages) - 1

    # -- set-up ------------------------------------------------------------------------------

    def _check_launch(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "-1"))
        env_rank = int(os.environ.get("RANK", "-1"))
        if world != self.plan.world_size or env_rank != self.rank:
            raise SystemExit(f"hetcompile: rank_{self.rank}.py of plan {self.plan.fingerprint} was started as rank "
                             f"{env_rank} of {world}, but the plan has {self.plan.world_size} ranks. Launch it with "
                             f"`hetcompile run {self.dir}` or the commands in launch.sh.")

    def _load_state(self) -> None:
        model = self.model_file.build_model(self.plan.seed)
        constants = torch.load(self.dir / "constants.pt", weights_only=True) if (self.dir / "constants.pt").exists() else {}
        self.params: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        for inp in self.stage_spec.inputs:
            if inp.kind == "param" and inp.target not in self.params:
                p = model.get_parameter(inp.target)
                self.params[inp.target] = p.detach().to(self.device).requires_grad_(p.requires_grad)
            elif inp.kind == "buffer":
                self.fixed[inp.name] = model.get_buffer(inp.target).detach().to(self.device)
            elif inp.kind == "constant":
                self.fixed[inp.name] = constants[inp.target].to(self.device)
        del model
        trainable = [p for p in self.params.values() if p.requires_grad]
        # A stage without parameters (only the loss, say) has nothing to step.
        self.optimizer = self.model_file.get_optimizer(trainable) if trainable else None

    # -- one training step ----------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        flat, _ = self.model_file.flat_batch(step)
        if flat[0].shape[0] != self.plan.global_batch:
            raise SystemExit(f"hetcompile: get_batch({step}) has {flat[0].shape[0]} samples, the plan was compiled "
                             f"for a global batch of {self.plan.global_batch}. Recompile the plan.")
        self.batch = flat
        self.step = step
        self.inbox: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
        self.grad_inbox: dict[tuple[int, str], torch.Tensor] = {}
        self.saved: dict[int, tuple[dict, dict]] = {}
        self.pending: list = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params.values():
            p.grad = None

    def _tag(self, mb: int, name: str, is_grad: bool, lo: int) -> int:
        return ((mb * 2 + int(is_grad)) * len(self.values) + self.value_ids[name]) * (self.plan.microbatch_size + 1) + lo

    def _rows(self, name: str, lo: int, hi: int) -> slice | None:
        coef = self.values[name].batch_coef
        return None if coef == 0 else slice(coef * lo, coef * hi)

    def _buffer(self, name: str, samples: int) -> torch.Tensor:
        v = self.values[name]
        shape = [samples * v.batch_coef if isinstance(d, str) else d for d in v.shape]
        return torch.empty(shape, dtype=getattr(torch, v.dtype), device=self.device)

    def recv(self, name: str, *, mb: int, src: int, samples: tuple[int, int]) -> None:
        """Receive the rows of ``name`` for ``samples`` of micro-batch ``mb`` from rank ``src``."""
        lo, hi = samples
        buf = self._buffer(name, hi - lo)
        dist.recv(buf, src, tag=self._tag(mb, name, False, lo))
        self.inbox.setdefault((mb, name), []).append((lo, buf))

    def send(self, name: str, *, mb: int, dst: int, samples: tuple[int, int]) -> None:
        """Send the rows of output ``name`` for ``samples`` of micro-batch ``mb`` to rank ``dst``."""
        out = self.saved[mb][1][name].detach()
        self._isend(self._local(out, name, samples), dst, self._tag(mb, name, False, samples[0]))

    def recv_grad(self, name: str, *, mb: int, src: int, samples: tuple[int, int]) -> None:
        """Receive a consumer's gradient of output ``name``; gradients of several consumers add up."""
        lo, hi = samples
        buf = self._buffer(name, hi - lo)
        dist.recv(buf, src, tag=self._tag(mb, name, True, lo))
        out = self.saved[mb][1][name]
        total = self.grad_inbox.setdefault((mb, name), torch.zeros_like(out))
        rows = self._local_rows(name, samples)
        if rows is None:
            total += buf
        else:
            total[rows] += buf

    def send_grad(self, name: str, *, mb: int, dst: int, samples: tuple[int, int]) -> None:
        """Send the gradient of input ``name`` for ``samples`` back to its producer ``dst``."""
        leaf = self.saved[mb][0][name]
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        self._isend(self._local(grad, name, samples), dst, self._tag(mb, name, True, samples[0]))

    def _local_rows(self, name: str, samples: tuple[int, int]) -> slice | None:
        return self._rows(name, samples[0] - self.spec.sample_lo, samples[1] - self.spec.sample_lo)

    def _local(self, t: torch.Tensor, name: str, samples: tuple[int, int]) -> torch.Tensor:
        rows = self._local_rows(name, samples)
        return (t if rows is None else t[rows]).contiguous()

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.pending.append((dist.isend(t, dst, tag=tag), t))

    def forward(self, *, mb: int) -> None:
        """Run this stage's forward on this rank's samples of micro-batch ``mb``."""
        b = self.plan.microbatch_size
        lo, hi = mb * b + self.spec.sample_lo, mb * b + self.spec.sample_hi
        args, leaves = [], {}
        for inp in self.stage_spec.inputs:
            if inp.kind == "param":
                args.append(self.params[inp.target])
            elif inp.kind in ("buffer", "constant"):
                args.append(self.fixed[inp.name])
            elif inp.kind == "input":
                args.append(self.batch[inp.input_index][lo:hi].to(self.device))
            else:
                pieces = [t for _, t in sorted(self.inbox.pop((mb, inp.name)), key=lambda p: p[0])]
                x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                x.requires_grad_(self.values[inp.name].requires_grad)
                leaves[inp.name] = x
                args.append(x)
        outs = dict(zip(self.stage_spec.outputs, self.stage.forward(*args)))
        self.saved[mb] = (leaves, outs)
        if self.is_last:
            self.loss_sum += outs[self.plan.loss].detach().double() * (self.num_samples / self.plan.global_batch)

    def backward(self, *, mb: int) -> None:
        """Backward of micro-batch ``mb``: the loss weighted by this piece's share of the global batch,
        and the gradients received for the outputs."""
        leaves, outs = self.saved[mb]
        tensors, grads = [], []
        if self.is_last:
            tensors.append(outs[self.plan.loss])
            grads.append(torch.tensor(self.num_samples / self.plan.global_batch, device=self.device,
                                      dtype=outs[self.plan.loss].dtype))
        for name, out in outs.items():
            g = self.grad_inbox.pop((mb, name), None)
            if g is not None and out.requires_grad:
                tensors.append(out)
                grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
        self.saved[mb] = (leaves, {})

    def all_reduce_grads(self, *, ranks: tuple[int, ...]) -> None:
        """Sum the gradients of the parameters this rank shares with ``ranks``."""
        group = next(g for g in self.plan.grad_groups if g.ranks == tuple(ranks))
        params = [self.params[name] for name in group.params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.groups[group.ranks])
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def optimizer_step(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []
        if self.optimizer is not None:
            self.optimizer.step()

    def end_step(self) -> float:
        total = self.loss_sum.clone()
        dist.all_reduce(total)
        self.saved = {}
        return float(total)

    # -- driver ---------------------------------------------------------------------------

    def main(self, train_step) -> None:
        parser = argparse.ArgumentParser(description=f"rank {self.rank} of plan {self.plan.fingerprint}")
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--save-params", default=None, help="directory for this rank's parameters")
        args = parser.parse_args()
        try:
            for step in range(args.steps):
                loss = train_step(step)
                if self.rank == 0:
                    print(f"step {step} loss {loss:.6f}", flush=True)
            if args.save_params:
                Path(args.save_params).mkdir(parents=True, exist_ok=True)
                torch.save({k: v.detach().cpu() for k, v in self.params.items()},
                           Path(args.save_params) / f"rank_{self.rank}.pt")
            dist.barrier()
        finally:
            dist.destroy_process_group()
