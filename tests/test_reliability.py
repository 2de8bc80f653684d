"""Reliability: start-up checks, a failed rank stops the run, checkpoints survive a change of plan.

GPT-2 (AdamW, tied embeddings) under two pinned plans of the same model: a
2-stage plan on 3 ranks (1F1B, 3:1 shares) and a 3-stage plan on 4 ranks
(GPipe, 1:3 shares, two micro-batches). Checkpoints written by one are resumed
by the other, and every result is compared with one-device training.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    plan3 = hetcompile.compile(mf, CLUSTER, schedule="gpipe", decision=three).save(root / "three_stages")
    ref_losses, ref_state = reference_training(mf, steps=STEPS)
    return {"plan2": plan2, "plan3": plan3, "ref_losses": ref_losses, "ref_state": ref_state}


def _assert_params(path, ref_state):
    state = torch.load(path, weights_only=True)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_resume_under_the_same_plan(gpt2, tmp_path):
    ckpt = tmp_path / "ckpt"
    full = run(gpt2["plan2"], steps=STEPS, checkpoint_dir=ckpt, checkpoint_every=2)
    torch.testing.assert_close(torch.tensor(full), torch.tensor(gpt2["ref_losses"]), **TOL)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002", "step_00000004"]
    assert find_checkpoint(ckpt).step == STEPS  # the latest one
    params = tmp_path / "params.pt"
    resumed = run(gpt2["plan2"], steps=STEPS, resume=step_dir(ckpt, 2), save_params=params)
    assert len(resumed) == STEPS - 2  # --steps counts all steps: steps 2 and 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), **TOL)
    _assert_params(params, gpt2["ref_state"])


def test_killed_rank_stops_the_run_and_another_plan_resumes(gpt2, tmp_path, monkeypatch, capsys):
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
    assert message.startswith("Rank 2 (V100-32GB, stage 1) was killed by SIGKILL"), message
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
    _assert_params(params, gpt2["ref_state"])


def test_rank_error_is_reported_with_its_traceback(gpt2, tmp_path):
    """A rank that raises: the message names it and its step, and carries its own traceback tail."""
    with pytest.raises(UserError) as failed:
        run(gpt2["plan2"], steps=3, timeout_s=10, env={"HETCOMPILE_FAIL_AT": "1:1"})
    message = str(failed.value)
    assert message.startswith("Rank 1 (A100-80GB, stage 0) failed at step 1"), message
    assert "simulated failure of rank 1 at step 1" in message
    assert "Traceback" not in message.splitlines()[0]


# -- start-up checks: a rank refuses to run what it was not compiled for -------------------------------


def _start_rank(plan_dir, rank, **env):
    """Start one rank program by hand (no torchrun): it must refuse before touching the network."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, str(plan_dir / f"rank_{rank}.py")], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_rank_refuses_a_wrong_launch(gpt2):
    done = _start_rank(gpt2["plan3"], 1, WORLD_SIZE="3", RANK="1")
    assert done.returncode != 0
    assert "was started as rank 1 of 3, but the plan has 4 ranks" in done.stderr, done.stderr


def test_rank_refuses_files_of_another_compile(gpt2, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(gpt2["plan3"], mixed)
    shutil.copy(gpt2["plan2"] / "plan.json", mixed / "plan.json")
    done = _start_rank(mixed, 0, WORLD_SIZE="3", RANK="0")
    assert done.returncode != 0
    assert "mixes the files of two compiles" in done.stderr, done.stderr

    # Same plan.json, but a stage file from the other compile.
    shutil.copy(gpt2["plan3"] / "plan.json", mixed / "plan.json")
    shutil.copy(gpt2["plan2"] / "stage_0.py", mixed / "stage_0.py")
    done = _start_rank(mixed, 0, WORLD_SIZE="4", RANK="0")
    assert done.returncode != 0
    assert "stage_0.py does not belong to plan" in done.stderr, done.stderr


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
