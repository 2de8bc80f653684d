"""Measured profiles: file format, cluster specs that name them, and their effect on plans and predictions."""

from __future__ import annotations

import dataclasses
import doctest
import json
import subprocess
import sys

import pytest
import torch

import cost_models.profile
import hetcompile
from cost_models.cluster import Cluster, load_cluster
from cost_models.comm import allreduce_time_s
from cost_models.profile import BlockTime, CommProfile, DeviceProfile, load_profile, save_profile
from cost_models.roofline import block_overhead_s, block_time_s, optimizer_time_s
from hetcompile.errors import UserError
from hetcompile.ir import Block, ModelCosts
from hetcompile.planner import PlanDecision, StageDecision, solve
from hetcompile.predict import predict, stage_times

GFLOPS = 1e9


def _profile(flops_per_s: float = 20 * GFLOPS, bw: float = 10e9, op_s: float = 5e-6, comm=True) -> DeviceProfile:
    return DeviceProfile(
        device="cpu", device_name="synthetic", num_threads=1,
        matmul_flops_per_s=(("fp32", flops_per_s),), mem_bw_bytes_per_s=bw,
        op_fwd_overhead_s=op_s, op_bwd_overhead_s=2 * op_s, optimizer_per_tensor_s=40e-6,
        comm=CommProfile(num_ranks=2, backend="gloo", p2p_latency_s=50e-6, p2p_bw_bytes_per_s=2e9,
                         allreduce_latency_s=40e-6, allreduce_bw_bytes_per_s=1e9) if comm else None)


def _costs(num_blocks: int = 8, batch: int = 16) -> ModelCosts:
    blocks = tuple(Block(i, f"h.{i}", 2e7, 1e5, 4096, 1024, 1e4, 1e3, num_ops=20, num_grad_ops=15,
                         num_param_tensors=2) for i in range(num_blocks))
    return ModelCosts(blocks=blocks, global_batch=batch, dtype="fp32")


def test_doctests():
    assert doctest.testmod(cost_models.profile).failed == 0


def test_profile_file_round_trips(tmp_path):
    p = _profile()
    save_profile(p, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == p
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["version"] == 1 and data["comm"]["backend"] == "gloo"


def test_bad_profile_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*hetcompile profile"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(UserError, match="not a hetcompile profile of version 1"):
        load_profile(tmp_path / "old.json")
    bad = _profile().to_json()
    del bad["mem_bw_bytes_per_s"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="malformed.*mem_bw_bytes_per_s"):
        load_profile(tmp_path / "bad.json")
    spec = {"nodes": [{"device": "CPU", "count": 1}], "devices": {"CPU": {"profile": 3}}}
    with pytest.raises(UserError, match="devices.CPU.profile .* must be the path"):
        load_cluster(spec)


def test_cluster_spec_names_a_profile_relative_to_the_spec(tmp_path):
    save_profile(_profile(flops_per_s=40 * GFLOPS, bw=20e9), tmp_path / "cpu.json")
    (tmp_path / "spec.json").write_text(json.dumps(
        {"nodes": [{"device": "CPU", "count": 2}], "devices": {"CPU": {"profile": "cpu.json"}}}))
    c = load_cluster(tmp_path / "spec.json")
    cpu = c.type_of("CPU")
    assert cpu.profile is not None and cpu.fp32_tflops == pytest.approx(0.04)
    assert cpu.mem_GBps == pytest.approx(20) and cpu.intra_node_GBps == pytest.approx(2)
    assert cpu.mem_GB == 64  # not measured: the catalog's
    assert c.link_latency_s(0, 1) == pytest.approx(50e-6)  # the measured p2p latency
    assert "measured" in cpu.source
    # The plan embeds the profile, so it does not depend on the file.
    assert Cluster.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_spec_numbers_win_over_the_profile():
    spec = {"nodes": [{"device": "CPU", "count": 2, "intra_node_GBps": 7}],
            "latency_us": {"intra_node": 3},
            "devices": {"CPU": {"profile": _profile().to_json(), "mem_GBps": 99}}}
    c = load_cluster(spec)
    assert c.type_of("CPU").mem_GBps == 99
    assert c.link_bw_bytes_per_s(0, 1) == 7e9
    assert c.link_latency_s(0, 1) == pytest.approx(3e-6)


def test_profiled_cost_model_adds_per_op_and_optimizer_terms():
    cpu = load_cluster({"nodes": [{"device": "CPU", "count": 2}],
                        "devices": {"CPU": {"profile": _profile().to_json()}}})
    t = cpu.type_of("CPU")
    block = _costs().blocks[0]
    fwd_s, bwd_s = block_time_s(block, t, "fp32")
    assert fwd_s == pytest.approx(2e7 / 20e9 + 1e5 / 10e9) and bwd_s == pytest.approx(2 * fwd_s)
    assert block_overhead_s(block, t) == pytest.approx((20 * 5e-6, 15 * 10e-6))
    assert optimizer_time_s(2, 4096, t) == pytest.approx(2 * 40e-6 + 7 * 4096 / 10e9)  # as AdamW
    # All-reduce on one profiled node uses the measured collective numbers.
    assert allreduce_time_s(1e6, cpu, [0, 1]) == pytest.approx(2 * 40e-6 + 1e6 / 1e9)
    # A gradient all-reduce too, where the profile has no numbers of its own for one ...
    assert allreduce_time_s(1e6, cpu, [0, 1], gradients=True) == pytest.approx(2 * 40e-6 + 1e6 / 1e9)
    # ... and its own where it has (NOTE: [all-reduces after a backward]).
    grads = dataclasses.replace(_profile().comm, grad_allreduce_latency_s=100e-6, grad_allreduce_bw_bytes_per_s=0.5e9)
    after = load_cluster({"nodes": [{"device": "CPU", "count": 2}],
                          "devices": {"CPU": {"profile": dataclasses.replace(_profile(), comm=grads).to_json()}}})
    assert allreduce_time_s(1e6, after, [0, 1], gradients=True) == pytest.approx(2 * 100e-6 + 1e6 / 0.5e9)
    assert allreduce_time_s(1e6, after, [0, 1]) == pytest.approx(2 * 40e-6 + 1e6 / 1e9)

    # The predictor: a micro-batch's forward is share x per-sample time + the per-op time, whatever the share.
    costs = _costs(num_blocks=2, batch=8)
    decision = PlanDecision(stages=(StageDecision(0, 0, (0,), (4,)), StageDecision(1, 1, (1,), (4,))),
                            num_microbatches=2, microbatch_size=4)
    predicted, timeline = predict(decision, costs, cpu, "gpipe")
    assert predicted["stages"][0]["fwd_s"] == pytest.approx(4 * fwd_s + 20 * 5e-6)
    assert predicted["stages"][1]["update_s"] > 0
    assert any(span.kind == "update" for span in timeline.spans)


def test_the_model_files_own_optimizer_is_measured_and_priced(examples, tmp_path):
    from hetcompile.block_profile import measure_model_optimizer, optimizer_signature
    from hetcompile.modelfile import load_model_file

    mlp = load_model_file(examples / "mlp.py")  # SGD with momentum
    sgd = optimizer_signature(mlp)
    assert sgd.startswith("SGD(") and "momentum=x" in sgd and "lr=x" in sgd
    assert optimizer_signature(load_model_file(examples / "gpt2.py")).startswith("AdamW(")
    plain = dataclasses.replace(mlp, get_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    assert "momentum=0" in optimizer_signature(plain)  # another step: no momentum buffer
    assert optimizer_signature(dataclasses.replace(mlp, get_optimizer=lambda ps: 1 / 0)) == ""

    measured = measure_model_optimizer(mlp, min_run_time_s=0.01)
    assert measured.signature == sgd and measured.name == "mlp.py: SGD"
    assert measured.per_tensor_s > 0 and measured.per_byte_s >= 0 and measured.fixed_s >= 0
    profile = dataclasses.replace(_profile(), optimizer_times=(measured,))
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    t = load_cluster({"nodes": [{"device": "CPU", "count": 1}],
                      "devices": {"CPU": {"profile": profile.to_json()}}}).type_of("CPU")
    parts = 2 * measured.per_tensor_s + 4096 * measured.per_byte_s
    assert optimizer_time_s(2, 4096, t, sgd) == pytest.approx(measured.fixed_s + parts)
    assert optimizer_time_s(2, 4096, t, sgd, whole_step=False) == pytest.approx(parts)  # a rank's other stage
    assert optimizer_time_s(2, 4096, t, "AdamW(...)") == pytest.approx(2 * 40e-6 + 7 * 4096 / 10e9)
    assert hetcompile.compiler.analyze(mlp)[1].optimizer == sgd  # what the predictor looks up


def _two_type_cluster(tmp_path, fast_factor: float):
    save_profile(_profile(flops_per_s=fast_factor * 20 * GFLOPS, bw=fast_factor * 10e9), tmp_path / "a.json")
    save_profile(_profile(), tmp_path / "b.json")
    (tmp_path / "spec.json").write_text(json.dumps({
        "nodes": [{"device": "CpuA", "count": 1}, {"device": "CpuB", "count": 1}],
        "devices": {"CpuA": {"profile": "a.json", "mem_GB": 64}, "CpuB": {"profile": "b.json", "mem_GB": 64}}}))
    return load_cluster(tmp_path / "spec.json")


def _work(decision: PlanDecision, cluster, costs: ModelCosts) -> dict[str, float]:
    """Per device type: blocks x samples it computes per micro-batch."""
    work: dict[str, float] = {}
    for st in decision.stages:
        for d, share in zip(st.devices, st.shares):
            name = cluster.devices[d].type
            work[name] = work.get(name, 0) + share * (st.last_block - st.first_block + 1)
    return work


def test_summary_notes_a_cpu_node_with_more_devices_than_cores(tmp_path):
    from hetcompile.report import _shared_cores

    save_profile(dataclasses.replace(_profile(), num_cores=2), tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").num_cores == 2
    spec = {"nodes": [{"device": "CPU", "count": 3}, {"device": "CPU", "count": 2}],
            "devices": {"CPU": {"profile": str(tmp_path / "p.json")}}}
    notes = " ".join(_shared_cores(load_cluster(spec).to_json()))
    assert "node 0 declares 3 CPU devices" in notes and "at most 2 per node" in notes and "node 1" not in notes


@pytest.mark.parametrize("cores, slowdown", [(2, 1.5), (3, 1.0)])
def test_ranks_that_share_cores_compute_more_slowly(cores, slowdown):
    # One stage, three equal replicas always computing together: on two cores each runs at 2/3 speed
    # (NOTE: [shared cores]); with a core each, at full speed.
    profile = dataclasses.replace(_profile(), num_cores=cores)
    cpu = load_cluster({"nodes": [{"device": "CPU", "count": 3}], "devices": {"CPU": {"profile": profile.to_json()}}})
    alone = load_cluster({"nodes": [{"device": "CPU", "count": 3}], "devices": {"CPU": {"profile": _profile().to_json()}}})
    costs = _costs(num_blocks=2, batch=6)
    decision = PlanDecision(stages=(StageDecision(0, 1, (0, 1, 2), (1, 1, 1)),), num_microbatches=2,
                            microbatch_size=3)
    shared, _ = predict(decision, costs, cpu, "1f1b")
    unshared, _ = predict(decision, costs, alone, "1f1b")
    for key in ("fwd_s", "bwd_s"):
        assert shared["stages"][0][key] == pytest.approx(slowdown * unshared["stages"][0][key], rel=1e-3)


def test_a_replica_that_finishes_first_frees_its_core():
    # Stage 0's replicas hold 3 and 1 samples of a micro-batch; the small one waits most of the span,
    # so the three ranks slow down less than three always computing would.
    profile = dataclasses.replace(_profile(op_s=0.0), num_cores=2)
    cpu = load_cluster({"nodes": [{"device": "CPU", "count": 3}], "devices": {"CPU": {"profile": profile.to_json()}}})
    costs = _costs(num_blocks=2, batch=8)
    decision = PlanDecision(stages=(StageDecision(0, 0, (0, 1), (3, 1)), StageDecision(1, 1, (2,), (4,))),
                            num_microbatches=2, microbatch_size=4)
    unshared = stage_times(decision, costs, cpu)["fwd_s"][0]
    predicted, _ = predict(decision, costs, cpu, "gpipe")
    assert unshared < predicted["stages"][0]["fwd_s"] < 1.5 * unshared


def test_sends_posted_while_every_core_computes_take_the_full_cores_latency():
    # Three pipeline stages, one rank each, on two cores: in 1F1B's steady state two ranks compute
    # while the third sends, so some sends are posted on full cores (NOTE: [transfers on full cores]).
    comm = dataclasses.replace(_profile().comm, p2p_full_cores_latency_s=2e-3)
    costs = _costs(num_blocks=3, batch=8)
    decision = PlanDecision(stages=tuple(StageDecision(i, i, (i,), (2,)) for i in range(3)), num_microbatches=4,
                            microbatch_size=2)

    def sends(cores, full_cores_comm):
        profile = dataclasses.replace(_profile(), num_cores=cores, comm=full_cores_comm)
        cpu = load_cluster({"nodes": [{"device": "CPU", "count": 3}],
                            "devices": {"CPU": {"profile": profile.to_json()}}})
        predicted, _ = predict(decision, costs, cpu, "1f1b")
        return [(st["send_fwd_s"], st["send_bwd_s"]) for st in predicted["stages"]]

    base = sends(3, comm)  # a core each: the plain latency
    assert sends(2, _profile().comm) == base  # not measured: nothing added
    shared = sends(2, comm)
    extra = 2e-3 - 50e-6
    assert shared[0][1] == shared[2][0] == 0.0  # nothing to send there
    for (f, b), (f0, b0) in zip(shared, base):
        assert f0 <= f <= f0 + extra + 1e-12 and b0 <= b <= b0 + extra + 1e-12
    assert sum(map(sum, shared)) > sum(map(sum, base)) + extra  # some, not none


@pytest.mark.parametrize("local_ranks, cores, polls", [("2", {0, 1}, True), ("3", {0, 1}, False)])
def test_cpu_ranks_poll_their_all_reduces_only_with_a_core_each(monkeypatch, local_ranks, cores, polls):
    from hetcompile.runtime import collectives

    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    monkeypatch.setattr(collectives.os, "sched_getaffinity", lambda pid: cores, raising=False)
    monkeypatch.setattr(collectives.torch, "get_num_threads", lambda: 1)
    collectives._core_each.cache_clear()
    try:
        assert collectives._core_each() is polls
    finally:
        collectives._core_each.cache_clear()


@pytest.mark.parametrize("local_ranks, yields", [("2", 1), ("3", 0)])
def test_cpu_ranks_hand_a_send_over_only_with_a_core_each(monkeypatch, local_ranks, yields):
    """NOTE: [handing a send over]: after posting a send, a rank with a core to itself yields it once."""
    from hetcompile.runtime import collectives

    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    monkeypatch.setattr(collectives.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(collectives.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(collectives.dist, "isend", lambda t, dst, tag=0: ("work", dst, tag))
    yielded = []
    monkeypatch.setattr(collectives.os, "sched_yield", lambda: yielded.append(1))
    collectives._core_each.cache_clear()
    try:
        assert collectives.isend(torch.zeros(1), 1, tag=7) == ("work", 1, 7)
    finally:
        collectives._core_each.cache_clear()
    assert len(yielded) == yields


_WHERE_A_FREED_ACTIVATION_GOES = """
import ctypes, sys, torch
from hetcompile.runtime.host_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
t = torch.ones(4 << 20)  # 16 MiB: over malloc's default mmap threshold, under the raised one
in_heap, brk = t.data_ptr() < libc.sbrk(0), libc.sbrk(0)
del t
print(kept, in_heap, libc.sbrk(0) == brk)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_ranks_keep_freed_memory_instead_of_faulting_it_in_again():
    """NOTE: [freed host memory]: a large activation comes from the heap and stays there when
    freed, for the next step to reuse; by default it is mapped on its own and unmapped when freed."""
    def run(mode):
        return subprocess.run([sys.executable, "-c", _WHERE_A_FREED_ACTIVATION_GOES, mode], capture_output=True,
                              text=True, check=True).stdout.split()

    assert run("keep") == ["True", "True", "True"]  # kept, in the heap, the heap not trimmed
    assert run("default")[1] == "False"  # mapped on its own


@pytest.mark.parametrize("max_stages", [1, 2])
def test_device_profiled_2x_faster_gets_more_work(tmp_path, max_stages):
    costs = _costs(num_blocks=8, batch=16)
    kwargs = dict(num_microbatches=2, schedule="gpipe", max_stages=max_stages, time_limit_s=10, seed=0)
    (tmp_path / "same").mkdir()
    (tmp_path / "fast").mkdir()
    same = _two_type_cluster(tmp_path / "same", 1.0)
    fast = _two_type_cluster(tmp_path / "fast", 2.0)
    even, _ = solve(costs, same, **kwargs)
    skewed, _ = solve(costs, fast, **kwargs)
    even_work, skewed_work = _work(even, same, costs), _work(skewed, fast, costs)
    assert even_work.get("CpuA", 0) == even_work.get("CpuB", 0)
    assert skewed_work["CpuA"] > skewed_work.get("CpuB", 0)
    # Proportional to speed: about two thirds of the work goes to the 2x faster type.
    total = sum(skewed_work.values())
    assert skewed_work["CpuA"] / total == pytest.approx(2 / 3, abs=0.1)


def test_cli_profile_writes_a_loadable_file(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "hetcompile.cli", "profile", "--quick", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "GFLOP/s" in done.stdout and str(out) in done.stdout
    p = load_profile(out)
    assert p.device == "cpu" and p.flops_per_s("fp32") > 0 and p.comm is None
    c = load_cluster({"nodes": [{"device": "CPU", "count": 1}], "devices": {"CPU": {"profile": str(out)}}})
    assert dataclasses.replace(c.type_of("CPU"), profile=None) != c.type_of("CPU")


def test_block_profile_times_each_distinct_block_and_the_predictor_uses_it(tmp_path, examples):
    from hetcompile.block_profile import block_signatures, measure_blocks
    from hetcompile.compiler import analyze

    cap, costs = analyze(examples / "mlp.py")
    sigs = [b.signature for b in costs.blocks]
    assert sigs == block_signatures(cap, costs) and all(sigs)
    # Linear, GELU, Linear, ... : identical layers share one signature (and one measurement). The
    # first Linear reads the batch, which needs no gradient, so its backward is another block's.
    assert sigs[2] == sigs[4] == sigs[10] and sigs[1] == sigs[3] and sigs[0] != sigs[2] and sigs[2] != sigs[1]
    assert len(set(sigs)) == 5  # Linear 64->64 on the batch and on a layer, GELU, Linear 64->1, loss

    times, (call_fwd_s, call_bwd_s) = measure_blocks(examples / "mlp.py", sizes=(1, 4), min_run_time_s=0.002,
                                                     min_rounds=2, analyzed=(cap, costs))
    assert 0 < call_fwd_s < 1e-2 and 0 < call_bwd_s < 1e-2
    assert sorted(t.signature for t in times) == sorted(set(sigs))
    linear = next(t for t in times if t.signature == sigs[0])
    assert [n for n, _, _ in linear.samples] == [1, 4]
    assert linear.fwd_fixed_s + linear.fwd_per_sample_s > 0 and linear.bwd_fixed_s + linear.bwd_per_sample_s > 0

    # The profile file keeps them, and the cost model prices a measured block by them alone.
    p = dataclasses.replace(_profile(), block_times=times)
    save_profile(p, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == p
    cpu = load_cluster({"nodes": [{"device": "CPU", "count": 2}], "devices": {"CPU": {"profile": p.to_json()}}})
    t = cpu.type_of("CPU")
    # At a measured size, the measured time; the per-sample part is its segment's slope.
    (fwd_fixed, fwd_slope), (bwd_fixed, bwd_slope) = linear.segment(4)
    _, fwd_4, bwd_4 = linear.samples[1]
    assert block_time_s(costs.blocks[0], t, "fp32", samples=4) == (fwd_slope, bwd_slope)
    assert block_overhead_s(costs.blocks[0], t, samples=4) == (fwd_fixed, bwd_fixed)
    assert fwd_fixed + 4 * fwd_slope == pytest.approx(fwd_4) and bwd_fixed + 4 * bwd_slope == pytest.approx(bwd_4)
    # Without a size, the fitted line.
    assert block_time_s(costs.blocks[0], t, "fp32") == (linear.fwd_per_sample_s, linear.bwd_per_sample_s)
    assert block_overhead_s(costs.blocks[0], t) == (linear.fwd_fixed_s, linear.bwd_fixed_s)
    decision = PlanDecision(stages=(StageDecision(0, 0, (0,), (4,)), StageDecision(1, costs.num_blocks - 1, (1,), (4,))),
                            num_microbatches=8, microbatch_size=4)
    predicted, _ = predict(decision, costs, cpu, "gpipe")
    assert predicted["stages"][0]["fwd_s"] == pytest.approx(linear.call_time_s(4)[0])
    assert predicted["stages"][0]["bwd_s"] == pytest.approx(linear.call_time_s(4)[1])
    # A block the profile has not measured keeps the kernel-level model.
    unmeasured = dataclasses.replace(costs.blocks[0], signature="not-measured")
    assert block_overhead_s(unmeasured, t) == (unmeasured.num_ops * p.op_fwd_overhead_s,
                                               unmeasured.num_grad_ops * p.op_bwd_overhead_s)


def test_a_measured_block_is_priced_on_its_measured_curve():
    # Flat up to 4 samples, then steeper: the fitted line would miss both ends.
    b = BlockTime(signature="s", name="m.py:0", fwd_fixed_s=1.0, fwd_per_sample_s=1.0, bwd_fixed_s=2.0,
                  bwd_per_sample_s=2.0, samples=((1, 1e-3, 2e-3), (4, 1e-3, 2e-3), (16, 4e-3, 8e-3), (32, 8e-3, 16e-3)))
    assert b.call_time_s(4) == pytest.approx((1e-3, 2e-3))
    assert b.call_time_s(10) == pytest.approx((2.5e-3, 5e-3))  # halfway from 4 to 16
    assert b.call_time_s(64) == pytest.approx((16e-3, 32e-3))  # past the last size: its segment goes on
    assert b.call_time_s(2) == pytest.approx((1e-3, 2e-3))
    (fixed, slope), _ = b.segment(2)
    assert slope == 0.0 and fixed == pytest.approx(1e-3)  # a flat segment: all of it fixed
    assert b.segment(None) == ((1.0, 1.0), (2.0, 2.0))  # no size: the fitted line
    assert dataclasses.replace(b, samples=()).call_time_s(3) == (4.0, 8.0)


def test_a_receive_posted_late_waits_for_its_notice_to_reach_the_sender():
    from hetcompile.schedule import gpipe, simulate

    times = dict(fwd_s=[0.1, 0.1], bwd_s=[0.2, 0.2], send_fwd_s=[0.5, 0.0], send_bwd_s=[0.0, 0.5],
                 allreduce_s=[0.0, 0.0])
    start = {}
    for notice in (None, 0.25):
        notices = {} if notice is None else dict(notice_fwd_s=[notice, 0.0], notice_bwd_s=[0.0, notice])
        tl = simulate(gpipe(2, 3), **times, **notices)
        start[notice] = {(sp.stage, sp.kind, sp.microbatch): sp.start_s for sp in tl.spans}
    # Stage 1 posts the receives of its first two forwards at the step's start (the first
    # action's own, and the next one's ahead): the data of micro-batch 0, ready at 0.1 s, leaves
    # when the notice is there (0.25 s) and arrives 0.5 s later.
    assert start[None][1, "F", 0] == pytest.approx(0.6)
    assert start[0.25][1, "F", 0] == pytest.approx(0.75)
    assert start[0.25][1, "F", 1] == pytest.approx(0.85)
    # Micro-batch 2's receive goes out only when stage 1 reaches its forward of 1 (0.85 s): the
    # data, ready at 0.3 s, leaves at 0.85 + 0.25 and arrives at 1.6 s. Without notices: 0.8 s.
    assert start[None][1, "F", 2] == pytest.approx(0.8)
    assert start[0.25][1, "F", 2] == pytest.approx(1.6)


def test_posting_a_transfer_takes_the_ranks_own_time():
    # NOTE: [posting a transfer]: each send or receive a stage posts, one per cut and direction,
    # adds the profile's p2p_post_s to its forward and its backward; a profile without it adds nothing.
    posting = _profile()
    posting = dataclasses.replace(posting, comm=dataclasses.replace(posting.comm, p2p_post_s=1e-3))
    costs = _costs(num_blocks=3, batch=4)
    decision = PlanDecision(stages=tuple(StageDecision(b, b, (b,), (4,)) for b in range(3)), num_microbatches=1,
                            microbatch_size=4)
    times = {}
    for name, p in (("without", _profile()), ("with", posting)):
        cluster = load_cluster({"nodes": [{"device": "CPU", "count": 3}], "devices": {"CPU": {"profile": p.to_json()}}})
        times[name] = stage_times(decision, costs, cluster)
    for key in ("fwd_s", "bwd_s"):  # the middle stage posts both ways
        assert [w - wo for w, wo in zip(times["with"][key], times["without"][key])] == pytest.approx([1e-3, 2e-3, 1e-3])
    assert DeviceProfile.from_json(json.loads(json.dumps(posting.to_json()))) == posting  # kept in the file


def test_tied_embeddings_across_stages_are_all_reduced_between_them(examples):
    """GPT-2's input and output embeddings are one parameter: split into stages, its first and last
    stage sum its gradient (lowering.grad_groups), and the prediction charges that all-reduce once
    both reached it, not in stage 0's own data-parallel all-reduce."""
    from hetcompile.timeline import plan_timeline

    cluster = {"nodes": [{"device": "A100-80GB", "count": 3}]}
    decision = PlanDecision(stages=(StageDecision(0, 2, (0, 1), (4, 4)), StageDecision(3, 5, (2,), (8,))),
                            num_microbatches=2, microbatch_size=8)
    plan = hetcompile.compile(str(examples / "gpt2.py"), cluster, schedule="gpipe", decision=decision)
    (tied,) = plan.model_costs().shared_params
    assert tied.blocks == (0, 5) and tied.param_bytes == 512 * 128 * 4  # wte = lm_head
    assert [g for g in plan.grad_groups if g.ranks == (0, 1, 2)][0].params == ("lm_head.weight",)
    clu = load_cluster(cluster)
    (shared,) = plan.predicted["shared_allreduce"]
    assert shared == {"stages": [0, 1], "seconds": pytest.approx(allreduce_time_s(tied.param_bytes, clu, [0, 1, 2]))}
    stage0_bytes = sum(b.param_bytes for b in plan.model_costs().blocks[:3]) - tied.param_bytes
    assert plan.predicted["stages"][0]["allreduce_s"] == pytest.approx(allreduce_time_s(stage0_bytes, clu, [0, 1]))
    timeline = plan_timeline(plan)  # the picture re-simulates the same step from plan.json
    assert timeline.step_time_s == pytest.approx(plan.predicted["step_time_s"])
    assert sum(span.kind == "allreduce" and span.duration_s == pytest.approx(shared["seconds"])
               for span in timeline.spans) == 2


def test_a_rank_that_runs_both_stages_sharing_parameters_sums_nothing(examples):
    """Stages on one device (as a rank's interleaved stages are) hold the tied embedding once:
    lowering makes no group of one rank, so the prediction's all-reduce of it takes no time."""
    from hetcompile.compiler import analyze

    _, costs = analyze(examples / "gpt2.py")
    cluster = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}]})
    decision = PlanDecision(stages=(StageDecision(0, 1, (0,), (8,)), StageDecision(2, 3, (1,), (8,)),
                                    StageDecision(4, 5, (0,), (8,))), num_microbatches=2, microbatch_size=8)
    assert predict(decision, costs, cluster, "gpipe")[0]["shared_allreduce"] == [{"stages": [0, 2], "seconds": 0.0}]


def test_a_rank_of_several_stages_joins_the_loss_all_reduce_once():
    # Interleaved: stages 0 and 2 on device 0, 1 and 3 on device 1. end_step sums the loss over
    # the ranks once a step, so only each rank's first stage charges it.
    cpu = load_cluster({"nodes": [{"device": "CPU", "count": 2}], "devices": {"CPU": {"profile": _profile().to_json()}}})
    costs = _costs(num_blocks=4, batch=8)
    decision = PlanDecision(stages=tuple(StageDecision(i, i, (i % 2,), (2,)) for i in range(4)), num_microbatches=4,
                            microbatch_size=2)
    update = stage_times(decision, costs, cpu)["update_s"]
    loss_sync_s = allreduce_time_s(8, cpu, [0, 1])
    assert loss_sync_s > 0
    assert update[0] == pytest.approx(update[2] + loss_sync_s) and update[1] == pytest.approx(update[3] + loss_sync_s)
