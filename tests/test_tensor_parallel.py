"""Tensor parallelism: operators split across the members of a group train like one device.

The end-to-end tests run plans with tensor-parallel stages on real gloo ranks
(`hetcompile run`) and compare losses and final parameters with one-device
training, as tests/test_end_to_end.py does for pipeline and data parallelism.
The checkpoint tests stop and resume a tensor-parallel plan, on itself and on
a plan without tensor parallelism, and compare with one-device training too.
The other tests check the pass (passes/partition_ops.py) on captured graphs.
"""

from pathlib import Path

import pytest
import torch

import hetcompile
from hetcompile.compiler import analyze
from hetcompile.launch import run
from hetcompile.modelfile import load_model_file, reference_training
from hetcompile.plan import load
from hetcompile.planner import PlanDecision, StageDecision
from hetcompile.runtime import tp
from hetcompile.runtime.checkpoint import step_dir
from passes.partition_ops import partition, ranges_of, rank_graph, split_units
from test_end_to_end import assert_trains_like_one_device
from test_reliability import TOL, assert_params

CKPT_STEPS = 4
CLUSTER = {"nodes": [{"device": "A100-80GB", "count": 4}, {"device": "V100-32GB", "count": 4}]}


def _train_and_compare(mf, decision, tmp_path, schedule="1f1b", **pins):
    plan = hetcompile.compile(mf, CLUSTER, schedule=schedule, decision=decision, **pins)
    assert_trains_like_one_device(plan, mf, tmp_path)
    return plan


def _blocks_and_batch(mf):
    _, costs = analyze(mf)
    return costs.num_blocks, costs.global_batch


@pytest.mark.parametrize("model", ["gpt2.py", "llama.py"])
def test_tp2_stage_trains_like_one_device(model, examples, tmp_path):
    """Two stages: the transformer layers 2-way tensor parallel, then the head on one device."""
    mf = load_model_file(examples / model)
    n, batch = _blocks_and_batch(mf)
    b = batch // 2
    decision = PlanDecision((StageDecision(0, n - 2, (0, 1), (b, b), tp=2),
                             StageDecision(n - 1, n - 1, (4,), (b,))), num_microbatches=2, microbatch_size=b)
    plan = _train_and_compare(mf, decision, tmp_path)
    st = plan.stages[0]
    assert st.tp == 2 and len(st.param_shards) >= 6 * (n - 2)  # every projection of every layer is split
    program = plan.sources["stage_0_tp1.py"]
    assert "tp.enter(" in program and "tp.all_reduce(" in program


def test_uneven_3_to_1_heads_trains_like_one_device(examples, tmp_path):
    """A fast and a slow device in one TP group: 3 of GPT-2's 4 heads on one, 1 on the other."""
    mf = load_model_file(examples / "gpt2.py")
    n, batch = _blocks_and_batch(mf)
    decision = PlanDecision((StageDecision(0, n - 1, (0, 4), (batch, batch), tp=2, tp_parts=(3, 1)),),
                            num_microbatches=1, microbatch_size=batch)
    plan = _train_and_compare(mf, decision, tmp_path, schedule="gpipe")
    shards = {p.param: p for p in plan.stages[0].param_shards}
    qkv = shards["transformer.h.0.attn.c_attn.weight"]
    head = 32
    # q, k and v each give 3 whole heads to member 0 and 1 to member 1.
    assert qkv.ranges == (((0, 3 * head), (128, 128 + 3 * head), (256, 256 + 3 * head)),
                          ((3 * head, 128), (128 + 3 * head, 256), (256 + 3 * head, 384)))


def test_tp_pp_dp_on_8_ranks_trains_like_one_device(examples, tmp_path):
    """Three stages on 8 ranks: 2 replicas x TP 2 (uneven batch), TP 2 recomputing, then plain data parallel."""
    mf = load_model_file(examples / "llama.py")
    n, batch = _blocks_and_batch(mf)
    b = batch // 2
    decision = PlanDecision((
        StageDecision(0, 2, (0, 1, 4, 5), (3 * b // 4, 3 * b // 4, b // 4, b // 4), tp=2),
        StageDecision(3, n - 2, (2, 3), (b, b), tp=2, recompute=True),
        StageDecision(n - 1, n - 1, (6, 7), (b // 2, b - b // 2)),
    ), num_microbatches=2, microbatch_size=b)
    plan = _train_and_compare(mf, decision, tmp_path)
    assert plan.world_size == 8 and [s.tp for s in plan.stages] == [2, 2, 1]
    embedding = next(p for p in plan.stages[0].param_shards if p.param == "model.embed_tokens.weight")
    assert embedding.dim == 0 and embedding.ranges == (((0, 256),), ((256, 512),))  # split by vocabulary


def test_planned_tp_plan_trains_like_one_device(examples, tmp_path):
    """The user's path: `--tp 2` pinned, the planner fills in the rest, and the plan trains right."""
    mf = load_model_file(examples / "gpt2.py")
    plan = _train_and_compare(mf, None, tmp_path, schedule="auto", tp=2)
    assert all(st.tp == 2 for st in plan.stages)


def _analysis(examples, model, parts):
    cap, _ = analyze(load_model_file(examples / model))
    g = cap.gm.graph
    shardable = {n.name for n in g.nodes if n.op == "placeholder" and cap.placeholders[n.name].kind == "param"
                 and len(n.users) == 1}
    return g, partition(g, parts, shardable)


def test_unsplittable_ops_stay_whole_and_are_named(examples):
    """Llama's lm_head feeds cross-entropy over the vocabulary: no rule, so that matmul stays whole."""
    g, analysis = _analysis(examples, "llama.py", (1, 1))
    assert len(analysis.left_whole) == 1
    (why,) = analysis.left_whole.values()
    assert "cross_entropy" in why
    # 4 layers: q, k, v, gate, up by columns | o, down by rows; the embedding by vocabulary rows
    assert len(analysis.column) == 20 and len(analysis.row) == 9 and "embedding" in analysis.row
    # The graph of each member still runs: same outputs as the whole graph, no leftover split.
    for member in range(2):
        rank_graph(g, analysis, member).lint()


def test_gqa_heads_split_with_their_key_value_heads(examples):
    """Llama's 4 query heads share 2 key/value heads: an even split gives each member 2 + 1."""
    _, analysis = _analysis(examples, "llama.py", (1, 1))
    assert {analysis.column[name] for name in analysis.column} == {4, 2, 176}
    # 3:1 cannot split 2 key/value heads 3:1 the way it splits 4 query heads, so attention stays
    # whole and only the MLP is split.
    _, uneven = _analysis(examples, "llama.py", (3, 1))
    assert any("same heads" in why for why in uneven.left_whole.values())
    assert len(uneven.row) == 5  # the down projections and the embedding


def test_helpers():
    assert split_units(4, (3, 1)) == [(0, 3), (3, 4)]
    assert split_units(176, (1, 1)) == [(0, 88), (88, 176)]
    import numpy as np

    assert ranges_of(np.array([0, 1, 2, 8, 9])) == ((0, 3), (8, 10))
    full = torch.arange(24.0).reshape(2, 12)
    ranges = (((0, 3), (6, 9)), ((3, 6), (9, 12)))
    pieces = [tp.local_param(full, 1, r) for r in ranges]
    assert pieces[0].tolist() == [[0, 1, 2, 6, 7, 8], [12, 13, 14, 18, 19, 20]]
    assert torch.equal(tp.full_param(pieces, 1, ranges), full)
    assert tp.full_shape(pieces[1], 1, ranges) == (2, 12)


# -- checkpoints: a tensor-parallel plan saves whole tensors, so any plan of the model resumes them -------


@pytest.fixture(scope="module")
def gpt2_checkpoints(tmp_path_factory):
    """GPT-2 under a tensor-parallel plan and a plan without, its one-device reference, and the TP plan's
    checkpoints after each of its first 2 steps.

    The TP plan is the 3:1 one above (q|k|v split in several uneven intervals; the tied embedding
    whole on both members); the plan without TP is one rank.
    """
    mf = load_model_file(Path(__file__).resolve().parent.parent / "examples" / "gpt2.py")
    n, batch = _blocks_and_batch(mf)
    with_tp = PlanDecision((StageDecision(0, n - 1, (0, 4), (batch, batch), tp=2, tp_parts=(3, 1)),),
                           num_microbatches=1, microbatch_size=batch)
    without = PlanDecision((StageDecision(0, n - 1, (4,), (batch,)),), num_microbatches=1, microbatch_size=batch)
    root = tmp_path_factory.mktemp("tp_checkpoints")
    plan_tp = hetcompile.compile(mf, CLUSTER, schedule="gpipe", decision=with_tp).save(root / "tp")
    plan_no_tp = hetcompile.compile(mf, CLUSTER, schedule="gpipe", decision=without).save(root / "no_tp")
    ref_losses, ref_state = reference_training(mf, steps=CKPT_STEPS)
    ckpt = root / "ckpt_tp"
    losses = run(plan_tp, steps=2, checkpoint_dir=ckpt, checkpoint_every=1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[:2]), **TOL)
    return {"mf": mf, "plan_tp": plan_tp, "plan_no_tp": plan_no_tp, "ckpt": ckpt, "ref_losses": ref_losses,
            "ref_state": ref_state}


def _read_checkpoint(path, scratch_file) -> dict:
    """Every entry of a checkpoint but the ranks' RNG states, read on this process (through ``scratch_file``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, scratch_file)
    return {k: v for k, v in torch.load(scratch_file, weights_only=False).items() if not k.startswith("rng/")}


def test_tp_plan_resumes_its_own_checkpoint(gpt2_checkpoints, tmp_path):
    """The TP plan stops after 2 of 4 steps and resumes to the losses and parameters of uninterrupted training."""
    g = gpt2_checkpoints
    params = tmp_path / "params.pt"
    resumed = run(g["plan_tp"], steps=CKPT_STEPS, resume=g["ckpt"], save_params=params)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(g["ref_losses"][2:]), **TOL)
    assert_params(params, g["ref_state"])


def test_tp_checkpoint_is_any_plans_checkpoint(gpt2_checkpoints, tmp_path):
    """The TP plan's checkpoint holds whole parameters and AdamW state: the plan without TP resumes it to the
    results of uninterrupted training, and its own checkpoint of the same step is the same (so a TP plan
    resumes that one as it does its own)."""
    g = gpt2_checkpoints
    by_tp = _read_checkpoint(step_dir(g["ckpt"], 2), tmp_path / "by_tp.pt")
    split = {p.param for p in load(g["plan_tp"]).stages[0].param_shards}
    assert len(split) >= 6 * 4  # every projection of every layer
    with torch.device("meta"):
        model = g["mf"].build_model(0)
    for name in split:
        shape = model.get_parameter(name).shape
        for key in (f"model/{name}", f"optim/{name}/exp_avg", f"optim/{name}/exp_avg_sq"):
            assert by_tp[key].shape == shape, key
        assert by_tp[f"optim/{name}/step"] == 2

    ckpt = tmp_path / "ckpt_no_tp"
    params = tmp_path / "params.pt"
    losses = run(g["plan_no_tp"], steps=CKPT_STEPS, resume=step_dir(g["ckpt"], 1), checkpoint_dir=ckpt,
                 checkpoint_every=2, save_params=params)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(g["ref_losses"][1:]), **TOL)
    assert_params(params, g["ref_state"])
    by_no_tp = _read_checkpoint(step_dir(ckpt, 2), tmp_path / "by_no_tp.pt")
    assert by_no_tp.keys() == by_tp.keys()
    for key in by_tp:
        torch.testing.assert_close(by_no_tp[key], by_tp[key], **TOL, msg=lambda m: f"{key}: {m}")
