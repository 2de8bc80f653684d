"""Measured profiles: file format, cluster specs that name them, and their effect on plans and predictions."""

from __future__ import annotations

import dataclasses
import doctest
import json
import subprocess
import sys

import pytest

import cost_models.profile
from cost_models.cluster import Cluster, load_cluster
from cost_models.comm import allreduce_time_s
from cost_models.profile import CommProfile, DeviceProfile, load_profile, save_profile
from cost_models.roofline import block_overhead_s, block_time_s, optimizer_time_s
from hetcompile.errors import UserError
from hetcompile.ir import Block, ModelCosts
from hetcompile.planner import PlanDecision, StageDecision, solve
from hetcompile.predict import predict

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
    assert optimizer_time_s(2, 4096, t) == pytest.approx(2 * 40e-6 + 7 * 4096 / 10e9)
    # All-reduce on one profiled node uses the measured collective numbers.
    assert allreduce_time_s(1e6, cpu, [0, 1]) == pytest.approx(2 * 40e-6 + 1e6 / 1e9)

    # The predictor: a micro-batch's forward is share x per-sample time + the per-op time, whatever the share.
    costs = _costs(num_blocks=2, batch=8)
    decision = PlanDecision(stages=(StageDecision(0, 0, (0,), (4,)), StageDecision(1, 1, (1,), (4,))),
                            num_microbatches=2, microbatch_size=4)
    predicted, timeline = predict(decision, costs, cpu, "gpipe")
    assert predicted["stages"][0]["fwd_s"] == pytest.approx(4 * fwd_s + 20 * 5e-6)
    assert predicted["stages"][1]["update_s"] > 0
    assert any(span.kind == "update" for span in timeline.spans)


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
