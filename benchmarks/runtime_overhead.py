"""hetcompile's emitted programs against torch.distributed.pipelining, same model, split and schedule.

    .venv/bin/python benchmarks/runtime_overhead.py [--steps 25] [--warmup 5] [--rounds 3] [--cases mlp-gpipe,...]

For each case: two pipeline stages on two gloo ranks on this CPU (four stages,
two per rank, for the interleaved cases; one torch
thread per rank), the same model file, the same split, the same schedule and
micro-batch count, the same optimizer (the model file's ``get_optimizer``)
and the same per-step batch (``get_batch(step)`` on every rank). Two ways:

- hetcompile: ``hetcompile.compile(..., decision=pinned)`` then
  ``hetcompile.launch.run`` (the emitted ``rank_R.py`` programs under torchrun);
- reference: this file under torchrun with ``--reference CASE``: hand-written
  stage modules, ``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B`` /
  ``ScheduleInterleaved1F1B``, then
  ``optimizer.step()`` and an all-reduce of the loss (hetcompile's ``end_step``
  does the same, so both step ends are a synchronisation of every rank).

Both print a per-step time on rank 0 (between the end-of-step
synchronisations). The two ways run alternately ``--rounds`` times, so slow
phases of a shared machine hit both; each way's figure is the median over all
its steps after ``--warmup`` per run. Prints the ratio hetcompile / reference
(target: <= 1.0).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.models import example_file  # noqa: E402

# case -> (model file, schedule, micro-batches, the last block of every stage but the last);
# stage s runs on rank s % 2. mlp_wide.py: the example MLP at width 512, batch 256, whose steps
# outlast the scheduler's tick (NOTE: [steps over the tick] in benchmarks/models.py).
CASES = {
    "mlp-gpipe": ("mlp_wide.py", "gpipe", 4, (6,)),
    "mlp-1f1b": ("mlp_wide.py", "1f1b", 4, (6,)),
    "llama-1f1b": ("llama.py", "1f1b", 4, (2,)),
    "llama-gpipe": ("llama.py", "gpipe", 2, (2,)),
    "mlp-interleaved": ("mlp_wide.py", "interleaved", 4, (3, 6, 9)),
    "llama-interleaved": ("llama.py", "interleaved", 4, (1, 2, 3)),
}


def _stage_blocks(case: str, num_blocks: int) -> list[tuple[int, int]]:
    last = CASES[case][3]
    firsts = [0] + [b + 1 for b in last]
    return list(zip(firsts, list(last) + [num_blocks - 1]))


# ---------------------------------------------------------------- the hand-written reference


def _build_reference(mf, model, first: int, last: int, num_blocks: int):
    """The hand-written module of the stage with blocks ``first..last``."""
    import torch
    import torch.nn.functional as F

    if isinstance(model, torch.nn.Sequential):  # mlp.py: blocks 0..12 the Sequential's modules, 13 the loss
        return torch.nn.Sequential(*list(model)[first:min(last, len(model) - 1) + 1]), mf.loss_fn

    # Llama: block 0 the embedding, blocks 1..4 the decoder layers, block 5 norm + head + loss.
    inner = model.model

    class Piece(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = inner.embed_tokens if first == 0 else None
            self.rotary_emb = inner.rotary_emb
            self.layers = torch.nn.ModuleList(inner.layers[max(first, 1) - 1:min(last, num_blocks - 2)])
            self.norm, self.lm_head = (inner.norm, model.lm_head) if last == num_blocks - 1 else (None, None)

        def forward(self, h):
            if self.embed_tokens is not None:
                h = self.embed_tokens(h)
            pos = torch.arange(h.shape[1]).unsqueeze(0)
            pe = self.rotary_emb(h, pos)
            for layer in self.layers:  # attention_mask None: causal SDPA, as the model's own mask
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            return h if self.lm_head is None else self.lm_head(self.norm(h))

    def causal_lm_loss(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))

    return Piece(), causal_lm_loss


def reference_worker(case: str, model_path: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    from hetcompile.modelfile import load_model_file
    from hetcompile.runtime.host_memory import keep_freed_memory

    keep_freed_memory()  # as hetcompile's CPU ranks do, so that the ratio compares the runtimes alone
    _, schedule_name, num_microbatches, _ = CASES[case]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    mf = load_model_file(model_path)
    model = mf.build_model(0)
    num_blocks = len(model) + 1 if isinstance(model, torch.nn.Sequential) else len(model.model.layers) + 2
    blocks = _stage_blocks(case, num_blocks)
    mine = [s for s in range(len(blocks)) if s % world == rank]
    built = [_build_reference(mf, model, *blocks[s], num_blocks) for s in mine]
    loss_fn = built[0][1]
    is_last = len(blocks) - 1 in mine
    stages = [PipelineStage(module, s, len(blocks), torch.device("cpu")) for (module, _), s in zip(built, mine)]
    # Every rank gets the loss: without one, a schedule runs forward only.
    if schedule_name == "interleaved":
        schedule = ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=loss_fn)
    else:
        schedule_cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        schedule = schedule_cls(stages[0], num_microbatches, loss_fn=loss_fn)
    optimizer = mf.get_optimizer([p for module, _ in built for p in module.parameters()])
    last_s = time.perf_counter()
    for step in range(steps):
        flat, _ = mf.flat_batch(step)  # every rank fetches the batch, as hetcompile's start_step does
        optimizer.zero_grad(set_to_none=True)
        losses: list = []
        if rank == 0:
            schedule.step(flat[0])
        else:
            schedule.step(target=flat[-1], losses=losses)
        optimizer.step()
        total = torch.stack(losses).mean().double() if is_last else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(total)
        now_s = time.perf_counter()
        if rank == 0:
            print(f"step {step} loss {float(total):.6f} time_ms {(now_s - last_s) * 1e3:.3f}", flush=True)
        last_s = now_s
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_times_s(text: str, warmup: int) -> list[float]:
    times = [float(line.split()[5]) / 1e3 for line in text.splitlines() if line.startswith("step ")]
    return times[warmup:]


def run_reference(case: str, model_path: Path, steps: int, warmup: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", __file__, "--reference", case, "--model", str(model_path), "--steps", str(steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"reference run of {case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return _step_times_s(done.stdout, warmup)


def run_hetcompile(plan_dir: Path, steps: int, warmup: int) -> list[float]:
    from hetcompile.launch import run

    out = io.StringIO()
    run(plan_dir, steps=steps, stream=out)
    return _step_times_s(out.getvalue(), warmup)


def compile_case(case: str, model_path: Path, out_dir: Path) -> Path:
    import hetcompile
    from hetcompile.compiler import analyze
    from hetcompile.planner import PlanDecision, StageDecision

    _, schedule, num_microbatches, _ = CASES[case]
    _, costs = analyze(model_path)
    b = costs.global_batch // num_microbatches
    decision = PlanDecision(stages=tuple(StageDecision(first, last, (s % 2,), (b,)) for s, (first, last)
                                         in enumerate(_stage_blocks(case, costs.num_blocks))),
                            num_microbatches=num_microbatches, microbatch_size=b, schedule=schedule)
    plan = hetcompile.compile(str(model_path), {"nodes": [{"device": "CPU", "count": 2}]},
                              schedule=schedule, microbatches=num_microbatches, decision=decision)
    return plan.save(out_dir / case)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="steps per run (default 25)")
    parser.add_argument("--warmup", type=int, default=5, help="steps per run left out (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each way (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)  # worker mode, under torchrun
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)  # the worker's model file
    args = parser.parse_args(argv)
    if args.reference:
        reference_worker(args.reference, args.model, args.steps)
        return 0

    print(f"{'case':<17} {'hetcompile ms':>14} {'reference ms':>13} {'ratio':>7}  ratio per round")
    with tempfile.TemporaryDirectory(prefix="hetcompile-overhead-") as tmp:
        for case in args.cases.split(","):
            model_path = example_file(CASES[case][0], Path(tmp))
            plan_dir = compile_case(case, model_path, Path(tmp))
            het, ref, per_round = [], [], []
            for _ in range(args.rounds):
                het_round = run_hetcompile(plan_dir, args.steps, args.warmup)
                ref_round = run_reference(case, model_path, args.steps, args.warmup)
                het += het_round
                ref += ref_round
                per_round.append(statistics.median(het_round) / statistics.median(ref_round))
            het_s, ref_s = statistics.median(het), statistics.median(ref)
            rounds = " ".join(f"{r:.2f}" for r in per_round)
            print(f"{case:<17} {het_s * 1e3:>14.2f} {ref_s * 1e3:>13.2f} {het_s / ref_s:>6.2f}x  {rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
