"""Device catalog, cluster spec parsing, roofline, communication and memory models."""

from __future__ import annotations

import doctest
import json

import pytest

import cost_models.cluster
import cost_models.comm
import cost_models.devices
import cost_models.memory
import cost_models.roofline
from cost_models.cluster import Cluster, Device, Node, load_cluster
from cost_models.comm import allreduce_time_s, p2p_time_s, ring_allreduce_time_s
from cost_models.devices import CATALOG, lookup_device_type
from cost_models.memory import device_memory_bytes
from cost_models.roofline import COMPUTE_EFFICIENCY, MEMORY_EFFICIENCY, block_time_s
from hetcompile.errors import UserError
from hetcompile.ir import Block


@pytest.mark.parametrize(
    "module", [cost_models.devices, cost_models.cluster, cost_models.roofline, cost_models.comm, cost_models.memory]
)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0


# ---------------------------------------------------------------- devices


def test_catalog_has_the_advertised_types_with_sources():
    expected = {"H100-80GB", "A100-80GB", "A100-40GB", "V100-32GB", "V100-16GB", "T4-16GB",
                "A10-24GB", "L4-24GB", "MI250X", "MI300X", "CPU"}
    assert expected <= set(CATALOG)
    for name, t in CATALOG.items():
        assert t.name == name
        assert t.source
        assert t.fp32_tflops > 0 and t.mem_GB > 0 and t.mem_GBps > 0 and t.intra_node_GBps > 0


def test_peak_flops_fallbacks():
    v100 = CATALOG["V100-32GB"]
    assert v100.bf16_tflops == 0
    assert v100.peak_flops_per_s("bf16") == v100.peak_flops_per_s("fp16") == 125e12
    cpu = CATALOG["CPU"]
    assert cpu.peak_flops_per_s("bf16") == cpu.peak_flops_per_s("fp32") == 1e12
    assert CATALOG["A100-80GB"].mem_bytes == 80_000_000_000
    assert CATALOG["A100-80GB"].mem_bw_bytes_per_s == 2039e9
    with pytest.raises(UserError, match="Unknown dtype 'int8'"):
        v100.peak_flops_per_s("int8")


def test_lookup_is_case_insensitive_and_suggests():
    assert lookup_device_type("h100-80gb") is CATALOG["H100-80GB"]
    with pytest.raises(UserError) as e:
        lookup_device_type("A100")
    msg = str(e.value)
    assert "Unknown device type 'A100'" in msg
    assert "Did you mean" in msg and "A100-80GB" in msg
    assert "MI300X" in msg  # the catalog is listed


# ---------------------------------------------------------------- cluster

SPEC = {
    "nodes": [{"device": "A100-80GB", "count": 4}, {"device": "V100-32GB", "count": 4, "intra_node_GBps": 100}],
    "inter_node_GBps": 25,
    "devices": {"MyAccel": {"fp32_tflops": 20, "bf16_tflops": 160, "mem_GB": 48, "mem_GBps": 900}},
}


def test_parse_example_spec():
    c = load_cluster(SPEC)
    assert c.nodes == (Node("A100-80GB", 4, 300.0), Node("V100-32GB", 4, 100.0))
    assert [t.name for t in c.device_types] == ["A100-80GB", "V100-32GB"]  # MyAccel is unused
    assert c.devices[5] == Device(5, "V100-32GB", 1)
    assert c.num_devices == 8 and c.count_of("a100-80gb") == 4
    assert c.link_bw_bytes_per_s(0, 3) == 300e9
    assert c.link_bw_bytes_per_s(4, 7) == 100e9
    assert c.link_bw_bytes_per_s(3, 4) == 25e9
    assert c.link_latency_s(0, 1) == 5e-6 and c.link_latency_s(0, 4) == 2e-5
    assert c.type_of("v100-32GB") is CATALOG["V100-32GB"]


def test_defaults_and_custom_device():
    c = load_cluster({"nodes": [{"device": "myaccel", "count": 2}],
                      "devices": {"MyAccel": {"fp32_tflops": 20, "bf16_tflops": 160, "mem_GB": 48, "mem_GBps": 900}},
                      "latency_us": {"inter_node": 30}})
    t = c.type_of("MyAccel")
    assert (t.fp32_tflops, t.bf16_tflops, t.fp16_tflops, t.intra_node_GBps) == (20, 160, 160, 64)
    assert c.inter_node_GBps == 12.5
    assert c.intra_node_latency_s == 5e-6 and c.inter_node_latency_s == 3e-5


def test_override_catalog_entry():
    c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 1}], "devices": {"a100-80gb": {"mem_GB": 70}}})
    t = c.type_of("A100-80GB")
    assert t.mem_GB == 70 and t.bf16_tflops == 312 and "overridden" in t.source
    assert CATALOG["A100-80GB"].mem_GB == 80  # the catalog itself is untouched


def test_round_trip_and_file(tmp_path):
    c = load_cluster(SPEC)
    j = c.to_json()
    assert Cluster.from_json(j) == c
    assert Cluster.from_json(json.loads(json.dumps(j))).to_json() == j
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(SPEC))
    assert load_cluster(path) == c
    assert load_cluster(str(path)) == c
    custom = load_cluster({"nodes": [{"device": "MyAccel", "count": 1}], "devices": SPEC["devices"],
                           "latency_us": {"intra_node": 3, "inter_node": 7}})
    assert Cluster.from_json(custom.to_json()) == custom


def _error(spec) -> str:
    with pytest.raises(UserError) as e:
        load_cluster(spec)
    return str(e.value)


def test_error_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.json")
    assert "does not exist" in msg and "nope.json" in msg


def test_error_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"nodes": [\n  {"device": "A100-80GB" "count": 4}\n]}')
    msg = _error(path)
    assert "not valid JSON" in msg and "line 2" in msg and "column" in msg


def test_error_missing_nodes():
    assert 'no "nodes"' in _error({"inter_node_GBps": 10})
    assert "empty" in _error({"nodes": []})


@pytest.mark.parametrize("count", [0, -1, 2.5, "4", True, None])
def test_error_bad_count(count):
    node = {"device": "A100-80GB"} if count is None else {"device": "A100-80GB", "count": count}
    msg = _error({"nodes": [{"device": "A100-80GB", "count": 1}, node]})
    assert "nodes[1].count" in msg and "positive integer" in msg


def test_error_unknown_device():
    msg = _error({"nodes": [{"device": "V100-32G", "count": 1}]})
    assert "nodes[0].device" in msg and "'V100-32G'" in msg and "Did you mean 'V100-32GB'" in msg
    assert '"devices"' in msg  # tells how to describe a new device


def test_error_non_positive_numbers():
    assert "inter_node_GBps" in _error({"nodes": [{"device": "CPU", "count": 1}], "inter_node_GBps": 0})
    msg = _error({"nodes": [{"device": "CPU", "count": 1, "intra_node_GBps": -5}]})
    assert "nodes[0].intra_node_GBps" in msg and "positive" in msg
    msg = _error({"nodes": [{"device": "X", "count": 1}], "devices": {"X": {"fp32_tflops": 1, "mem_GB": 0, "mem_GBps": 1}}})
    assert "devices.X.mem_GB" in msg
    assert "latency_us.intra_node" in _error({"nodes": [{"device": "CPU", "count": 1}], "latency_us": {"intra_node": -1}})


def test_error_unknown_keys():
    msg = _error({"nodes": [{"device": "CPU", "count": 1}], "inter_node_GBPS": 10})
    assert "'inter_node_GBPS'" in msg and "the top level" in msg and "inter_node_GBps" in msg
    msg = _error({"nodes": [{"device": "CPU", "count": 1, "cnt": 2}]})
    assert "'cnt'" in msg and "nodes[0]" in msg and "device, count, intra_node_GBps" in msg
    msg = _error({"nodes": [{"device": "CPU", "count": 1}], "devices": {"CPU": {"memGB": 2}}})
    assert "'memGB'" in msg and "devices.CPU" in msg
    assert "'intra'" in _error({"nodes": [{"device": "CPU", "count": 1}], "latency_us": {"intra": 1}})


def test_error_new_device_missing_fields():
    msg = _error({"nodes": [{"device": "X", "count": 1}], "devices": {"X": {"fp32_tflops": 1}}})
    assert "'X'" in msg and "mem_GB" in msg and "mem_GBps" in msg


def test_error_not_an_object(tmp_path):
    assert "a dict, got list" in _error([1, 2])
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert "must be a JSON object" in _error(path)
    assert "nodes[0]" in _error({"nodes": ["A100-80GB"]})
    assert 'no "device"' in _error({"nodes": [{"count": 2}]})


# ---------------------------------------------------------------- roofline, comm, memory


def _block(flops=1e12, bytes_=1e6) -> Block:
    return Block(0, "h.0", flops, bytes_, 0, 0, 0.0, 0.0)


def test_roofline_a100_faster_than_v100():
    for dtype in ("fp32", "bf16", "fp16"):
        a_fwd, a_bwd = block_time_s(_block(), CATALOG["A100-80GB"], dtype)
        v_fwd, v_bwd = block_time_s(_block(), CATALOG["V100-32GB"], dtype)
        assert a_fwd <= v_fwd and a_bwd == 2 * a_fwd
    assert block_time_s(_block(), CATALOG["A100-80GB"], "bf16")[0] < block_time_s(_block(), CATALOG["V100-32GB"], "bf16")[0]
    assert block_time_s(_block(), CATALOG["H100-80GB"], "bf16")[0] < block_time_s(_block(), CATALOG["A100-80GB"], "bf16")[0]


def test_roofline_compute_and_memory_bound():
    a100 = CATALOG["A100-80GB"]
    fwd, _ = block_time_s(_block(flops=1e12, bytes_=0), a100, "bf16")
    assert fwd == pytest.approx(1e12 / (312e12 * COMPUTE_EFFICIENCY))
    fwd, _ = block_time_s(_block(flops=1, bytes_=1e9), a100, "bf16")
    assert fwd == pytest.approx(1e9 / (2039e9 * MEMORY_EFFICIENCY))
    assert block_time_s(_block(flops=1e12, bytes_=0), a100, "bf16", efficiency=1.0)[0] == pytest.approx(1e12 / 312e12)


def test_p2p_and_allreduce():
    assert p2p_time_s(0, 1e9, 1e-5) == 0
    assert p2p_time_s(1e9, 1e9, 1e-5) == pytest.approx(1 + 1e-5)
    c = load_cluster({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "V100-32GB", "count": 2}],
                      "inter_node_GBps": 10})
    assert allreduce_time_s(1e9, c, [0]) == 0
    two = allreduce_time_s(1e9, c, [0, 1])
    assert two == pytest.approx(2 * 1 / 2 * 1e9 / 300e9 + 2 * 5e-6)
    four = allreduce_time_s(1e9, c, [0, 1, 2, 3])  # the inter-node link is the bottleneck
    assert four == pytest.approx(2 * 3 / 4 * 1e9 / 10e9 + 2 * 3 * 2e-5)
    assert ring_allreduce_time_s(1e9, 4, 10e9, 2e-5) == pytest.approx(four)


def test_memory_model():
    assert device_memory_bytes(100, 0, 0) == 400  # weights + grads + 2x Adam state
    assert device_memory_bytes(100, 10, 3) == 430
    assert device_memory_bytes(100, 0, 0, optimizer_state_per_param_byte=0) == 200  # SGD
