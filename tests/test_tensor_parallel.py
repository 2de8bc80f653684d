"""Tensor parallelism: operators split across the members of a group train like one device.

The end-to-end tests run plans with tensor-parallel stages on real gloo ranks
(`hetcompile run`) and compare losses and final parameters with one-device
training, as tests/test_end_to_end.py does for pipeline and data parallelism.
The other tests check the pass (passes/partition_ops.py) on captured graphs.
"""

import pytest
import torch

import hetcompile
from hetcompile.compiler import analyze
from hetcompile.errors import UserError
from hetcompile.launch import run
from hetcompile.modelfile import load_model_file
from hetcompile.planner import PlanDecision, StageDecision
from hetcompile.runtime import tp
from passes.partition_ops import partition, ranges_of, rank_graph, split_units
from test_end_to_end import assert_trains_like_one_device
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


def test_checkpointing_a_tp_plan_is_refused_clearly(examples, tmp_path):
    mf = load_model_file(examples / "gpt2.py")
    n, batch = _blocks_and_batch(mf)
    decision = PlanDecision((StageDecision(0, n - 1, (0, 1), (batch, batch), tp=2),), 1, batch)
    out = hetcompile.compile(mf, CLUSTER, schedule="gpipe", decision=decision).save(tmp_path / "plan")
    with pytest.raises(UserError, match="cannot checkpoint or resume tensor-parallel plans"):
        run(out, steps=1, checkpoint_dir=tmp_path / "ckpt")
