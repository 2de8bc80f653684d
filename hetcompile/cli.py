"""The command line: ``hetcompile MODEL --cluster SPEC -o OUT`` and ``hetcompile run OUT``.

The CLI owns the terminal: a :class:`~hetcompile.errors.UserError` prints one
paragraph and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hetcompile.errors import UserError

def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetcompile",
        description="Compile a PyTorch model for a cluster of mixed accelerators into one training program "
                    "per rank. Subcommands: `hetcompile run OUT` trains with a compiled plan.")
    p.add_argument("model", help="model file defining get_model() and get_batch(step)")
    p.add_argument("--cluster", required=True, help="cluster spec (JSON)")
    p.add_argument("-o", "--out", required=True, help="output directory for plan.json and the programs")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"], help="pipeline schedule")
    p.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per step (default: 4, or the largest divisor of the batch below 4)")
    p.add_argument("--max-stages", type=int, default=None, help="most pipeline stages the planner may use")
    p.add_argument("--seed", type=int, default=0, help="torch seed before get_model() (default 0)")
    p.add_argument("--time-limit", type=float, default=30.0, help="solver time limit in seconds")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetcompile run",
                                description="Train with a compiled plan: every rank as a local process "
                                            "(torchrun, gloo on CPU).")
    p.add_argument("plan", help="directory written by `hetcompile MODEL --cluster SPEC -o DIR`")
    p.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    p.add_argument("--save-params", default=None,
                   help="write the state dict after the last step to this file (torch.save)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits on a peer")
    return p


def _run(args) -> int:
    from hetcompile.launch import run

    run(args.plan, steps=args.steps, save_params=args.save_params, timeout_s=args.timeout)
    if args.save_params:
        print(f"saved parameters to {args.save_params}")
    return 0


# Subcommand name -> (argument parser, handler). `hetcompile MODEL ...` (no subcommand) compiles.
SUBCOMMANDS = {
    "run": (_run_parser, _run),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            make_parser, handler = SUBCOMMANDS[argv[0]]
            return handler(make_parser().parse_args(argv[1:]))
        return _compile(_compile_parser().parse_args(argv))
    except UserError as e:
        print(f"hetcompile: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hetcompile: interrupted; nothing was written.", file=sys.stderr)
        return 130


def _compile(args) -> int:
    import torch._logging

    from hetcompile.compiler import compile

    # torch.export logs its guard warnings; the CLI reports problems itself, as one paragraph.
    torch._logging.set_logs(all=logging.ERROR)

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"Output directory {args.out!r} already exists. Pass --force to replace it, or choose "
                        "another directory with -o.")
    progress = (lambda msg: print(f"  {msg}", file=sys.stderr)) if sys.stderr.isatty() else None
    plan = compile(args.model, args.cluster, schedule=args.schedule, microbatches=args.microbatches,
                   seed=args.seed, max_stages=args.max_stages, time_limit_s=args.time_limit, progress=progress)
    plan.save(args.out, force=args.force)
    print(plan.summary())
    print(f"\nwrote {args.out}/: plan.json, {plan.world_size} rank programs, launch.sh")
    print(f"train here:  hetcompile run {args.out} --steps 10")
    print(f"on a cluster: NODE_RANK=i MASTER_ADDR=host bash {args.out}/launch.sh --steps 10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
