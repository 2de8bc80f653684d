"""The CP-SAT planner (hetcompile/planner.py) on synthetic models: known answers and brute force."""

from __future__ import annotations

import dataclasses
import doctest
import os
import random
import subprocess
import sys
import textwrap

import pytest

import hetcompile.planner as planner_module
from cost_models.cluster import load_cluster
from cost_models.memory import device_memory_bytes
from hetcompile.errors import UserError
from hetcompile.ir import Block, ModelCosts, SharedParams
from hetcompile.planner import (
    TIME_UNITS_PER_S,
    PlanDecision,
    StageDecision,
    _heuristic,
    _place_devices,
    _Problem,
    _Stage,
    _StageModel,
    brute_force,
    solve,
    step_time_s,
)

GB = 1e9


def make_costs(
    num_blocks: int = 4,
    *,
    flops: float | list[float] = 1e12,
    param_bytes: int | list[int] = 1_000_000,
    act_bytes: float = 1e6,
    out_bytes: float = 1e6,
    global_batch: int = 16,
) -> ModelCosts:
    def per_block(v, i):
        return v[i] if isinstance(v, list) else v

    blocks = tuple(
        Block(
            index=i,
            name=f"h.{i}",
            fwd_flops_per_sample=per_block(flops, i),
            fwd_bytes_per_sample=1e3,  # compute bound: the roofline's FLOP term decides
            param_bytes=per_block(param_bytes, i),
            num_params=per_block(param_bytes, i) // 4,
            act_bytes_per_sample=act_bytes,
            out_bytes_per_sample=out_bytes,
        )
        for i in range(num_blocks)
    )
    return ModelCosts(blocks, global_batch, "fp32")


def make_cluster(fast: list[int], slow: list[int], *, fast_tflops=30.0, slow_tflops=10.0, mem_GB=80.0,
                 inter_node_GBps=12.5):
    """Nodes of "Fast" devices then nodes of "Slow" devices (counts per node)."""
    devices = {
        "Fast": {"fp32_tflops": fast_tflops, "mem_GB": mem_GB, "mem_GBps": 2000, "intra_node_GBps": 300},
        "Slow": {"fp32_tflops": slow_tflops, "mem_GB": mem_GB, "mem_GBps": 2000, "intra_node_GBps": 150},
    }
    nodes = [{"device": "Fast", "count": n} for n in fast] + [{"device": "Slow", "count": n} for n in slow]
    return load_cluster({"nodes": nodes, "devices": devices, "inter_node_GBps": inter_node_GBps})


def stage_summary(decision: PlanDecision):
    return [(s.first_block, s.last_block, s.devices, s.shares) for s in decision.stages]


def check_decision(decision: PlanDecision, costs: ModelCosts, cluster) -> None:
    """Structural invariants every decision must satisfy."""
    assert decision.stages[0].first_block == 0
    assert decision.stages[-1].last_block == costs.num_blocks - 1
    for a, b in zip(decision.stages, decision.stages[1:]):
        assert b.first_block == a.last_block + 1
    used = [d for s in decision.stages for d in s.devices]
    assert len(used) == len(set(used)) and all(0 <= d < cluster.num_devices for d in used)
    assert decision.microbatch_size * decision.num_microbatches == costs.global_batch
    for s in decision.stages:
        assert len(s.shares) == len(s.devices) and min(s.shares) >= 1
        assert sum(s.shares) == decision.microbatch_size


def test_doctests():
    assert doctest.testmod(planner_module).failed == 0


# ---------------------------------------------------------------- ILP == brute force


def random_instance(seed: int):
    rng = random.Random(seed)
    num_blocks = rng.randint(2, 5)
    fast = [rng.randint(1, 2)]
    slow = [1, 1] if rng.random() < 0.5 else [rng.randint(1, 2)]
    costs = make_costs(
        num_blocks,
        flops=[rng.uniform(0.2, 2.0) * 1e11 for _ in range(num_blocks)],
        param_bytes=[rng.randint(1, 8) * 1_000_000_000 for _ in range(num_blocks)],
        act_bytes=rng.uniform(0.1, 2.0) * 1e9,
        out_bytes=rng.uniform(0.01, 1.0) * 1e8,
        global_batch=rng.choice([4, 8, 12]),
    )
    cluster = make_cluster(fast, slow, fast_tflops=rng.choice([20.0, 30.0, 60.0]), mem_GB=rng.choice([40, 64, 120]),
                           inter_node_GBps=rng.choice([5.0, 25.0]))
    num_microbatches = rng.choice([m for m in (1, 2, 4) if costs.global_batch % m == 0])
    schedule = rng.choice(["gpipe", "1f1b"])
    return costs, cluster, num_microbatches, schedule


def tied(costs: ModelCosts) -> ModelCosts:
    """``costs`` with half of block 0's parameters tied to the last block (an embedding and an output
    head that share their weight, as GPT-2's do)."""
    half = costs.blocks[0].param_bytes // 2
    return dataclasses.replace(costs, shared_params=(SharedParams((0, costs.num_blocks - 1), half, 1),))


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force_with_tied_parameters(seed):
    costs, cluster, num_microbatches, schedule = random_instance(seed)
    costs = tied(costs)
    try:
        _, expected_s = brute_force(costs, cluster, num_microbatches=num_microbatches, schedule=schedule)
    except UserError:
        return
    decision, report = solve(costs, cluster, num_microbatches=num_microbatches, schedule=schedule)
    assert report.status == "OPTIMAL" and report.objective_s == expected_s
    check_decision(decision, costs, cluster)


def test_tied_parameters_are_all_reduced_across_the_first_and_last_stage():
    """NOTE: [tied parameters in the objective]: with one stage they are in its all-reduce; with
    several, out of the first stage's and all-reduced over the first and the last stage's devices
    on the inter-node link, as lowering and the predictor do."""
    plain = make_costs(4, param_bytes=[4_000_000_000, 10**9, 10**9, 10**9])
    cluster = make_cluster([2], [2])
    one, two = _Stage(0, 3, (2, 0), (4, 0), False), [_Stage(0, 1, (2, 0), (4, 0), False),
                                                      _Stage(2, 3, (0, 2), (0, 4), False)]
    untied, with_tied = _Problem(plain, cluster, 2, "1f1b"), _Problem(tied(plain), cluster, 2, "1f1b")
    assert with_tied.objective_units([one]) == untied.objective_units([one])
    assert with_tied.tied_units(two) > 0 and untied.tied_units(two) == 0
    # The first stage's own all-reduce lost the tied 2 GB; the tied all-reduce goes on top.
    assert with_tied.stage_cost(2, 0, two[0])[1] < untied.stage_cost(2, 0, two[0])[1]
    assert with_tied.objective_units(two) > untied.objective_units(two) - untied.stage_cost(2, 0, two[0])[1]


@pytest.mark.parametrize("seed", range(8))
def test_ilp_matches_brute_force(seed):
    costs, cluster, num_microbatches, schedule = random_instance(seed)
    try:
        expected_decision, expected_s = brute_force(costs, cluster, num_microbatches=num_microbatches,
                                                    schedule=schedule)
    except UserError:
        with pytest.raises(UserError, match="fits on no plan"):
            solve(costs, cluster, num_microbatches=num_microbatches, schedule=schedule)
        return
    decision, report = solve(costs, cluster, num_microbatches=num_microbatches, schedule=schedule)
    assert report.status == "OPTIMAL" and report.gap == 0
    assert report.objective_s == expected_s  # exact: both are the same integer costs
    assert report.best_bound_s == expected_s
    check_decision(decision, costs, cluster)
    check_decision(expected_decision, costs, cluster)


def test_random_instances_are_not_all_trivial():
    """The brute-force comparison is only meaningful if some optima pipeline and some mix types."""
    num_stages, mixed = set(), False
    for seed in range(5):
        costs, cluster, m, schedule = random_instance(seed)
        try:
            decision, _ = brute_force(costs, cluster, num_microbatches=m, schedule=schedule)
        except UserError:
            continue
        num_stages.add(len(decision.stages))
        types = {cluster.devices[d].type for s in decision.stages for d in s.devices}
        mixed |= len(types) == 2
    assert len(num_stages) >= 2 and mixed


def test_max_stages_is_respected():
    costs, cluster, m, schedule = random_instance(0)
    decision, _ = solve(costs, cluster, num_microbatches=m, schedule=schedule, max_stages=1)
    _, expected_s = brute_force(costs, cluster, num_microbatches=m, schedule=schedule, max_stages=1)
    assert len(decision.stages) == 1
    assert solve(costs, cluster, num_microbatches=m, schedule=schedule, max_stages=1)[1].objective_s == expected_s


# ---------------------------------------------------------------- known answers


def test_faster_type_gets_proportionally_more_samples():
    """Type Fast is 3x faster than Slow: one data-parallel stage, Fast devices take ~3x the samples."""
    costs = make_costs(4, global_batch=16)
    cluster = make_cluster([2], [2], fast_tflops=30, slow_tflops=10)
    decision, report = solve(costs, cluster, num_microbatches=1)
    assert len(decision.stages) == 1
    stage = decision.stages[0]
    assert stage.devices == (0, 1, 2, 3)
    fast_shares = [sh for d, sh in zip(stage.devices, stage.shares) if cluster.devices[d].type == "Fast"]
    slow_shares = [sh for d, sh in zip(stage.devices, stage.shares) if cluster.devices[d].type == "Slow"]
    ratio = (sum(fast_shares) / len(fast_shares)) / (sum(slow_shares) / len(slow_shares))
    assert ratio == pytest.approx(3.0, rel=0.2)
    assert stage.shares == (6, 6, 2, 2)


def test_identical_devices_ample_memory_is_pure_data_parallel():
    costs = make_costs(6, flops=1e12, param_bytes=1_000, global_batch=16)
    cluster = make_cluster([4], [], mem_GB=80)
    decision, report = solve(costs, cluster, num_microbatches=4)
    assert stage_summary(decision) == [(0, 5, (0, 1, 2, 3), (1, 1, 1, 1))]
    assert report.status == "OPTIMAL"
    # Integer shares are exact and the group sits on one node: the analytic
    # step time is the ILP objective (up to the integer time unit).
    assert step_time_s(decision, costs, cluster, "1f1b") == pytest.approx(report.objective_s, abs=10 / TIME_UNITS_PER_S)


def test_tight_memory_forces_a_pipeline():
    # 4 blocks of 1 GB parameters: 16 GB of weights+grads+Adam in all, 4 GB per block.
    costs = make_costs(4, param_bytes=1_000_000_000, act_bytes=1e6, global_batch=8)
    cluster = make_cluster([2], [], mem_GB=10)
    decision, _ = solve(costs, cluster, num_microbatches=4, schedule="1f1b")
    assert len(decision.stages) >= 2
    check_decision(decision, costs, cluster)
    num_stages = len(decision.stages)
    for s, stage in enumerate(decision.stages):
        params = sum(b.param_bytes for b in costs.blocks[stage.first_block:stage.last_block + 1])
        acts = sum(b.act_bytes_per_sample for b in costs.blocks[stage.first_block:stage.last_block + 1])
        in_flight = min(4, num_stages - s)
        assert device_memory_bytes(params, acts, max(stage.shares) * in_flight) <= 10 * GB


def test_gpipe_needs_more_memory_than_1f1b_and_recompute_rescues_it():
    """GPipe keeps every micro-batch's activations, 1F1B at most S - s of them; recompute keeps
    only each micro-batch's stage input plus one micro-batch's activations."""
    costs = make_costs(2, param_bytes=1_000, act_bytes=1e9, out_bytes=1e6, global_batch=16)
    cluster = make_cluster([2], [], mem_GB=9)
    decision, _ = solve(costs, cluster, num_microbatches=8, schedule="1f1b")  # 2 samples/mb, <= 2 in flight
    check_decision(decision, costs, cluster)
    assert not any(s.recompute for s in decision.stages)  # it fits without: recompute stays off
    with pytest.raises(UserError, match="fits on no plan"):
        solve(costs, cluster, num_microbatches=8, schedule="gpipe", allow_recompute=False)
    decision, _ = solve(costs, cluster, num_microbatches=8, schedule="gpipe")  # 8 in flight: only with recompute
    check_decision(decision, costs, cluster)
    assert any(s.recompute for s in decision.stages)
    problem = _Problem(costs, cluster, 8, "gpipe", allow_recompute=True)
    for s, st in enumerate(decision.stages):
        mem = problem.memory_bytes(len(decision.stages), s, st.first_block, st.last_block, max(st.shares),
                                   st.recompute)
        assert mem <= 9 * GB


def test_nothing_fits_raises_user_error():
    costs = make_costs(2, param_bytes=20_000_000_000)  # 20 GB per block -> 80 GB static per block
    cluster = make_cluster([1], [1], mem_GB=40)
    with pytest.raises(UserError) as e:
        solve(costs, cluster, num_microbatches=4)
    msg = str(e.value)
    assert "40 GB of parameters" in msg and "has 40 GB" in msg
    assert "add devices" in msg and "micro-batches" in msg
    with pytest.raises(UserError, match="fits on no plan"):
        brute_force(costs, cluster, num_microbatches=4, schedule="1f1b")


def test_same_input_same_decision():
    costs, cluster, m, schedule = random_instance(2)
    first = solve(costs, cluster, num_microbatches=m, schedule=schedule)
    second = solve(costs, cluster, num_microbatches=m, schedule=schedule)
    assert first[0] == second[0]
    assert first[1].objective_s == second[1].objective_s


def test_plan_does_not_depend_on_the_wall_clock():
    """The search stops at deterministic budgets (NOTE: [deterministic search]): a machine busy
    with other jobs (simulated by slowing every CP-SAT call) gets the same plan, and the wall
    limit stays a safety net that says when it fired."""
    costs, cluster = transformer_costs(24, 512), three_type_cluster(64)
    quiet = solve(costs, cluster, num_microbatches=None, schedule="auto")
    original = planner_module._StageModel.solve

    def slow(self, *args, **kwargs):
        import time
        time.sleep(0.05)  # what a loaded machine does to every model
        return original(self, *args, **kwargs)

    planner_module._StageModel.solve = slow
    try:
        busy = solve(costs, cluster, num_microbatches=None, schedule="auto")
    finally:
        planner_module._StageModel.solve = original
    assert quiet[0] == busy[0]
    assert dataclasses.replace(quiet[1], wall_s=0) == dataclasses.replace(busy[1], wall_s=0)
    assert not quiet[1].wall_limit_hit
    # A wall limit far below the normal time fires, and the report says so.
    _, cut = solve(costs, cluster, num_microbatches=None, schedule="auto", time_limit_s=1e-6)
    assert cut.wall_limit_hit and cut.status == "FEASIBLE"


def test_input_errors():
    costs = make_costs(2, global_batch=10)
    cluster = make_cluster([1], [1])
    with pytest.raises(UserError, match="not divisible by num_microbatches=4"):
        solve(costs, cluster, num_microbatches=4)
    with pytest.raises(UserError, match="Unknown schedule 'zb'"):
        solve(costs, cluster, num_microbatches=2, schedule="zb")
    with pytest.raises(UserError, match="max_stages"):
        solve(costs, cluster, num_microbatches=2, max_stages=0)


def test_groups_never_exceed_the_microbatch():
    """4 devices but micro-batches of 2 samples: no stage may use more than 2 devices."""
    costs = make_costs(2, param_bytes=1_000, global_batch=4)
    cluster = make_cluster([4], [])
    decision, _ = solve(costs, cluster, num_microbatches=2)
    check_decision(decision, costs, cluster)
    assert all(len(s.devices) <= 2 for s in decision.stages)


# ---------------------------------------------------------------- lowering the counts


def test_placement_keeps_a_group_on_one_node():
    # Fast nodes of 1 and 2 devices: a stage wanting 2 Fast devices gets the node of 2.
    costs = make_costs(2)
    cluster = make_cluster([1, 2], [2])
    problem = _Problem(costs, cluster, 1, "1f1b")
    fast, slow = problem.type_index["Fast"], problem.type_index["Slow"]

    def stage(block, n_fast, n_slow):
        counts = [0, 0]
        counts[fast], counts[slow] = n_fast, n_slow
        return _Stage(block, block, tuple(counts), tuple(1 if c else 0 for c in counts))

    assert _place_devices(problem, [stage(0, 2, 1), stage(1, 1, 1)]) == [(1, 2, 3), (0, 4)]


def test_step_time_uses_integer_shares():
    costs = make_costs(1, global_batch=3)
    cluster = make_cluster([1], [1], fast_tflops=30, slow_tflops=10)
    t_fast = 3 * 1e12 / (30e12 * 0.5)  # fwd + 2x bwd per sample
    uneven = PlanDecision((StageDecision(0, 0, (0, 1), (2, 1)),), num_microbatches=1, microbatch_size=3)
    # A stage waits for its slowest device: max(2 * t_fast, 1 * 3 * t_fast) plus the gradient all-reduce.
    ar_s = 2 * 1 / 2 * 1_000_000 / 12.5e9 + 2 * 2e-5
    assert step_time_s(uneven, costs, cluster, "1f1b") == pytest.approx(3 * t_fast + ar_s)


def test_eight_mixed_devices_tight_memory():
    """A mid-size instance (8 devices of 2 types, 8 blocks) solves to optimality quickly, and
    the analytic step time of the concrete plan stays close to the ILP's continuous objective."""
    rng = random.Random(8)
    costs = make_costs(8, flops=[rng.uniform(0.2, 2) * 1e11 for _ in range(8)],
                       param_bytes=[rng.randint(1, 4) * 500_000_000 for _ in range(8)],
                       act_bytes=2e8, out_bytes=5e7, global_batch=32)
    cluster = make_cluster([4], [4], mem_GB=20)
    decision, report = solve(costs, cluster, num_microbatches=4)
    assert report.status == "OPTIMAL" and report.gap == 0 and report.wall_s < 10
    assert len(decision.stages) >= 2
    check_decision(decision, costs, cluster)
    assert step_time_s(decision, costs, cluster, "1f1b") == pytest.approx(report.objective_s, rel=0.25)


# ---------------------------------------------------------------- recompute, greedy floor, links


@pytest.mark.parametrize("seed", [1, 4])
def test_ilp_matches_brute_force_with_recompute(seed):
    costs, cluster, num_microbatches, schedule = random_instance(seed)
    _, expected_s = brute_force(costs, cluster, num_microbatches=num_microbatches, schedule=schedule,
                                allow_recompute=True)
    _, report = solve(costs, cluster, num_microbatches=num_microbatches, schedule=schedule, allow_recompute=True)
    assert report.status == "OPTIMAL" and report.objective_s == expected_s


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_greedy(seed):
    """The constructive plans are hints and the floor: the solve never returns anything slower."""
    costs, cluster, m, schedule = random_instance(seed)
    problem = _Problem(costs, cluster, m, schedule)
    greedy = [c.objective_units for s in range(1, problem.max_stages(None) + 1)
              if (c := _heuristic(problem, s, recompute=False)) is not None]
    if not greedy:
        return
    _, report = solve(costs, cluster, num_microbatches=m, schedule=schedule)
    assert report.objective_s * TIME_UNITS_PER_S <= min(greedy)


def test_slow_inter_node_link_gets_a_pipeline_cut_not_an_allreduce():
    """Two nodes of 4 identical devices, 16 GB of parameters: over a 1 GB/s network an all-reduce
    across the nodes costs ~30 s, so each node takes half the layers (NVLink all-reduce inside)."""
    costs = make_costs(4, param_bytes=4_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=16)
    cluster = make_cluster([4, 4], [], mem_GB=80, inter_node_GBps=1.0)
    decision, _ = solve(costs, cluster, num_microbatches=2)
    assert len(decision.stages) == 2
    nodes = [{cluster.devices[d].node for d in st.devices} for st in decision.stages]
    assert nodes == [{0}, {1}] or nodes == [{1}, {0}]
    # With a fast network the same model is plain data parallelism over all 8 devices.
    fast = make_cluster([4, 4], [], mem_GB=80, inter_node_GBps=1000.0)
    decision, _ = solve(costs, fast, num_microbatches=2)
    assert len(decision.stages) == 1 and len(decision.stages[0].devices) == 8


def test_microbatches_and_schedule_chosen_jointly():
    costs, cluster, _, _ = random_instance(4)
    decision, report = solve(costs, cluster, num_microbatches=None, schedule="auto")
    check_decision(decision, costs, cluster)
    assert decision.schedule in ("gpipe", "1f1b")
    for m in (1, 2, 4):
        for schedule in ("gpipe", "1f1b"):
            try:
                _, fixed = solve(costs, cluster, num_microbatches=m, schedule=schedule)
            except UserError:
                continue
            assert report.objective_s <= fixed.objective_s


def test_on_progress_reports_incumbent_and_bound():
    seen = []
    costs, cluster, m, schedule = random_instance(7)
    solve(costs, cluster, num_microbatches=m, schedule=schedule, on_progress=lambda obj, bound: seen.append((obj, bound)))
    assert seen and all(isinstance(o, float) and bound <= o + 1e-9 for o, bound in seen)


def test_same_input_byte_identical_plan_json(examples, tmp_path):
    import hetcompile

    texts = []
    for i in range(2):
        plan = hetcompile.compile(examples / "mlp.py", examples / "h100_a100_t4.json", schedule="auto")
        out = plan.save(tmp_path / f"plan{i}")
        texts.append((out / "plan.json").read_bytes())
    assert texts[0] == texts[1]
    assert b"upper_bound_samples_per_s" in texts[0] and b"efficiency" in texts[0]


# ---------------------------------------------------------------- scale


def transformer_costs(num_layers: int, global_batch: int) -> ModelCosts:
    """GPT-3 175B-like blocks (hidden 12288, 2048 tokens): pre, num_layers identical layers, post."""
    h, s = 12288, 2048
    layer = dict(fwd_flops_per_sample=24 * h * h * s + 4 * s * s * h, fwd_bytes_per_sample=24 * h * h,
                 param_bytes=24 * h * h, num_params=12 * h * h, act_bytes_per_sample=34 * s * h + 5 * 96 * s * s,
                 out_bytes_per_sample=2 * s * h)
    blocks = [Block(0, "pre", 1e6, 1e8, 2 * 50257 * h, 50257 * h, 2 * s * h, 2 * s * h)]
    blocks += [Block(i + 1, f"h.{i}", **layer) for i in range(num_layers)]
    blocks.append(Block(num_layers + 1, "post", 2 * 50257 * h * s, 2 * 50257 * h, 0, 0, 4 * s * 50257, 4.0))
    return ModelCosts(tuple(blocks), global_batch, "bf16")


def three_type_cluster(num_gpus: int):
    q = num_gpus // 4
    mix = [("H100-80GB", q), ("A100-80GB", 2 * q), ("V100-32GB", q)]
    return load_cluster({"nodes": [{"device": n, "count": 8} for n, c in mix for _ in range(c // 8)]})


def test_model_size_grows_with_neither_depth_nor_devices():
    sizes = set()
    for layers, gpus in ((48, 64), (96, 64), (48, 1024), (96, 1024)):
        problem = _Problem(transformer_costs(layers, 1536), three_type_cluster(gpus), 48, "1f1b")
        sizes.add(_StageModel(problem, 16).num_variables)
    assert len(sizes) == 1


def test_thousand_gpus_ninety_six_layers_plans_in_seconds():
    costs, cluster = transformer_costs(96, 1536), three_type_cluster(1024)
    decision, report = solve(costs, cluster, num_microbatches=48)
    check_decision(decision, costs, cluster)
    assert report.wall_s < 60 and report.status in ("OPTIMAL", "FEASIBLE") and 0 <= report.gap <= 1
    assert sum(len(s.devices) for s in decision.stages) >= 0.5 * cluster.num_devices


# ---------------------------------------------------------------- tensor parallelism


def with_tp(costs: ModelCosts, *, units: int = 8, flops_fraction: float = 0.95, param_fraction: float = 0.99):
    """Transformer-like TP fields: ~all FLOPs and params in sharded matmuls, two all-reduces of the
    block's output (the hidden activation) per forward, ``units`` heads."""
    blocks = tuple(dataclasses.replace(b, tp_flops_fraction=flops_fraction, tp_param_fraction=param_fraction,
                                       tp_comm_bytes_per_sample=2 * b.out_bytes_per_sample, tp_units=units)
                   for b in costs.blocks)
    return dataclasses.replace(costs, blocks=blocks)


def check_tp_decision(decision: PlanDecision, costs: ModelCosts, cluster) -> None:
    """Groups are whole, equal-share, and every member fits its device (the one predictor's memory)."""
    from hetcompile.predict import predict

    check_decision_groups(decision, costs)
    predicted, _ = predict(decision, costs, cluster, decision.schedule)
    for m in predicted["memory"]:
        assert m["mem_bytes"] <= m["capacity_bytes"], m


def check_decision_groups(decision: PlanDecision, costs: ModelCosts) -> None:
    assert decision.stages[0].first_block == 0 and decision.stages[-1].last_block == costs.num_blocks - 1
    for st in decision.stages:
        assert len(st.devices) % st.tp == 0
        groups = [st.shares[i:i + st.tp] for i in range(0, len(st.devices), st.tp)]
        assert all(len(set(g)) == 1 for g in groups)
        assert sum(g[0] for g in groups) == decision.microbatch_size
        assert st.tp_parts == () or len(st.tp_parts) == st.tp


def test_block_too_large_for_one_device_uses_tp():
    """Each block holds 3 GB of parameters: 12 GB with grads and Adam, more than a 10 GB device.
    No pipeline helps (a block is never split across stages); TP 2 halves what a device holds."""
    costs = with_tp(make_costs(4, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8))
    cluster = make_cluster([8], [], mem_GB=10)
    decision, _ = solve(costs, cluster, num_microbatches=4)
    assert all(st.tp >= 2 for st in decision.stages)
    check_tp_decision(decision, costs, cluster)
    # Every group sits inside the one node.
    assert {cluster.devices[d].node for st in decision.stages for d in st.devices} == {0}
    # Without TP fields (tp_units = 1) nothing fits.
    with pytest.raises(UserError, match="fits on no plan"):
        solve(make_costs(4, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8), cluster,
              num_microbatches=4)


def test_small_model_ample_memory_identical_devices_uses_no_tp():
    costs = with_tp(make_costs(6, flops=1e12, param_bytes=1_000, global_batch=16))
    cluster = make_cluster([4], [], mem_GB=80)
    decision, report = solve(costs, cluster, num_microbatches=4)
    assert stage_summary(decision) == [(0, 5, (0, 1, 2, 3), (1, 1, 1, 1))]
    assert all(st.tp == 1 and st.tp_parts == () for st in decision.stages)
    assert report.status == "OPTIMAL"


def test_pinned_tp_two_gives_tp_two_in_every_stage():
    costs = with_tp(make_costs(6, flops=1e12, param_bytes=1_000, global_batch=16))
    cluster = make_cluster([4], [2], mem_GB=80)
    decision, _ = solve(costs, cluster, num_microbatches=4, tp=2)
    assert decision.stages and all(st.tp == 2 for st in decision.stages)
    check_tp_decision(decision, costs, cluster)
    # Pinned pp and dp too: exactly that shape.
    decision, _ = solve(costs, cluster, num_microbatches=4, tp=2, pp=2, dp=1)
    assert len(decision.stages) == 2 and all(st.tp == 2 and len(st.devices) == 2 for st in decision.stages)


def test_mixed_tp_group_gets_parts_in_the_speed_ratio():
    """One 3x faster device with 20 GB and one slow 10 GB device, each on its own node; a block
    holds 12 GB with grads and Adam: neither device holds the slow device's block alone, so the
    only plan is one TP group across the two nodes, sharded 3:1 like their speeds."""
    costs = with_tp(make_costs(2, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8))
    cluster = load_cluster({"nodes": [{"device": "Fast", "count": 1}, {"device": "Slow", "count": 1}],
                            "devices": {"Fast": {"fp32_tflops": 30, "mem_GB": 20, "mem_GBps": 2000},
                                        "Slow": {"fp32_tflops": 10, "mem_GB": 10, "mem_GBps": 2000}},
                            "inter_node_GBps": 12.5})
    decision, _ = solve(costs, cluster, num_microbatches=2)
    (stage,) = decision.stages
    assert (stage.tp, stage.tp_parts, stage.devices) == (2, (3, 1), (0, 1))
    check_tp_decision(decision, costs, cluster)


def test_tp_stage_time_and_memory_match_the_predictor():
    """The planner's integer objective and the one predictor price a TP stage alike."""
    from hetcompile.predict import stage_times

    costs = with_tp(make_costs(4, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8))
    cluster = make_cluster([8], [], mem_GB=10)
    decision, report = solve(costs, cluster, num_microbatches=4, pp=1)
    (stage,) = decision.stages
    times = stage_times(decision, costs, cluster)
    problem = _Problem(costs, cluster, 4, "1f1b", tp=stage.tp)
    v = problem.kind_of_group([cluster.devices[d].type for d in stage.devices[:stage.tp]], stage.tp_parts)
    units = stage.shares[0] * problem.kind_units(v, 0, 3) + problem.kind_fixed(v, 0, 3)
    assert times["fwd_s"][0] + times["bwd_s"][0] == pytest.approx(units / TIME_UNITS_PER_S, rel=1e-6)
    assert step_time_s(decision, costs, cluster, "1f1b") == pytest.approx(report.objective_s, rel=1e-6)


def test_tp_ilp_matches_brute_force():
    costs = with_tp(make_costs(3, flops=[1e11, 2e11, 1e11], param_bytes=[2_000_000_000, 3_000_000_000, 1_000_000_000],
                               act_bytes=1e8, out_bytes=1e7, global_batch=4), units=2)
    cluster = make_cluster([2], [2], mem_GB=20)
    _, expected_s = brute_force(costs, cluster, num_microbatches=2, schedule="1f1b")
    decision, report = solve(costs, cluster, num_microbatches=2, schedule="1f1b")
    assert report.objective_s == expected_s
    check_tp_decision(decision, costs, cluster)


def test_tp_never_on_blocks_that_do_not_split():
    """An embedding-like first block with tp_units = 1 never sits in a TP stage."""
    costs = with_tp(make_costs(4, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8))
    costs = dataclasses.replace(costs, blocks=(dataclasses.replace(costs.blocks[0], tp_units=1, param_bytes=1_000),)
                                + costs.blocks[1:])
    cluster = make_cluster([8], [], mem_GB=10)
    decision, _ = solve(costs, cluster, num_microbatches=4)
    assert decision.stages[0].tp == 1 and decision.stages[0].last_block == 0
    assert all(st.tp >= 2 for st in decision.stages[1:])
    check_tp_decision(decision, costs, cluster)


def test_pinned_shapes_that_cannot_fit_raise_user_errors():
    costs = with_tp(make_costs(4, param_bytes=3_000_000_000, act_bytes=1e6, out_bytes=1e6, global_batch=8), units=4)
    cluster = make_cluster([8], [], mem_GB=10)
    with pytest.raises(UserError, match=r"pinned shape \(tp=1, pp=any, dp=any\) fits no plan.*raise --tp or --pp"):
        solve(costs, cluster, num_microbatches=4, tp=1)
    with pytest.raises(UserError, match="needs at least 16 devices"):
        solve(costs, cluster, num_microbatches=4, tp=2, pp=4, dp=2)
    with pytest.raises(UserError, match=r"--tp 8 splits every stage 8 ways.*Pin --tp 4 or less"):
        solve(costs, cluster, num_microbatches=4, tp=8)
    with pytest.raises(UserError, match="--pp 5 asks for 5 pipeline stages, but the model has 4 blocks"):
        solve(costs, cluster, num_microbatches=4, pp=5)
    with pytest.raises(UserError, match="--dp 4 asks for 4 data-parallel replicas"):
        solve(costs, cluster, num_microbatches=4, dp=4)


def test_bound_searches_beside_give_the_answer_of_one_after_the_other():
    """HetHub's per-type searches run in forked processes (NOTE: [searches side by side]): the same
    numbers as searching the types one after the other in this process."""
    from hetcompile.baselines import _alone_samples_per_s, per_type_beside

    costs = make_costs(4, global_batch=8)
    cluster = make_cluster([2], [2])
    with per_type_beside(costs, cluster, schedule="auto") as result:
        beside = result()
    serial = {t.name: _alone_samples_per_s(costs, cluster, t.name, None, "auto", 0) for t in cluster.device_types}
    assert beside == serial and all(v > 0 for v in beside.values())


def test_bound_searches_stopped_at_once_print_nothing():
    """Leaving the block right away (the compiler failing on bad input) terminates workers that
    may not have run their initializer yet: they must die quietly, not raise through the CLI's
    SIGTERM handler they were forked with (a traceback on the user's terminal)."""
    script = textwrap.dedent("""
        import signal
        from test_planner import make_cluster, make_costs
        from hetcompile.baselines import per_type_beside
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, interrupt)  # as hetcompile.cli does
        costs, cluster = make_costs(4, global_batch=8), make_cluster([2], [2])
        for _ in range(150):
            with per_type_beside(costs, cluster, schedule="auto"):
                pass
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_planner_process_answers_as_the_calls_do_and_stops_quietly():
    """The planner process (NOTE: [planner process]) gives what the calls give in one process,
    raises the planner's UserError as such, and, left at once under the CLI's SIGTERM handler
    (the compiler failing, or Ctrl-C, while it still imports), ends without a word, leaving no process."""
    script = textwrap.dedent("""
        import dataclasses, multiprocessing, signal
        import pytest
        from test_planner import make_cluster, make_costs
        from hetcompile.baselines import per_type_samples_per_s
        from hetcompile.errors import UserError
        from hetcompile.planner import solve
        from hetcompile.planner_process import PlannerProcess
        def interrupt(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, interrupt)  # as hetcompile.cli does
        costs, cluster = make_costs(4, global_batch=8), make_cluster([2], [2])
        with PlannerProcess() as p:
            p.start_bound(costs, cluster, schedule="auto", seed=0)
            seen = []
            (decision, report), (expected, expected_report) = (
                p.solve(costs, cluster, schedule="auto", on_progress=lambda *a: seen.append(a)),
                solve(costs, cluster, schedule="auto"))
            assert decision == expected and seen
            assert dataclasses.replace(report, wall_s=0) == dataclasses.replace(expected_report, wall_s=0)
            assert p.bound() == per_type_samples_per_s(costs, cluster, schedule="auto")
            with pytest.raises(UserError, match="pp"):
                p.solve(costs, cluster, pp=99)
        for i in range(30):
            try:
                with PlannerProcess() as p:
                    if i % 2:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                pass
        assert not multiprocessing.active_children()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_planner_process_stuck_anywhere_is_stopped_with_its_searches():
    """Left after an error while the planner process is stuck in a request that ignores SIGTERM,
    and its bound's searches never end, the compiler is not kept waiting and leaves no process
    (NOTE: [planner process]: SIGKILL to the process group)."""
    script = textwrap.dedent("""
        import os, signal, time
        from test_planner import make_cluster, make_costs
        from hetcompile import baselines, planner_process
        def stuck(*args):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)
        baselines._alone_samples_per_s = stuck  # the bound's searches, forked from the process
        planner_process._Planner.draw = stuck   # a request of the process itself
        costs, cluster = make_costs(4, global_batch=8), make_cluster([2], [2])
        start = time.perf_counter()
        try:
            with planner_process.PlannerProcess() as p:
                p.start_bound(costs, cluster, schedule="auto", seed=0)
                p._send("draw", None)
                time.sleep(0.5)  # both are stuck now
                group = p._process.pid
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        assert time.perf_counter() - start < 30
        time.sleep(0.5)
        def group_of(stat):  # /proc/PID/stat: pid (comm) state ppid pgrp ...
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            return int(pgrp), state
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                pgrp, state = group_of(open(f"/proc/{pid}/stat").read())
            except OSError:
                continue
            if pgrp == group and state != "Z":  # killed ones wait for init to reap them
                alive.append(pid)
        assert not alive, f"processes of the planner's group still running: {alive}"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
