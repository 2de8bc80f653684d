"""`hetcompile run`: launch every rank of a plan on this machine with torchrun (gloo on CPU).

# NOTE: [a failed rank never hangs the run]
torchrun stops the other workers as soon as one exits with an error, and a dead
rank's peers fail at once on its closed sockets; a peer that hangs instead is
bounded by the process-group timeout (``timeout_s``, HETCOMPILE_TIMEOUT_S). As
a last line, once some rank has reported a failure, torchrun's whole process
group is killed if it has not exited ``timeout_s + _KILL_GRACE_S`` later.
The error names the first rank that failed on its own (see the note in
:mod:`hetcompile.runtime.context`), with the tail of its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from hetcompile.errors import UserError
from hetcompile.plan import Plan, load
from hetcompile.runtime import tp

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # seconds a rank waits on a peer; a dead peer is noticed at once
_KILL_GRACE_S = 30.0  # after the first failure, beyond timeout_s, before torchrun is killed
_DEFAULT_CHECKPOINT_EVERY = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(plan_dir: str | Path, *, steps: int, save_params: str | Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None, resume: str | Path | None = None, stream=None,
        env: dict[str, str] | None = None, trace: str | Path | None = None) -> list[float]:
    """Train with every rank of the plan as a local process; returns the losses of the steps it ran.

    ``steps`` counts all training steps: resumed from a checkpoint taken after K
    steps, the run trains steps K..steps-1 (and returns their losses). Prints
    ``step K loss X time_ms T`` per step (from rank 0). With ``save_params``, writes the
    full state dict after the last step, keyed as ``get_model().state_dict()``.
    With ``checkpoint_dir``, saves the training state every ``checkpoint_every``
    steps and after the last (see :mod:`hetcompile.runtime.checkpoint`);
    ``resume`` continues from such a checkpoint, under this plan or any other
    plan of the same model. ``env`` adds environment variables for the ranks. With ``trace``,
    writes the last step as measured on every rank to that Chrome trace file (NOTE: [measured
    trace] in hetcompile/runtime/context.py), to open beside the predicted timeline.json.

    >>> losses = run("out/gpt2", steps=3)  # doctest: +SKIP
    >>> losses = run("out/gpt2_other_cluster", steps=6, resume="ckpt")  # doctest: +SKIP
    """
    _check_flags(steps=steps, timeout_s=timeout_s, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    plan_dir = Path(plan_dir)
    plan = load(plan_dir)
    start = _resume_step(plan, plan_dir, steps=steps, resume=resume) if resume else 0
    stream = stream or sys.stdout
    with tempfile.TemporaryDirectory(prefix="hetcompile-run-") as scratch:
        shards, failures = Path(scratch) / "params", Path(scratch) / "failures"
        failures.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={plan.world_size}", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               str(plan_dir / "main.py"), "--steps", str(steps)]
        if save_params:
            cmd += ["--save-params", str(shards)]
        if checkpoint_dir:
            cmd += ["--checkpoint-dir", str(Path(checkpoint_dir).resolve()),
                    "--checkpoint-every", str(checkpoint_every or _DEFAULT_CHECKPOINT_EVERY)]
        if resume:
            cmd += ["--resume", str(Path(resume).resolve())]
        if trace:
            cmd += ["--trace", str(Path(scratch) / "trace")]
        run_env = {**os.environ, "HETCOMPILE_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                   "HETCOMPILE_TIMEOUT_S": str(max(1, round(timeout_s))), "HETCOMPILE_FAILURE_DIR": str(failures),
                   **(env or {}),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                os.environ.get("PYTHONPATH")]))}
        # Its own session, so that the watchdog (or Ctrl-C) can stop torchrun and every rank at once.
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        watchdog = threading.Thread(target=_watchdog, args=(proc, failures, timeout_s + _KILL_GRACE_S),
                                    daemon=True)
        watchdog.start()
        losses, log = [], []
        # The ranks live in their own session: a SIGTERM to this process (a job scheduler, `kill`) must
        # stop them too, so it interrupts the loop below like Ctrl-C does.
        restore = _interrupt_on_sigterm()
        try:
            for line in proc.stdout:
                log.append(line)
                if line.startswith("step "):
                    losses.append(float(line.split()[3]))
                    stream.write(line)
                    stream.flush()
            proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            restore()
        # NOTE: [teardown race] A rank killed after every rank trained all its steps and wrote what
        # it had to, before the last barrier (seen once on gloo: SIGABRT while closing its connections
        # as its peers closed theirs), lost nothing.
        if proc.returncode != 0 and len(list(failures.glob("finished_rank_*"))) == plan.world_size:
            stream.write(f"hetcompile: every rank finished; a rank then failed while closing its connections "
                         f"(exit code {proc.returncode}), which loses nothing.\n")
        elif proc.returncode != 0:
            raise UserError(_failure_message(plan, plan_dir, proc.returncode, log, failures,
                                             last_step=start + len(losses) - 1, timeout_s=timeout_s,
                                             checkpoint_dir=checkpoint_dir))
        if trace:
            from hetcompile.timeline import measured_trace
            spans = {r: json.loads((Path(scratch) / "trace" / f"rank_{r}.json").read_text())
                     for r in range(plan.world_size)}
            Path(trace).parent.mkdir(parents=True, exist_ok=True)
            Path(trace).write_text(json.dumps(measured_trace(plan, spans)) + "\n")
        if save_params:
            state = merge_params(plan, plan_dir, shards)
            Path(save_params).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, save_params)
    return losses


def _check_flags(*, steps: int, timeout_s: float, checkpoint_dir, checkpoint_every) -> None:
    """Refuse bad flags before starting any rank."""
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be a positive integer (the total number of training steps), got {steps!r}.")
    if not 0 < timeout_s < float("inf"):
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout_s!r}. The default is "
                        f"{DEFAULT_TIMEOUT_S:g}.")
    if checkpoint_every is not None:
        if not checkpoint_dir:
            raise UserError("--checkpoint-every needs --checkpoint-dir DIR: the directory to save checkpoints in.")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be a positive number of steps, got {checkpoint_every!r}.")
    if checkpoint_dir and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir} is a file, not a directory. Choose a directory path.")


def _resume_step(plan: Plan, plan_dir: Path, *, steps: int, resume) -> int:
    """The step a resumed run starts at, after checking that the checkpoint fits the plan and ``steps``."""
    from hetcompile.runtime.checkpoint import check_resumable, find_checkpoint

    info = find_checkpoint(resume)
    if info.step >= steps:
        raise UserError(f"Checkpoint {info.path} was taken after {info.step} steps, and --steps {steps} counts "
                        f"all steps, so there is nothing left to train. Pass --steps larger than {info.step}.")
    shapes = _param_shapes(plan, plan_dir)
    if shapes is not None:
        check_resumable(info, shapes)
    logger.info("resuming from %s at step %d", info.path, info.step)
    return info.step


def _param_shapes(plan: Plan, plan_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The shape of every parameter the plan trains, by name; None when the model cannot be built on meta."""
    from hetcompile.modelfile import load_model_file

    names = {i.target for s in plan.stages for i in s.inputs if i.kind == "param"}
    mf = load_model_file(plan_dir / "model.py")
    try:
        # Meta tensors: the shapes without allocating the weights.
        with torch.device("meta"):
            model = mf.build_model(plan.seed)
        return {n: tuple(model.get_parameter(n).shape) for n in sorted(names)}
    except Exception as e:  # the user's model code; every rank checks its own parameters again
        logger.debug("no early checkpoint check: building the model on meta failed: %s", e)
        return None


def _watchdog(proc: subprocess.Popen, failures: Path, grace_s: float) -> None:
    first_failure_s = None
    while proc.poll() is None:
        if first_failure_s is None and any(failures.glob("failure_rank_*.json")):
            first_failure_s = time.monotonic()
        if first_failure_s is not None and time.monotonic() - first_failure_s > grace_s:
            logger.warning("ranks still running %.0f s after a failure; killing them", grace_s)
            _kill_group(proc)
            return
        time.sleep(0.2)


def _interrupt_on_sigterm():
    """Make SIGTERM raise KeyboardInterrupt until the returned function is called."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _kill_group(proc: subprocess.Popen, *, grace_s: float = 10.0) -> None:
    """Stop torchrun and its ranks: SIGTERM first, since torchrun then stops the ranks it started in
    their own process groups; SIGKILL to the whole group if it has not exited ``grace_s`` later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass


# One entry of torchrun's failure summary: "rank      : 2 (local_rank: 2)" ... "exitcode  : -9 (pid: 7) (SIGKILL)".
_TORCHRUN_FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?[ \t]*$",
                               re.M)


def _failure_message(plan: Plan, plan_dir: Path, returncode: int, log: list[str], failures: Path, *,
                     last_step: int, timeout_s: float, checkpoint_dir) -> str:
    """One paragraph: which rank failed first, at which step, and its own traceback tail."""
    records = []
    for f in failures.glob("failure_rank_*.json"):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    own = sorted((r for r in records if r["kind"] == "error"), key=lambda r: r["time_s"])
    peer = sorted((r for r in records if r["kind"] == "peer"), key=lambda r: r["time_s"])
    stopped = _busy_when_stopped(failures)
    # Ranks that ended without a record of their own: killed by a signal other than torchrun's SIGTERM
    # (SIGKILL from the OOM killer, SIGSEGV), or exited without a Python exception (os._exit).
    recorded = {r["rank"] for r in records}
    silent = sorted({(int(m.group(1)), int(m.group(2)), m.group(3))
                     for m in _TORCHRUN_FAILURE.finditer("".join(log))
                     if int(m.group(1)) not in recorded and int(m.group(2)) != -15})
    if own:
        r = own[0]
        where = f" at step {r['step']}" if r["step"] is not None else " while starting"
        head = f"Rank {r['rank']}{_describe(plan, r['rank'])} failed{where}; the other ranks stopped."
        detail = f" Its error:\n{r['message']}"
    elif silent:
        rank, code, sig = silent[0]
        how = (f"was killed by {sig or f'signal {-code}'} (out of memory, or killed from outside)" if code < 0
               else f"exited with code {code}")
        head = (f"Rank {rank}{_describe(plan, rank)} {how} after step {last_step}, without an error of its own; "
                "the other ranks stopped.")
        # A peer's traceback only shows where it waited; its last line says on whom.
        detail = "".join(f" Rank {p['rank']} then saw: {p['message'].splitlines()[-1]}" for p in peer[:1])
    elif peer:
        r = peer[0]
        rank = _waited_on(r, peer, stopped)
        if rank is not None:
            head = (f"Rank {rank}{_describe(plan, rank)} stopped answering at step {r['step']} (it hung, or died): "
                    f"the ranks waiting on it gave up after --timeout {timeout_s:g} s; the other ranks stopped.")
        else:
            head = (f"Rank {r['rank']}{_describe(plan, r['rank'])} lost a peer at step {r['step']} (a rank died, "
                    f"or hung for longer than --timeout {timeout_s:g} s); the other ranks stopped.")
        detail = f" Rank {r['rank']} saw: {r['message'].splitlines()[-1]}"
    else:
        head = f"Training plan {plan_dir} failed (torchrun exit code {returncode})."
        detail = " Its last lines of output:\n" + "".join(log[-30:])
    fix = (f" Fix the cause, then continue with `hetcompile run {plan_dir} --resume {checkpoint_dir}`."
           if checkpoint_dir and any(Path(checkpoint_dir).glob("step_*")) else "")
    return head + fix + detail.rstrip()


def _busy_when_stopped(failures: Path) -> set[int]:
    """Ranks that torchrun stopped while they ran their own code, not a torch.distributed wait: the
    Python stack each rank's faulthandler wrote on SIGTERM."""
    busy = set()
    for f in failures.glob("stack_rank_*.txt"):
        stack = f.read_text(errors="replace")
        if stack.strip() and "torch/distributed" not in stack:
            busy.add(int(f.stem.rsplit("_", 1)[1]))
    return busy


def _waited_on(first: dict, peer: list[dict], stopped: set[int]) -> int | None:
    """The rank that hung, from the peers' timed-out waits: follow "rank A waited for rank B" from the first
    failure while B was itself waiting; a rank stopped while busy in its own code is the likelier culprit."""
    waits = {}
    for r in peer:
        m = re.search(r"from rank (\d+) failed", r["message"])
        if m:
            waits.setdefault(r["rank"], int(m.group(1)))
    rank, seen = waits.get(first["rank"]), set()
    while rank in waits and rank not in seen:
        seen.add(rank)
        rank = waits[rank]
    if rank is not None and rank not in stopped and len(stopped) == 1:
        return next(iter(stopped))
    return rank


def _describe(plan: Plan, rank: int) -> str:
    if not 0 <= rank < plan.world_size:
        return ""
    r = plan.ranks[rank]
    return f" ({r.device_type}, stage {'+'.join(map(str, r.stages))})"


def merge_params(plan: Plan, plan_dir: Path, shards: Path) -> dict[str, torch.Tensor]:
    """The full state dict, keyed as ``get_model().state_dict()``, from the ranks' parameter files."""
    from hetcompile.modelfile import load_model_file

    saved = {r.rank: torch.load(shards / f"rank_{r.rank}.pt", weights_only=True) for r in plan.ranks}
    trained: dict[str, torch.Tensor] = {}
    for state in saved.values():
        trained.update(state)
    for st in plan.stages:  # tensor-parallel slices, from the members of the first replica
        for p in st.param_shards:
            trained[p.param] = tp.full_param([saved[r][p.param] for r in st.ranks[:st.tp]], p.dim, p.ranges)
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
