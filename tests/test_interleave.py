"""Interleaved 1F1B in the planner (hetcompile/interleave.py): known answers on synthetic models.

Numerical equivalence of interleaved plans on gloo ranks: tests/test_end_to_end.py.
"""

from __future__ import annotations

import doctest

import pytest

import hetcompile.interleave as interleave_module
from hetcompile.errors import UserError
from hetcompile.interleave import best_interleaving, interleaved
from hetcompile.planner import PlanDecision, StageDecision, solve
from hetcompile.predict import predict
from test_planner import make_cluster, make_costs


def _two_groups(num_blocks: int, microbatches: int, cut: int) -> PlanDecision:
    return PlanDecision((StageDecision(0, cut - 1, (0,), (1,)), StageDecision(cut, num_blocks - 1, (1,), (1,))),
                        num_microbatches=microbatches, microbatch_size=1)


def test_each_group_keeps_its_devices_and_its_number_of_layers():
    plan = _two_groups(9, 2, cut=6)  # a 2:1 split, as for a device twice as fast
    for chunks in (2, 3):
        inter = interleaved(plan, chunks)
        assert inter.schedule == "interleaved" and inter.chunks == chunks
        assert [st.devices for st in inter.stages] == [(0,), (1,)] * chunks  # round the groups
        assert inter.stages[0].first_block == 0 and inter.stages[-1].last_block == 8
        for a, b in zip(inter.stages, inter.stages[1:]):
            assert b.first_block == a.last_block + 1  # contiguous, in model order
        layers = {}
        for st in inter.stages:
            layers[st.devices] = layers.get(st.devices, 0) + st.last_block - st.first_block + 1
        assert layers == {(0,): 6, (1,): 3}
    assert interleaved(plan, 4) is None  # group 1 has 3 layers: no 4 chunks
    assert interleaved(_two_groups(9, 3, cut=6), 2) is None  # 3 micro-batches on 2 groups


def test_interleaving_wins_where_the_bubble_dominates():
    """Two devices, few micro-batches, fast links: chunks cut the fill and drain, and the planner takes them."""
    costs = make_costs(8, global_batch=2, out_bytes=1e3)
    cluster = make_cluster([2], [], mem_GB=80.0)
    plan = _two_groups(8, 2, cut=4)
    best = best_interleaving(plan, costs, cluster)
    assert best.schedule == "interleaved" and best.chunks >= 2
    plain_s = predict(plan, costs, cluster, "1f1b")[0]["step_time_s"]
    assert predict(best, costs, cluster, "interleaved")[0]["step_time_s"] < 0.9 * plain_s


def test_interleaving_loses_on_a_slow_link_with_large_activations():
    """Every chunk boundary crosses the slow link: with large activations the plain plan stays."""
    costs = make_costs(8, global_batch=2, out_bytes=5e9)
    cluster = make_cluster([1], [1], fast_tflops=10.0, inter_node_GBps=1.0)
    plan = _two_groups(8, 2, cut=4)
    assert best_interleaving(plan, costs, cluster) is plan


def test_asking_for_interleaving_where_it_cannot_apply_says_why():
    costs = make_costs(4, global_batch=2)
    one_stage = PlanDecision((StageDecision(0, 3, (0,), (1,)),), num_microbatches=2, microbatch_size=1)
    with pytest.raises(UserError, match="interleaved schedule does not apply.*--schedule 1f1b"):
        best_interleaving(one_stage, costs, make_cluster([1], []), required=True)


def test_close_plans_are_interleaved_too():
    """The search's plan cannot be interleaved (one micro-batch on two groups); a runner-up with two
    micro-batches can. Asked for interleaving, the runner-up's interleaving is the plan; otherwise
    it must be faster than the search's plan, which it is not here."""
    costs = make_costs(8, global_batch=2, out_bytes=1e3)
    cluster = make_cluster([2], [], mem_GB=80.0)
    best = PlanDecision(_two_groups(8, 1, cut=4).stages, num_microbatches=1, microbatch_size=2)
    runner_up = _two_groups(8, 2, cut=4)
    assert interleaved(best, 2) is None
    chosen = best_interleaving(best, costs, cluster, required=True, runners_up=[runner_up])
    assert chosen.schedule == "interleaved" and chosen.num_microbatches == 2
    chosen_s = predict(chosen, costs, cluster, "interleaved")[0]["step_time_s"]
    assert chosen_s > predict(best, costs, cluster, "1f1b")[0]["step_time_s"]
    assert best_interleaving(best, costs, cluster, runners_up=[runner_up]) is best


def test_solve_with_the_interleaved_schedule():
    costs = make_costs(8, global_batch=4, out_bytes=1e3)
    decision, report = solve(costs, make_cluster([2], []), schedule="interleaved", pp=2, num_microbatches=2)
    assert decision.schedule == "interleaved" and decision.chunks >= 2
    assert report.status in ("OPTIMAL", "FEASIBLE")


def test_docstring_examples_run():
    result = doctest.testmod(interleave_module)
    assert result.attempted > 0 and result.failed == 0
