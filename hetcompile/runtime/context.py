"""RankContext: the state and the communicator calls of one rank of a plan."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hetcompile.plan import load
from hetcompile.runtime import checkpoint, tp
from hetcompile.runtime.collectives import all_reduce, isend
from hetcompile.runtime.host_memory import keep_freed_memory

# Seconds a rank waits on a peer before giving up (a dead rank must not hang the job). A dead
# peer's closed sockets fail a wait at once; this bounds the wait on a peer that hangs. Launches
# from launch.sh on a real cluster get this; `hetcompile run` (CPU) sets HETCOMPILE_TIMEOUT_S (--timeout, 30).
DEFAULT_TIMEOUT_S = 300
# The span of a step that records no trace (RankContext._span).
_NO_SPAN = contextlib.nullcontext()


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

    def __init__(self, plan_dir: str, *, rank: int, stages: dict, fingerprint: str | None = None,
                 world_size: int | None = None):
        self.rank = rank
        self.step = None
        _install_failure_report(self)
        self.dir = Path(plan_dir)
        self.plan = load(self.dir)
        # What rank_R.py was compiled for (baked into it); None for programs emitted before these checks.
        for stage in stages.values():
            self._check_launch(stage, fingerprint, world_size)
        self.spec = self.plan.ranks[rank]
        self.stage_specs = {s: self.plan.stages[s] for s in self.spec.stages}
        self.stages = stages  # stage index -> the module of its forward (stage_S.py)
        # Stages of one rank share its devices, shares and TP group (interleaved: s, s + p, ...).
        self.tp = self.stage_specs[self.spec.stages[0]].tp
        self.device, backend = _device_for(self.spec.device_type)
        if self.device.type == "cpu":
            keep_freed_memory()  # NOTE: [freed host memory]
        for stage in stages.values():
            stage.DEVICE = self.device
        timeout = float(os.environ.get("HETCOMPILE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend, rank=rank, world_size=self.plan.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        # Every rank creates every group, in plan order, as torch.distributed requires.
        self.groups = {g.ranks: dist.new_group(list(g.ranks)) for g in self.plan.grad_groups}
        # Tensor-parallel groups: the members of each replica (interleaved stages share theirs).
        tp_groups = dict.fromkeys(st.ranks[i:i + st.tp] for st in self.plan.stages
                                  for i in range(0, len(st.ranks) if st.tp > 1 else 0, st.tp))
        for members in tp_groups:
            group = dist.new_group(list(members))
            if self.rank in members:
                tp.GROUP = group
        self.model_file = _load_model_file(self.dir)
        self._load_state()
        self.values = {v.name: v for v in self.plan.values}
        self.value_ids = {v.name: i for i, v in enumerate(self.plan.values)}
        self.producer = {v.name: v.producer for v in self.plan.values}
        # Values this rank both makes and reads (interleaved stages) move in memory, never over a link.
        self.readers = {v.name: sum(c in self.stages for c in v.consumers) for v in self.plan.values}
        self.num_samples = self.spec.sample_hi - self.spec.sample_lo
        self.last_stage = len(self.plan.stages) - 1
        self.spans: list | None = None  # the measured trace (NOTE: [measured trace]), when asked for
        self.step_start_s = 0.0

    # -- set-up ------------------------------------------------------------------------------

    def _check_launch(self, stage, fingerprint: str | None, world_size: int | None) -> None:
        """Refuse to start when the files of the plan directory, or the launch, are not what rank_R.py was
        compiled for: mixed files of two compiles would train silently wrong."""
        plan_fp, mixed = self.plan.fingerprint, ("the directory mixes the files of two compiles. Recompile into a "
                                                 "fresh directory (or with --force) and launch that.")
        if fingerprint is not None and fingerprint != plan_fp:
            _refuse(self, f"rank_{self.rank}.py was compiled for plan {fingerprint}, but {self.dir}/plan.json is "
                          f"plan {plan_fp}: {mixed}")
        stage_doc = getattr(stage, "__doc__", None) or ""
        if fingerprint is not None and f"plan {fingerprint}" not in stage_doc:
            _refuse(self, f"{getattr(stage, '__file__', 'the stage file')} does not belong to plan {fingerprint} "
                          f"of rank_{self.rank}.py: {mixed}")
        if world_size is not None and world_size != self.plan.world_size:
            _refuse(self, f"rank_{self.rank}.py was compiled for {world_size} ranks, but {self.dir}/plan.json "
                          f"has {self.plan.world_size}: {mixed}")
        world = int(os.environ.get("WORLD_SIZE", "-1"))
        env_rank = int(os.environ.get("RANK", "-1"))
        if world != self.plan.world_size or env_rank != self.rank:
            _refuse(self, f"rank_{self.rank}.py of plan {plan_fp} was started as rank {env_rank} of {world}, but "
                          f"the plan has {self.plan.world_size} ranks and this program is rank {self.rank}. Launch "
                          f"it with `hetcompile run {self.dir}` or the commands in launch.sh "
                          f"({self.plan.world_size} processes in all).")

    def _load_state(self) -> None:
        model = self.model_file.build_model(self.plan.seed)
        constants = torch.load(self.dir / "constants.pt", weights_only=True) if (self.dir / "constants.pt").exists() else {}
        self.params: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self.shards = shards = {p.param: p for st in self.stage_specs.values() for p in st.param_shards}
        self.split_params = set(shards)  # tensor parallel: this member holds a slice of these
        for inp in (i for st in self.stage_specs.values() for i in st.inputs):
            if inp.kind == "param" and inp.target not in self.params:
                p = model.get_parameter(inp.target)
                value = p.detach()
                if inp.target in shards:  # tensor parallel: this member's slice
                    value = tp.local_param(value, shards[inp.target].dim, shards[inp.target].ranges[self.spec.tp_rank])
                self.params[inp.target] = value.to(self.device).requires_grad_(p.requires_grad)
            elif inp.kind == "buffer":
                self.fixed[inp.name] = model.get_buffer(inp.target).detach().to(self.device)
            elif inp.kind == "constant":
                self.fixed[inp.name] = constants[inp.target].to(self.device)
        del model
        trainable = [p for p in self.params.values() if p.requires_grad]
        # A stage without parameters (only the loss, say) has nothing to step.
        self.optimizer = self.model_file.get_optimizer(trainable) if trainable else None

    # -- measured trace -----------------------------------------------------------------------

    def _span(self, kind: str, name: str, *args, mb: int = -1):
        """Time what the block does as one span of this step's measured trace (``--trace``);
        ``name.format(*args)`` names it, formatted only when a trace is recorded.

        NOTE: [measured trace] With ``--trace DIR`` every rank records its last step's spans
        (compute, waits for received values, collectives, optimizer) and writes them to
        DIR/rank_R.json; :func:`hetcompile.launch.run` merges them into one Chrome trace laid out
        like the predicted timeline.json, so the two open side by side in Perfetto. Waits are
        spans of their own inside the forward or backward that waited. Without a trace, a span
        is a shared no-op context: nothing is built on the step's path.
        """
        if self.spans is None:
            return _NO_SPAN
        return self._recorded(kind, name.format(*args), mb)

    @contextlib.contextmanager
    def _recorded(self, kind: str, name: str, mb: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append((kind, name, mb, start - self.step_start_s, time.perf_counter() - start))

    # -- one training step ----------------------------------------------------------------------

    def start_step(self, step: int) -> None:
        self.step_start_s = time.perf_counter()
        if self.spans is not None:
            self.spans = []
        with self._span("batch", "get_batch"):
            flat, _ = self.model_file.flat_batch(step)
        if flat[0].shape[0] != self.plan.global_batch:
            raise SystemExit(f"hetcompile: get_batch({step}) has {flat[0].shape[0]} samples, the plan was compiled "
                             f"for a global batch of {self.plan.global_batch}. Recompile the plan.")
        self.batch = flat
        self.step = step
        _maybe_fail(self.rank, step)
        # NOTE: [receives in flight] recv/recv_grad only post the receive (irecv); forward and
        # backward wait for it. On gloo a blocking recv costs a round trip to the sender, and
        # the receives of a micro-batch one after another cost one each; posted together they
        # overlap (4 receives: 5x faster on a loaded 2-core machine, benchmarks/RESULTS.md).
        # NOTE: [values on a rank] Keyed by (micro-batch, value name): ``held`` is a value this rank
        # has, received or made here, until the last of its stages that read it ran forward;
        # ``grads`` sums a value's gradient from this rank's readers and the received ones, for
        # send_grad or for the backward of the stage here that made it.
        self.inbox: dict[tuple[int, str], list[tuple[int, torch.Tensor, _PostedRecv]]] = {}
        # Keyed by (producing stage, micro-batch): a receive may be posted an action early
        # (NOTE: [receives one action ahead] in hetcompile/lowering.py), before another stage's backward.
        self.grad_recvs: dict[tuple[int, int], list[tuple[str, tuple[int, int], torch.Tensor, _PostedRecv]]] = {}
        self.held: dict[tuple[int, str], tuple[torch.Tensor, int]] = {}  # value, its readers still to run
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self.saved: dict[tuple[int, int], tuple[dict, dict]] = {}  # (stage, mb) -> input leaves, outputs
        self.rerun: dict[tuple[int, int], tuple[list, tuple]] = {}  # recompute: inputs and RNG state
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
        posted = _PostedRecv.post(buf, src, self._tag(mb, name, False, lo), f"{name} of micro-batch {mb}")
        self.inbox.setdefault((mb, name), []).append((lo, buf, posted))

    def send(self, name: str, *, mb: int, dst: int, samples: tuple[int, int]) -> None:
        """Send the rows of output ``name`` for ``samples`` of micro-batch ``mb`` to rank ``dst``."""
        out = self.saved[self.producer[name], mb][1][name].detach()
        self._isend(self._local(out, name, samples), dst, self._tag(mb, name, False, samples[0]))

    def recv_grad(self, name: str, *, mb: int, src: int, samples: tuple[int, int]) -> None:
        """Receive a consumer's gradient of output ``name``; gradients of several consumers add up."""
        lo, hi = samples
        buf = self._buffer(name, hi - lo)
        posted = _PostedRecv.post(buf, src, self._tag(mb, name, True, lo), f"the gradient of {name} of micro-batch {mb}")
        self.grad_recvs.setdefault((self.producer[name], mb), []).append((name, samples, buf, posted))

    def _collect_grads(self, stage: int, mb: int) -> None:
        """Wait for the received gradients of ``stage``'s outputs for micro-batch ``mb``; add them up per output."""
        for name, samples, buf, posted in self.grad_recvs.pop((stage, mb), ()):
            with self._span("wait", "wait grad {} mb{}", name, mb, mb=mb):
                posted.wait()
            out = self.saved[self.producer[name], mb][1][name]
            total = self.grads.setdefault((mb, name), torch.zeros_like(out))
            rows = self._local_rows(name, samples)
            if rows is None:
                total += buf
            else:
                total[rows] += buf

    def send_grad(self, name: str, *, mb: int, dst: int, samples: tuple[int, int]) -> None:
        """Send the gradient of input ``name`` for ``samples`` back to its producer ``dst``."""
        grad = self.grads.get((mb, name))
        if grad is None:  # no reader here needed it (no path to the loss): a zero gradient
            grad = torch.zeros_like(self._buffer(name, self.num_samples))
        self._isend(self._local(grad, name, samples), dst, self._tag(mb, name, True, samples[0]))

    def _local_rows(self, name: str, samples: tuple[int, int]) -> slice | None:
        return self._rows(name, samples[0] - self.spec.sample_lo, samples[1] - self.spec.sample_lo)

    def _local(self, t: torch.Tensor, name: str, samples: tuple[int, int]) -> torch.Tensor:
        rows = self._local_rows(name, samples)
        return (t if rows is None else t[rows]).contiguous()

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.pending.append((isend(t, dst, tag=tag), t))  # NOTE: [handing a send over]

    def forward(self, stage: int, *, mb: int) -> None:
        """Run ``stage``'s forward on this rank's samples of micro-batch ``mb``."""
        with self._span("F", "F s{} mb{}", stage, mb, mb=mb):
            self._forward(stage, mb)

    def _forward(self, stage: int, mb: int) -> None:
        spec, b = self.stage_specs[stage], self.plan.microbatch_size
        lo, hi = mb * b + self.spec.sample_lo, mb * b + self.spec.sample_hi
        args, leaves = [], {}
        for inp in spec.inputs:
            if inp.kind == "param":
                args.append(self.params[inp.target])
            elif inp.kind in ("buffer", "constant"):
                args.append(self.fixed[inp.name])
            elif inp.kind == "input":
                args.append(self.batch[inp.input_index][lo:hi].to(self.device))
            else:
                x = self._take((mb, inp.name)).detach()  # each reader differentiates its own leaf
                x.requires_grad_(self.values[inp.name].requires_grad)
                leaves[inp.name] = x
                args.append(x)
        run = self.stages[stage].forward
        if spec.recompute:
            # NOTE: [recompute] Keep the inputs and the RNG state instead of the activations;
            # backward reruns the forward with the same random numbers (dropout), then
            # differentiates it. Outputs are sent from this no-grad run: they are identical.
            rng = self._rng_state()
            with torch.no_grad():
                outs = dict(zip(spec.outputs, run(*args)))
            self.rerun[stage, mb] = (args, rng)
        else:
            outs = dict(zip(spec.outputs, run(*args)))
        self.saved[stage, mb] = (leaves, outs)
        for name, out in outs.items():
            if self.readers.get(name):
                self.held[mb, name] = (out.detach(), self.readers[name])
        if stage == self.last_stage and self.spec.tp_rank == 0:  # the members of a TP group hold the same loss
            self.loss_sum += outs[self.plan.loss].detach().double() * (self.num_samples / self.plan.global_batch)

    def _take(self, key: tuple[int, str]) -> torch.Tensor:
        """A value input for one of this rank's stages (see NOTE: [values on a rank])."""
        if key in self.inbox:  # received: wait for its pieces, in sample order
            with self._span("wait", "wait {} mb{}", key[1], key[0], mb=key[0]):
                pieces = [posted.wait() for _, _, posted in sorted(self.inbox.pop(key), key=lambda p: p[0])]
            self.held[key] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces), self.readers[key[1]])
        value, readers_left = self.held.pop(key)
        if readers_left > 1:
            self.held[key] = (value, readers_left - 1)
        return value

    def backward(self, stage: int, *, mb: int) -> None:
        """Backward of ``stage`` for micro-batch ``mb``: the loss weighted by this piece's share of the
        global batch, and the gradients of the outputs (received, or from this rank's later stages)."""
        with self._span("B", "B s{} mb{}", stage, mb, mb=mb):
            self._backward(stage, mb)

    def _backward(self, stage: int, mb: int) -> None:
        self._collect_grads(stage, mb)
        spec = self.stage_specs[stage]
        leaves, outs = self.saved.pop((stage, mb))
        if spec.recompute:
            args, rng = self.rerun.pop((stage, mb))
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self._set_rng_state(rng)
                outs = dict(zip(spec.outputs, self.stages[stage].forward(*args)))
        tensors, grads = [], []
        if stage == self.last_stage:
            tensors.append(outs[self.plan.loss])
            grads.append(torch.tensor(self.num_samples / self.plan.global_batch, device=self.device,
                                      dtype=outs[self.plan.loss].dtype))
        for name, out in outs.items():
            g = self.grads.pop((mb, name), None)
            if g is not None and out.requires_grad:
                tensors.append(out)
                grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
        for name, leaf in leaves.items():  # this stage's share of its inputs' gradients
            if leaf.grad is not None:
                total = self.grads.get((mb, name))
                self.grads[mb, name] = leaf.grad if total is None else total + leaf.grad

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def all_reduce_grads(self, *, ranks: tuple[int, ...]) -> None:
        """Sum the gradients of the parameters this rank shares with ``ranks``."""
        group = next(g for g in self.plan.grad_groups if g.ranks == tuple(ranks))
        params = [self.params[name] for name in group.params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.tp > 1:
            # A whole parameter has the same gradient on every member of the TP group: each adds 1/tp.
            grads = [g if name in self.split_params else g / self.tp for name, g in zip(group.params, grads)]
        flat = _flatten_dense_tensors(grads)
        with self._span("allreduce", "all-reduce grads {} ranks", len(group.ranks)):
            all_reduce(flat, group=self.groups[group.ranks])
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def optimizer_step(self) -> None:
        with self._span("wait", "wait sends"):
            for work, _ in self.pending:
                work.wait()
        self.pending = []
        if self.optimizer is not None:
            with self._span("optimizer", "optimizer step"):
                self.optimizer.step()

    def end_step(self) -> float:
        total = self.loss_sum.clone()
        with self._span("allreduce", "all-reduce loss"):
            all_reduce(total)
        self.saved = {}
        return float(total)

    # -- driver ---------------------------------------------------------------------------

    def main(self, train_step) -> None:
        parser = argparse.ArgumentParser(description=f"rank {self.rank} of plan {self.plan.fingerprint}")
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--save-params", default=None, help="directory for this rank's parameters")
        parser.add_argument("--checkpoint-dir", default=None, help="save training state under this directory")
        parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
        parser.add_argument("--resume", default=None, help="checkpoint (or --checkpoint-dir) to continue from")
        parser.add_argument("--trace", default=None, help="directory for this rank's measured trace of the last step")
        args = parser.parse_args()
        if args.trace:
            self.spans = []
        try:
            start = 0
            if args.resume:
                # --steps counts every step: a checkpoint taken after K steps resumes at step K.
                start = checkpoint.load(args.resume, rank=self.rank, params=self.params,
                                        optimizer=self.optimizer, shards=tuple(self.shards.values()),
                                        tp_rank=self.spec.tp_rank).step
            # end_step's all-reduce synchronises every rank, so the time between two of
            # them on rank 0 is the step time of the whole plan (what `predicted` estimates).
            last_s = time.perf_counter()
            for step in range(start, args.steps):
                loss = train_step(step)
                now_s = time.perf_counter()
                if self.rank == 0:
                    print(f"step {step} loss {loss:.6f} time_ms {(now_s - last_s) * 1e3:.3f}", flush=True)
                if args.checkpoint_dir and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps):
                    checkpoint.save(args.checkpoint_dir, step=step + 1, rank=self.rank,
                                    world_size=self.plan.world_size, plan_fingerprint=self.plan.fingerprint,
                                    params=self.params, optimizer=self.optimizer,
                                    shards=tuple(self.shards.values()), tp_rank=self.spec.tp_rank,
                                    tp_group=tp.GROUP)
                    now_s = time.perf_counter()  # the save is not part of the next step's time
                last_s = now_s
            if args.trace:
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                (Path(args.trace) / f"rank_{self.rank}.json").write_text(json.dumps(self.spans))
            if args.save_params:
                Path(args.save_params).mkdir(parents=True, exist_ok=True)
                torch.save({k: v.detach().cpu() for k, v in self.params.items()},
                           Path(args.save_params) / f"rank_{self.rank}.pt")
            _mark_finished(self.rank)
            _maybe_fail(self.rank, "end")
            dist.barrier()
        finally:
            dist.destroy_process_group()


# -- failures --------------------------------------------------------------------------------
# NOTE: [naming the failed rank]
# When one rank dies, its peers fail too, a moment later, on a closed connection. Each failing
# rank writes a record (rank, step, time, traceback tail) into $HETCOMPILE_FAILURE_DIR, marking
# failures inside torch.distributed as "peer" failures (a failed recv names the rank it waited
# on); the stack of a rank that torchrun stops is kept, to tell a busy (hung) rank from a waiting
# one. `hetcompile
# run` names the first rank whose failure is its own; else a rank that died without a word
# (SIGKILL, OOM), as torchrun saw it; else the rank the timed-out waits lead to (a hung rank).


class PeerError(RuntimeError):
    """A wait on another rank failed: that rank died or hung."""


class _PostedRecv:
    """A receive in flight (see NOTE: [receives in flight]); ``wait()`` returns the filled buffer."""

    __slots__ = ("buf", "work", "src", "what")

    def __init__(self, buf: torch.Tensor, work, src: int, what: str) -> None:
        self.buf, self.work, self.src, self.what = buf, work, src, what

    @classmethod
    def post(cls, buf: torch.Tensor, src: int, tag: int, what: str) -> "_PostedRecv":
        try:
            return cls(buf, dist.irecv(buf, src, tag=tag), src, what)
        except RuntimeError as e:
            raise PeerError(f"rank {dist.get_rank()} waiting for {what} from rank {src} failed: {e}") from e

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                self.work.wait()
            except RuntimeError as e:
                raise PeerError(f"rank {dist.get_rank()} waiting for {self.what} from rank {self.src} "
                                f"failed: {e}") from e
            self.work = None
        return self.buf


def _maybe_fail(rank: int, step: int | str) -> None:
    """HETCOMPILE_FAIL_AT="RANK:STEP[:kill|:hang]" makes that rank fail at the start of that step (for
    tests): raise an error, die by SIGKILL as an OOM-killed process would, or hang forever. STEP
    "end": once the rank has finished its work, before the last barrier (NOTE: [teardown race])."""
    spec = os.environ.get("HETCOMPILE_FAIL_AT")
    if not spec:
        return
    fail_rank, fail_step, *how = spec.split(":")
    if int(fail_rank) == rank and fail_step == str(step):
        if how == ["kill"]:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        while how == ["hang"]:
            time.sleep(60)
        raise RuntimeError(f"HETCOMPILE_FAIL_AT={spec}: simulated failure of rank {rank} at step {step}")


def _write_failure(ctx: "RankContext", kind: str, message: str) -> None:
    folder = os.environ.get("HETCOMPILE_FAILURE_DIR")
    if not folder:
        return
    import json

    record = {"rank": ctx.rank, "step": ctx.step, "time_s": time.time(), "kind": kind, "message": message}
    tmp = Path(folder) / f".failure_rank_{ctx.rank}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(Path(folder) / f"failure_rank_{ctx.rank}.json")  # whole records only


def _mark_finished(rank: int) -> None:
    """Tell `hetcompile run` that this rank has done all its work (NOTE: [teardown race] in launch.py)."""
    folder = os.environ.get("HETCOMPILE_FAILURE_DIR")
    if folder:
        (Path(folder) / f"finished_rank_{rank}").touch()


_STACK_FILE = None  # kept open for faulthandler, which writes to it from a signal handler


def _install_failure_report(ctx: "RankContext") -> None:
    """Record an uncaught exception of this rank for `hetcompile run`, then print it as usual."""
    import traceback

    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        frames = traceback.extract_tb(tb)
        peer = issubclass(exc_type, PeerError) or any("torch/distributed" in f.filename.replace("\\", "/")
                                                       for f in frames)
        tail = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()[-12:]
        try:
            _write_failure(ctx, "peer" if peer else "error", "\n".join(tail))
        finally:
            previous(exc_type, exc, tb)

    sys.excepthook = hook
    folder = os.environ.get("HETCOMPILE_FAILURE_DIR")
    if folder:
        import faulthandler
        import signal

        # torchrun stops the ranks still running after one failed, with SIGTERM. faulthandler writes
        # this rank's Python stack at that moment, from C, even while it is blocked inside a
        # torch.distributed wait (where a Python handler would not run, and would delay the exit),
        # then lets SIGTERM end the process. A stack outside torch.distributed marks a busy rank:
        # how a hung rank is told apart from the peers waiting on it.
        global _STACK_FILE
        _STACK_FILE = open(Path(folder) / f"stack_rank_{ctx.rank}.txt", "w")
        faulthandler.register(signal.SIGTERM, file=_STACK_FILE, all_threads=True, chain=True)


def _refuse(ctx: "RankContext", message: str) -> None:
    """Stop this rank before it starts training, with ``message`` (recorded for `hetcompile run`)."""
    _write_failure(ctx, "error", message)
    raise SystemExit(f"hetcompile: {message}")
