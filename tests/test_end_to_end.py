"""Numerical equivalence: training with a plan on real gloo ranks equals training on one device.

Each test compiles a plan for a two-type cluster with at least two pipeline
stages and a data-parallel stage with uneven batch shares, runs it for three
steps with `hetcompile run` (torchrun, gloo on CPU), and compares the losses
and final parameters with single-device training on the same global batches.
"""

import functools
import json
import subprocess
import sys

import pytest
import torch

import hetcompile
from hetcompile.compiler import analyze
from hetcompile.launch import run
from hetcompile.modelfile import load_model_file, reference_training
from hetcompile.planner import PlanDecision, StageDecision

STEPS = 3
CLUSTER = {"nodes": [{"device": "A100-80GB", "count": 3}, {"device": "V100-32GB", "count": 2}]}


def _pinned(num_blocks: int, batch: int, microbatches: int, recompute: bool = False) -> PlanDecision:
    """Three stages on five ranks: A100s 3:1 data parallel, one A100 (recomputing when asked), then V100s 1:3."""
    b = batch // microbatches
    mid = num_blocks // 2
    return PlanDecision(stages=(
        StageDecision(first_block=0, last_block=mid - 1, devices=(0, 1), shares=(b - b // 4, b // 4)),
        StageDecision(first_block=mid, last_block=num_blocks - 2, devices=(2,), shares=(b,), recompute=recompute),
        StageDecision(first_block=num_blocks - 1, last_block=num_blocks - 1, devices=(3, 4),
                      shares=(b // 4, b - b // 4)),
    ), num_microbatches=microbatches, microbatch_size=b)


def _interleaved(num_blocks: int, batch: int, microbatches: int, tp: bool = False) -> PlanDecision:
    """Four stages round two device groups (A100s 3:1 data parallel, or one TP group with 3:1 shards;
    V100s 1:3), the third recomputing: stages 0 and 2 on one group, 1 and 3 on the other."""
    b = batch // microbatches
    cuts = [0, 1, num_blocks // 2, num_blocks - 2, num_blocks]
    a100 = (dict(devices=(0, 1), shares=(b, b), tp=2, tp_parts=(3, 1)) if tp
            else dict(devices=(0, 1), shares=(b - b // 4, b // 4)))
    groups = [a100, dict(devices=(3, 4), shares=(b // 4, b - b // 4))]
    return PlanDecision(stages=tuple(StageDecision(first_block=cuts[i], last_block=cuts[i + 1] - 1,
                                                   recompute=i == 2, **groups[i % 2]) for i in range(4)),
                        num_microbatches=microbatches, microbatch_size=b, schedule="interleaved")


def _check_equivalence(model_file, schedule, tmp_path, recompute=False):
    mf = load_model_file(model_file)
    _, costs = analyze(mf)
    decision = _pinned(costs.num_blocks, costs.global_batch, 4, recompute)
    plan = hetcompile.compile(mf, CLUSTER, schedule=schedule, decision=decision)
    assert len(plan.stages) >= 2 and plan.world_size >= 4
    assert any(len(set(s.shares)) > 1 for s in plan.stages), "a data-parallel stage with uneven shares"
    assert_trains_like_one_device(plan, mf, tmp_path)


def assert_trains_like_one_device(plan, mf, tmp_path):
    """Train ``plan`` for STEPS steps on gloo ranks; losses and final parameters equal one-device training."""
    out = plan.save(tmp_path / "plan")
    params = tmp_path / "params.pt"
    losses = run(out, steps=STEPS, save_params=params)
    ref_losses, ref_state = reference_training(mf, steps=STEPS, seed=0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    state = torch.load(params, weights_only=True)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("model", ["mlp.py", "gpt2.py", "llama.py", "bert.py"])
def test_plan_trains_like_one_device(model, schedule, examples, tmp_path):
    _check_equivalence(examples / model, schedule, tmp_path)


@pytest.mark.parametrize("model,tp", [("gpt2.py", True), ("bert.py", False)])
def test_interleaved_trains_like_one_device(model, tp, examples, tmp_path):
    """Interleaved 1F1B: each rank runs two stages (GPT-2: the A100 group's two stages tensor parallel,
    3:1 heads). BERT's padding mask, made in stage 0, is read by every stage: once in memory on its
    own rank, and received once for both stages of the other."""
    mf = load_model_file(examples / model)
    _, costs = analyze(mf)
    plan = hetcompile.compile(mf, CLUSTER, schedule="interleaved",
                              decision=_interleaved(costs.num_blocks, costs.global_batch, 4, tp))
    assert plan.chunks == 2 and all(len(r.stages) == 2 for r in plan.ranks)
    if model == "bert.py":
        assert any(len(v.consumers) == 3 for v in plan.values), "a value read by every later stage"
    assert_trains_like_one_device(plan, mf, tmp_path)


def test_recompute_trains_like_one_device(examples, tmp_path):
    """A stage that keeps only its inputs and reruns its forward in backward changes no number."""
    _check_equivalence(examples / "llama.py", "1f1b", tmp_path, recompute=True)


def test_cli_compile_and_run_matches_one_device(examples, tmp_path):
    """The user's path: `hetcompile MODEL --cluster SPEC -o OUT`, then `hetcompile run OUT`."""
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "hetcompile.cli"]
    done = subprocess.run(cli + [str(examples / "gpt2.py"), "--cluster", str(examples / "a100_v100.json"),
                                 "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "predicted" in done.stdout and "solver" in done.stdout
    params = tmp_path / "p.pt"
    trace = tmp_path / "measured.json"
    done = subprocess.run(cli + ["run", str(out), "--steps", "2", "--save-params", str(params), "--trace", str(trace)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    # The measured last step: every rank, every forward and backward of its stage(s), the optimizer.
    plan = hetcompile.load(out)
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for r in plan.ranks:
        kinds = [e["cat"] for e in spans if e["pid"] == r.rank]
        assert kinds.count("F") == kinds.count("B") == plan.num_microbatches * len(r.stages), (r.rank, kinds)
        assert "optimizer" in kinds
    losses = [float(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("step ")]
    ref_losses, ref_state = reference_training(load_model_file(examples / "gpt2.py"), steps=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    state = torch.load(params, weights_only=True)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)


def test_compile_an_in_memory_module(examples, tmp_path):
    """The Python API on an nn.Module with example inputs: the plan trains the module's own weights."""
    gpt2 = load_model_file(examples / "gpt2.py")
    torch.manual_seed(1)
    module, batch = gpt2.get_model(), gpt2.get_batch(0)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)
    mf = hetcompile.compiler.module_model_file(module, batch, optimizer)
    _, costs = analyze(mf)
    plan = hetcompile.compile(module, CLUSTER, batch, optimizer=optimizer, schedule="1f1b",
                              decision=_pinned(costs.num_blocks, costs.global_batch, 4))
    params = tmp_path / "params.pt"
    losses = run(plan.save(tmp_path / "plan"), steps=2, save_params=params)
    ref_losses, ref_state = reference_training(mf, steps=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    state = torch.load(params, weights_only=True)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)
