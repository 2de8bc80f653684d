"""Reliability: start-up checks, a failed rank stops the run, checkpoints survive a change of plan.

GPT-2 (AdamW, tied embeddings) under two pinned plans of the same model: a
2-stage plan on 3 ranks of A100s and V100s (1F1B, 3:1 shares) and a 3-stage plan
on 4 ranks of another cluster, an H100 and T4s (GPipe, 1:3 shares, two
micro-batches). Checkpoints written by one are resumed by the other, and every
result is compared with one-device training. The failure tests, and the resume
under the same plan, use the MLP, whose ranks start fastest.
"""

import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import hetcompile
from hetcompile import cli
from hetcompile.compiler import analyze
from hetcompile.errors import UserError
from hetcompile.launch import run
from hetcompile.modelfile import load_model_file, reference_training
from hetcompile.planner import PlanDecision, StageDecision
from hetcompile.runtime.checkpoint import MANIFEST, find_checkpoint, step_dir

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
TOL = dict(rtol=1e-4, atol=1e-5)
CLUSTER = {"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "V100-32GB", "count": 2}]}
OTHER_CLUSTER = {"nodes": [{"device": "H100-80GB", "count": 1}, {"device": "T4-16GB", "count": 3}]}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The model file, its one-device reference, and two different plans of it."""
    mf = load_model_file(ROOT / "examples" / "gpt2.py")
    _, costs = analyze(mf)
    n, batch = costs.num_blocks, costs.global_batch
    b = batch // 4
    two = PlanDecision(stages=(
        StageDecision(first_block=0, last_block=n // 2 - 1, devices=(0, 1), shares=(b - b // 4, b // 4)),
        StageDecision(first_block=n // 2, last_block=n - 1, devices=(2,), shares=(b,)),
    ), num_microbatches=4, microbatch_size=b)
    b = batch // 2
    three = PlanDecision(stages=(
        StageDecision(first_block=0, last_block=0, devices=(0,), shares=(b,)),
        StageDecision(first_block=1, last_block=n - 2, devices=(1, 2), shares=(b // 4, b - b // 4)),
        StageDecision(first_block=n - 1, last_block=n - 1, devices=(3,), shares=(b,)),
    ), num_microbatches=2, microbatch_size=b)
    root = tmp_path_factory.mktemp("plans")
    plan2 = hetcompile.compile(mf, CLUSTER, schedule="1f1b", decision=two).save(root / "two_stages")
    plan3 = hetcompile.compile(mf, OTHER_CLUSTER, schedule="gpipe", decision=three).save(root / "three_stages")
    ref_losses, ref_state = reference_training(mf, steps=STEPS)
    return {"plan2": plan2, "plan3": plan3, "ref_losses": ref_losses, "ref_state": ref_state}


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory):
    """A 2-stage MLP plan on 3 ranks: its ranks start fastest, for the failure tests that need no numbers."""
    mf = load_model_file(ROOT / "examples" / "mlp.py")
    _, costs = analyze(mf)
    n, b = costs.num_blocks, costs.global_batch // 4
    decision = PlanDecision(stages=(
        StageDecision(first_block=0, last_block=n // 2 - 1, devices=(0, 1), shares=(b - b // 4, b // 4)),
        StageDecision(first_block=n // 2, last_block=n - 1, devices=(2,), shares=(b,)),
    ), num_microbatches=4, microbatch_size=b)
    return hetcompile.compile(mf, CLUSTER, decision=decision).save(tmp_path_factory.mktemp("mlp") / "plan")


def assert_params(path, ref_state):
    """The parameters that `run(..., save_params=path)` wrote equal ``ref_state`` (one-device training)."""
    state = torch.load(path, weights_only=True)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_resume_under_the_same_plan(mlp_plan, tmp_path):
    """The MLP (SGD with momentum: optimizer state) stops after 2 of 4 steps and resumes on the same plan."""
    ref_losses, ref_state = reference_training(load_model_file(ROOT / "examples" / "mlp.py"), steps=STEPS)
    ckpt = tmp_path / "ckpt"
    full = run(mlp_plan, steps=STEPS, checkpoint_dir=ckpt, checkpoint_every=2)
    torch.testing.assert_close(torch.tensor(full), torch.tensor(ref_losses), **TOL)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002", "step_00000004"]
    assert find_checkpoint(ckpt).step == STEPS  # the latest one
    # Ranks 0 and 1 hold the same stage (data parallel); DCP writes their entries once.
    saved = FileSystemReader(str(step_dir(ckpt, 2))).read_metadata().state_dict_metadata
    unique_bytes = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in saved.values() if hasattr(m, "size"))
    written_bytes = sum(f.stat().st_size for f in step_dir(ckpt, 2).glob("*.distcp"))
    assert written_bytes < 1.1 * unique_bytes + 100_000, (written_bytes, unique_bytes)
    params = tmp_path / "params.pt"
    resumed = run(mlp_plan, steps=STEPS, resume=step_dir(ckpt, 2), save_params=params)
    assert len(resumed) == STEPS - 2  # --steps counts all steps: steps 2 and 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), **TOL)
    assert_params(params, ref_state)


def test_killed_rank_stops_the_run_and_another_plan_resumes(gpt2, tmp_path, capsys):
    """Rank 2 dies (SIGKILL) at step 3; the 3-stage run stops within the timeout naming it, and the
    2-stage plan resumes from the step-2 checkpoint to the parameters of uninterrupted training."""
    ckpt = tmp_path / "ckpt"
    timeout_s = 15
    last_line_s = []

    class Lines(io.StringIO):
        def write(self, text):
            last_line_s.append(time.monotonic())
            return super().write(text)

    with pytest.raises(UserError) as failed:
        run(gpt2["plan3"], steps=STEPS, checkpoint_dir=ckpt, checkpoint_every=2, timeout_s=timeout_s,
            env={"HETCOMPILE_FAIL_AT": "2:3:kill"}, stream=Lines())
    stopped_after_s = time.monotonic() - last_line_s[-1]
    assert stopped_after_s < timeout_s, stopped_after_s
    message = str(failed.value)
    assert message.startswith("Rank 2 (T4-16GB, stage 1) was killed by SIGKILL"), message
    assert f"--resume {ckpt}" in message
    # The save of step 4 never happened; step 2's is complete and is the one resumed.
    assert find_checkpoint(ckpt).step == 2

    params = tmp_path / "params.pt"
    code = cli.main(["run", str(gpt2["plan2"]), "--steps", str(STEPS), "--resume", str(ckpt),
                     "--save-params", str(params)])
    out = capsys.readouterr().out
    assert code == 0, out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in out.splitlines() if line.startswith("step ")] == [2, 3]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(gpt2["ref_losses"][2:]), **TOL)
    assert_params(params, gpt2["ref_state"])


def test_rank_error_is_reported_with_its_traceback(mlp_plan):
    """A rank that raises: the message names it and its step, and carries its own traceback tail."""
    with pytest.raises(UserError) as failed:
        run(mlp_plan, steps=3, timeout_s=10, env={"HETCOMPILE_FAIL_AT": "1:1"})
    message = str(failed.value)
    assert message.startswith("Rank 1 (A100-80GB, stage 0) failed at step 1"), message
    assert "simulated failure of rank 1 at step 1" in message
    assert "Traceback" not in message.splitlines()[0]


def test_rank_killed_after_its_work_loses_nothing(mlp_plan):
    """A rank that dies after every rank has finished (gloo can abort while closing connections):
    the run keeps its losses and says what happened, instead of failing (NOTE: [teardown race])."""
    out = io.StringIO()
    losses = run(mlp_plan, steps=2, timeout_s=10, env={"HETCOMPILE_FAIL_AT": "1:end:kill"}, stream=out)
    assert len(losses) == 2
    assert "every rank finished" in out.getvalue()


def test_hung_rank_is_named_after_the_timeout(mlp_plan):
    """Rank 0 hangs at step 1: rank 2 times out waiting for it and rank 1 waiting for rank 2; the run
    stops soon after --timeout and names rank 0, not the ranks that gave up waiting."""
    timeout_s = 5
    start_s = time.monotonic()
    with pytest.raises(UserError) as failed:
        run(mlp_plan, steps=3, timeout_s=timeout_s, env={"HETCOMPILE_FAIL_AT": "0:1:hang"})
    message = str(failed.value)
    assert message.startswith("Rank 0 (A100-80GB, stage 0) stopped answering at step 1"), message
    assert time.monotonic() - start_s < 120  # start-up on a loaded CI machine, one step, 5 s, shutdown


# -- start-up checks: a rank refuses to run what it was not compiled for -------------------------------


def _start_rank(plan_dir, rank, monkeypatch, **env):
    """Start rank ``rank``'s context as its program would, in this process: it must refuse (SystemExit)
    before touching the network."""
    import importlib.util

    from hetcompile.runtime import RankContext

    program = (plan_dir / f"rank_{rank}.py").read_text()
    fingerprint = program.split('FINGERPRINT = "', 1)[1].split('"', 1)[0]
    world_size = int(program.split("WORLD_SIZE = ", 1)[1].split("\n", 1)[0])
    stage_index = int(program.split("import stage_", 1)[1].split(" ", 1)[0])
    spec = importlib.util.spec_from_file_location("stage_under_test", plan_dir / f"stage_{stage_index}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # RankContext installs its own
    with pytest.raises(SystemExit) as refused:
        RankContext(str(plan_dir), rank=rank, stages={stage_index: stage}, fingerprint=fingerprint,
                    world_size=world_size)
    return str(refused.value)


def test_rank_refuses_a_wrong_launch(gpt2, monkeypatch):
    message = _start_rank(gpt2["plan3"], 1, monkeypatch, WORLD_SIZE="3", RANK="1")
    assert "was started as rank 1 of 3, but the plan has 4 ranks" in message, message


def test_rank_refuses_files_of_another_compile(gpt2, tmp_path, monkeypatch):
    mixed = tmp_path / "mixed"
    shutil.copytree(gpt2["plan3"], mixed)
    shutil.copy(gpt2["plan2"] / "plan.json", mixed / "plan.json")
    message = _start_rank(mixed, 0, monkeypatch, WORLD_SIZE="3", RANK="0")
    assert "mixes the files of two compiles" in message, message

    # Same plan.json, but a stage file from the other compile.
    shutil.copy(gpt2["plan3"] / "plan.json", mixed / "plan.json")
    shutil.copy(gpt2["plan2"] / "stage_0.py", mixed / "stage_0.py")
    message = _start_rank(mixed, 0, monkeypatch, WORLD_SIZE="4", RANK="0")
    assert "stage_0.py does not belong to plan" in message, message


def test_run_reports_a_refused_start(mlp_plan, tmp_path):
    """Through `hetcompile run`: the rank's own refusal, not a torchrun dump."""
    broken = tmp_path / "broken"
    shutil.copytree(mlp_plan, broken)
    program = broken / "rank_1.py"
    program.write_text(program.read_text().replace('FINGERPRINT = "', 'FINGERPRINT = "0ld'))
    with pytest.raises(UserError) as failed:
        run(broken, steps=1)
    message = str(failed.value)
    assert message.startswith("Rank 1 (A100-80GB, stage 0) failed while starting"), message
    assert "mixes the files of two compiles" in message


# -- bad run flags and checkpoints: clean errors before any rank starts --------------------------------


def _fake_checkpoint(root, step, version):
    d = step_dir(root, step)
    d.mkdir(parents=True)
    (d / MANIFEST).write_text(json.dumps({"version": version, "step": step}))
    return d


@pytest.mark.parametrize("version, words", [(99, "newer"), (0, "older")])
def test_checkpoint_of_another_version(gpt2, tmp_path, version, words):
    _fake_checkpoint(tmp_path / "ckpt", 2, version)
    with pytest.raises(UserError, match=words):
        run(gpt2["plan2"], steps=4, resume=tmp_path / "ckpt")


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "--steps"),
    (dict(steps=2, timeout_s=0), "--timeout"),
    (dict(steps=2, checkpoint_every=2), "needs --checkpoint-dir"),
    (dict(steps=2, checkpoint_every=0, checkpoint_dir="x"), "--checkpoint-every"),
    (dict(steps=2, resume="no/such/dir"), "no such directory"),
])
def test_bad_run_flags(gpt2, tmp_path, kwargs, words):
    with pytest.raises(UserError, match=words):
        run(gpt2["plan2"], **kwargs)


def test_resume_checks(gpt2, tmp_path):
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        run(gpt2["plan2"], steps=4, resume=tmp_path)
    # An unfinished save (killed before its rename) is never picked.
    (tmp_path / ".step_00000006.tmp").mkdir()
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        run(gpt2["plan2"], steps=4, resume=tmp_path)


def test_nothing_left_to_train(gpt2, tmp_path):
    # A real checkpoint is not needed: the step count is checked first.
    _fake_checkpoint(tmp_path / "ckpt", 4, 1)
    with pytest.raises(UserError, match="nothing left to train"):
        run(gpt2["plan2"], steps=4, resume=tmp_path / "ckpt")


# -- interrupted compiles leave nothing behind ---------------------------------------------------------


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from hetcompile.output import write_atomically

    real_write = Path.write_text
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "out", {"a.txt": "a", "b.txt": "b", "c.txt": "c"})
    assert list(tmp_path.iterdir()) == []


def test_cli_interrupted_compile(tmp_path, monkeypatch, capsys):
    import hetcompile.compiler

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hetcompile.compiler, "compile", interrupted)
    code = cli.main(["model.py", "--cluster", "c.json", "-o", str(tmp_path / "out")])
    assert code == 130
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
