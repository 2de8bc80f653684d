"""The command line: ``hetcompile MODEL --cluster SPEC -o OUT`` and ``hetcompile run OUT``.

The CLI owns the terminal: a :class:`~hetcompile.errors.UserError` prints one
paragraph and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import shutil
import sys

from hetcompile.errors import UserError


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse then reports a bad value as a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text}")
    return value


def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetcompile",
        description="Compile a PyTorch model for a cluster of mixed accelerators into one training program "
                    "per rank. Subcommands: `hetcompile run OUT` trains with a compiled plan; "
                    "`hetcompile inspect|explain OUT` and `hetcompile diff OUT_A OUT_B` question plans.")
    p.add_argument("model", help="model file defining get_model() and get_batch(step)")
    p.add_argument("--cluster", required=True, help="cluster spec (JSON)")
    p.add_argument("-o", "--out", required=True, help="output directory for plan.json and the programs")
    p.add_argument("--schedule", default="auto", choices=["auto", "gpipe", "1f1b", "interleaved"],
                   help="pipeline schedule (default auto: the planner picks the fastest that fits; interleaved: "
                        "1F1B with each device group running several stages)")
    p.add_argument("--microbatches", type=_positive_int, default=None,
                   help="micro-batches per step (default: the planner chooses among divisors of the batch)")
    p.add_argument("--max-stages", type=_positive_int, default=None, help="most pipeline stages the planner may use")
    p.add_argument("--tp", type=_positive_int, default=None, metavar="N",
                   help="tensor-parallel degree of every stage (default: the planner chooses per stage)")
    p.add_argument("--pp", type=_positive_int, default=None, metavar="N",
                   help="number of pipeline stages (default: the planner chooses)")
    p.add_argument("--dp", type=_positive_int, default=None, metavar="N",
                   help="data-parallel replicas of every stage (default: the planner chooses per stage)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before get_model() (default 0)")
    p.add_argument("--time-limit", type=_positive_seconds, default=300.0,
                   help="wall-clock safety net for the solver, in seconds (default 300): the search stops at "
                        "deterministic budgets, so the plan does not depend on the machine's load unless this "
                        "fires (plan.json's solver.wall_limit_hit then says so)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcompile run",
                                description="Train with a compiled plan: every rank as a local process "
                                            "(torchrun, gloo on CPU).")
    p.add_argument("plan", help="directory written by `hetcompile MODEL --cluster SPEC -o DIR`")
    p.add_argument("--steps", type=_positive_int, default=10, metavar="N",
                   help="training steps, counted from step 0 also when resuming (default 10)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="write the last step as measured on every rank to FILE (Chrome trace, Perfetto), "
                        "laid out like the predicted timeline.json")
    p.add_argument("--save-params", default=None, metavar="FILE",
                   help="write the state dict after the last step to this file (torch.save)")
    p.add_argument("--timeout", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="seconds a rank waits on a hung peer before the run stops with an error naming it "
                        "(default 30; a rank that dies is noticed at once)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save training state (parameters, optimizer state, step, RNG; torch.distributed."
                        "checkpoint) into DIR/step_K")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                   help="steps between checkpoints (default 100); the last step is always saved")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint: a --checkpoint-dir (its latest) or one of its step_K "
                        "directories, written under this plan or any other plan of the same model. --steps "
                        "counts all steps, so a checkpoint after K steps trains steps K..N-1")
    return p


def _run(args) -> int:
    from hetcompile.launch import run

    run(args.plan, steps=args.steps, save_params=args.save_params, timeout_s=args.timeout, trace=args.trace,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume)
    if args.save_params:
        print(f"saved parameters to {args.save_params}")
    if args.trace:
        print(f"wrote the measured last step to {args.trace} (open it at https://ui.perfetto.dev, beside "
              f"{os.path.join(args.plan, 'timeline.json')}, the predicted one)")
    if args.checkpoint_dir:
        print(f"saved checkpoints in {args.checkpoint_dir}")
    return 0


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcompile inspect",
                                description="Report a compiled plan: stages, devices, batch shares, predicted "
                                            "times, memory per device against capacity, solver status.")
    p.add_argument("plan", help="directory written by `hetcompile MODEL --cluster SPEC -o DIR`")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (for scripts, CI)")
    return p


def _inspect(args) -> int:
    from hetcompile.inspection import format_inspect, inspect_plan
    from hetcompile.plan import dumps, load

    report = inspect_plan(load(args.plan))
    print(dumps(report).rstrip() if args.json else format_inspect(report))
    return 0


def _explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcompile explain",
                                description="Why this plan: the bottleneck stage and what bounds it, and the "
                                            "predicted step time of the alternatives it beat.")
    p.add_argument("plan", help="directory written by `hetcompile MODEL --cluster SPEC -o DIR`")
    p.add_argument("--time-limit", type=float, default=10.0,
                   help="solver seconds for re-planning the alternatives (default 10)")
    p.add_argument("--json", action="store_true", help="print the explanation as one JSON object")
    return p


def _explain(args) -> int:
    from hetcompile.explain import explain, format_explain
    from hetcompile.plan import dumps, load

    report = explain(load(args.plan), time_limit_s=args.time_limit)
    print(dumps(report).rstrip() if args.json else format_explain(report))
    return 0


def _diff_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcompile diff",
                                description="What differs between two compiled plans: stages, devices, batch "
                                            "shares, schedule, micro-batches, predictions. Exit code 0 when "
                                            "they plan the same, 1 when they differ (like diff).")
    p.add_argument("plan_a", help="first plan directory")
    p.add_argument("plan_b", help="second plan directory")
    return p


def _diff(args) -> int:
    from hetcompile.inspection import diff_plans
    from hetcompile.plan import load

    lines = diff_plans(load(args.plan_a), load(args.plan_b))
    print("\n".join(lines) if lines else "the plans are the same")
    return 1 if lines else 0


class _TerminalProgress:
    """Compile progress on an interactive stderr: lasting lines, and one transient line redrawn in place."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.pending = False  # a transient line is on screen

    def __call__(self, text: str, *, transient: bool = False) -> None:
        # "\r" + erase-to-end-of-line replaces the transient line instead of scrolling; a transient
        # line wider than the terminal would wrap, and "\r" could then only erase its last row.
        prefix = "\r\033[K" if self.pending else ""
        line = f"  {text}"
        if transient:
            line = line[:shutil.get_terminal_size().columns - 1]
        self.stream.write(prefix + line + ("" if transient else "\n"))
        self.stream.flush()
        self.pending = transient

    def close(self) -> None:
        if self.pending:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.pending = False


def _profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetcompile profile",
        description="Measure this machine's device (matmul FLOP/s per dtype, memory bandwidth, per-op and "
                    "optimizer overheads) and, with --ranks N, p2p and all-reduce between N local ranks. "
                    'Name the file in a cluster spec: "devices": {"CPU": {"profile": "profile.json"}}.')
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to measure (default cpu)")
    p.add_argument("--ranks", type=_positive_int, default=1,
                   help="local ranks for the link measurements (default 1: no links; use 2 or more)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per rank while measuring; `hetcompile run` gives each rank 1 (default 1)")
    p.add_argument("--quick", action="store_true", help="shorter measurements (noisier)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL.py",
                   help="also time the forward and backward of this model's own blocks (layers) at a few "
                        "micro-batch sizes, and a step of its optimizer; plans of the model are then "
                        "priced by these times (repeatable)")
    p.add_argument("-o", "--out", required=True, help="profile file to write (JSON)")
    return p


def _profile(args) -> int:
    from cost_models.profile import measure_profile, save_profile, summary

    profile = measure_profile(args.device, num_ranks=args.ranks, num_threads=args.threads, quick=args.quick,
                              models=tuple(args.model))
    save_profile(profile, args.out)
    print(summary(profile))
    print(f"\nwrote {args.out}; use it in a cluster spec: "
          f'"devices": {{"{"CPU" if args.device == "cpu" else "YOUR-GPU-TYPE"}": {{"profile": "{args.out}"}}}}')
    return 0


# Subcommand name -> (argument parser, handler). `hetcompile MODEL ...` (no subcommand) compiles.
SUBCOMMANDS = {
    "profile": (_profile_parser, _profile),
    "run": (_run_parser, _run),
    "inspect": (_inspect_parser, _inspect),
    "explain": (_explain_parser, _explain),
    "diff": (_diff_parser, _diff),
}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so temporary output is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            make_parser, handler = SUBCOMMANDS[argv[0]]
            return handler(make_parser().parse_args(argv[1:]))
        return _compile(_compile_parser().parse_args(argv))
    except UserError as e:
        print(f"hetcompile: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        what = "the ranks were stopped" if argv and argv[0] == "run" else "nothing was written"
        print(f"hetcompile: interrupted; {what}.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hetcompile inspect OUT | head`): not worth a traceback. Point
        # stdout at devnull so the interpreter's final flush does not raise again (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _compile(args) -> int:
    import torch._logging

    from hetcompile.compiler import compile

    # torch.export logs its guard warnings; the CLI reports problems itself, as one paragraph.
    torch._logging.set_logs(all=logging.ERROR)

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"Output directory {args.out!r} already exists. Pass --force to replace it, or choose "
                        "another directory with -o.")
    progress = _TerminalProgress(sys.stderr) if sys.stderr.isatty() else None
    try:
        plan = compile(args.model, args.cluster, schedule=args.schedule, microbatches=args.microbatches,
                       seed=args.seed, max_stages=args.max_stages, time_limit_s=args.time_limit, progress=progress,
                       tp=args.tp, pp=args.pp, dp=args.dp)
    finally:
        if progress:
            progress.close()
    plan.save(args.out, force=args.force)
    print(plan.summary())
    print(f"\nwrote {args.out}/: plan.json, {plan.world_size} rank programs, launch.sh, "
          "timeline.png and timeline.json (Perfetto)")
    print(f"inspect it:  hetcompile inspect {args.out}  |  hetcompile explain {args.out}")
    print(f"train here:  hetcompile run {args.out} --steps 10")
    print(f"on a cluster: NODE_RANK=i MASTER_ADDR=host bash {args.out}/launch.sh --steps 10")
    return 0


def entry() -> None:
    """The ``hetcompile`` command: :func:`main`, then leave without tearing the interpreter down.

    NOTE: [quick exit] Tearing down an interpreter that holds torch, transformers and a traced
    model takes over a second (1.2-1.4 s after compiling Llama-3 8B for 64 GPUs, of a 12 s
    command). By the time ``main`` returns every file is written and closed and every child
    process has ended, so the command flushes its streams and ends the process at once.
    """
    rc = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`hetcompile inspect OUT | head`)
        pass
    os._exit(rc or 0)


if __name__ == "__main__":
    entry()
