"""Property-based input tests: malformed and random cluster specs, model files and flags give either a
plan or a clean UserError (the CLI's exit code 2), never another exception.

Budgets are bounded and derandomized so that CI runs the same examples every time.
"""

import functools
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cost_models.cluster import load_cluster
from cost_models.devices import CATALOG
from hetcompile import cli
from hetcompile.errors import UserError
from hetcompile.planner import solve

ROOT = Path(__file__).resolve().parent.parent
BUDGET = settings(max_examples=50, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- strategies ------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=12) | st.floats()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
bad_values = (st.sampled_from([0, -1, -0.5, math.nan, math.inf, "12.5", "", True, None, [], {}, 10**12])
              | json_values)
good_devices = st.sampled_from(sorted(CATALOG)).flatmap(lambda n: st.sampled_from([n, n.lower(), n.upper()]))


@st.composite
def valid_specs(draw):
    """A spec that parses: catalog and custom device types, optional links and latencies."""
    custom = draw(st.booleans())
    names = good_devices | st.just("MyAccel") if custom else good_devices
    node = st.fixed_dictionaries({"device": names, "count": st.integers(1, 8)},
                                 optional={"intra_node_GBps": st.floats(1, 900),
                                           "intra_node_latency_us": st.floats(0, 50)})
    spec = {"nodes": draw(st.lists(node, min_size=1, max_size=3))}
    spec.update(draw(st.fixed_dictionaries({}, optional={
        "inter_node_GBps": st.floats(0.5, 400),
        "latency_us": st.fixed_dictionaries({}, optional={"intra_node": st.floats(0, 50),
                                                          "inter_node": st.floats(0, 200)})})))
    devices = {}
    if custom:
        devices["MyAccel"] = draw(st.fixed_dictionaries(
            {"fp32_tflops": st.floats(0.5, 500), "mem_GB": st.floats(1, 200), "mem_GBps": st.floats(50, 8000)},
            optional={"bf16_tflops": st.floats(0, 2000), "intra_node_GBps": st.floats(1, 900),
                      "source": st.text(max_size=10)}))
    if draw(st.booleans()):
        devices[draw(good_devices)] = draw(st.fixed_dictionaries({}, optional={
            "mem_GB": st.floats(1, 200), "fp32_tflops": st.floats(0.5, 500)}))
    if devices:
        spec["devices"] = devices
    return spec


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def cluster_specs(draw):
    """A valid spec, or one with one mistake: a value replaced by a bad one, a key dropped or misspelt."""
    spec = draw(valid_specs())
    if not draw(st.booleans()):
        return spec
    path = draw(st.sampled_from([p for p in _paths(spec) if p]))
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "drop", "misspell"]))
    if how == "replace":
        parent[path[-1]] = draw(bad_values)
    elif how == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif how == "misspell" and isinstance(parent, dict):
        parent[str(path[-1]) + "_"] = parent.pop(path[-1])
    else:
        parent.pop(path[-1])
    return spec


# -- cluster specs ---------------------------------------------------------------------------------------


@BUDGET
@given(spec=json_values)
def test_any_json_is_a_cluster_or_a_user_error(spec):
    try:
        load_cluster(spec)
    except UserError:
        pass


@functools.lru_cache(maxsize=1)
def _mlp_costs():
    from hetcompile.compiler import analyze

    return analyze(str(ROOT / "examples" / "mlp.py"))[1]


@settings(BUDGET, max_examples=60)
@given(spec=cluster_specs())
def test_cluster_spec_gives_a_plan_or_a_user_error(spec):
    try:
        cluster = load_cluster(spec)
    except UserError:
        return
    if cluster.num_devices > 64:
        return  # parsed fine; planning thousands of devices is the planner tests' business, not a fuzz budget's
    try:
        decision, report = solve(_mlp_costs(), cluster, num_microbatches=4, schedule="1f1b", max_stages=None,
                                 time_limit_s=2.0, seed=0)
    except UserError:
        return
    assert decision.stages and report.status


@BUDGET
@given(text=st.text(max_size=200) | st.binary(max_size=50).map(lambda b: b.decode("latin-1")))
def test_spec_file_text(tmp_path, text):
    path = tmp_path / "spec.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_cluster(path)
    except UserError:
        pass


def test_spec_path_problems(tmp_path):
    (tmp_path / "dir.json").mkdir()
    bad = tmp_path / "latin.json"
    bad.write_bytes(b'{"nodes": [{"device": "A100\xff", "count": 1}]}')
    for source in (tmp_path / "dir.json", bad, str(tmp_path / "missing.json"), 42, None):
        with pytest.raises(UserError):
            load_cluster(source)
    for profile in ("dir.json", "latin.json", "missing.json", "", 3, [], {}, {"version": 1}):
        spec = {"nodes": [{"device": "CPU", "count": 2}], "devices": {"CPU": {"profile": profile}}}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        with pytest.raises(UserError):
            load_cluster(tmp_path / "spec.json")


# -- model files -----------------------------------------------------------------------------------------

MODEL_HEAD = "import torch\n\n"
GOOD_MODEL = "def get_model():\n    return torch.nn.Linear(4, 1)\n\n"
GOOD_BATCH = "def get_batch(step):\n    return torch.randn(8, 4), torch.randn(8, 1)\n\n"
GOOD_LOSS = "def loss_fn(out, y):\n    return torch.nn.functional.mse_loss(out, y)\n"

BAD_MODEL_FILES = {
    "syntax error": "def get_model(:\n",
    "import fails": "import no_such_module_hetcompile\n",
    "get_model raises": MODEL_HEAD + "def get_model():\n    raise ValueError('boom')\n\n" + GOOD_BATCH + GOOD_LOSS,
    "get_model not a module": MODEL_HEAD + "def get_model():\n    return 3\n\n" + GOOD_BATCH + GOOD_LOSS,
    "get_batch raises": MODEL_HEAD + GOOD_MODEL + "def get_batch(step):\n    return 1 / 0\n\n" + GOOD_LOSS,
    "get_batch a string": MODEL_HEAD + GOOD_MODEL + "def get_batch(step):\n    return 'data'\n\n" + GOOD_LOSS,
    "get_batch empty": MODEL_HEAD + GOOD_MODEL + "def get_batch(step):\n    return ()\n\n" + GOOD_LOSS,
    "batch sizes differ": MODEL_HEAD + GOOD_MODEL
    + "def get_batch(step):\n    return torch.randn(8, 4), torch.randn(6, 1)\n\n" + GOOD_LOSS,
    "loss not scalar": MODEL_HEAD + GOOD_MODEL + GOOD_BATCH + "def loss_fn(out, y):\n    return out - y\n",
    "loss_fn raises": MODEL_HEAD + GOOD_MODEL + GOOD_BATCH + "def loss_fn(out, y):\n    raise KeyError('y')\n",
    "get_model not callable": MODEL_HEAD + "get_model = 3\n" + GOOD_BATCH,
    "get_model returns nothing": MODEL_HEAD + "def get_model():\n    pass\n\n" + GOOD_BATCH + GOOD_LOSS,
}


def test_tiny_model_plans(tmp_path):
    """A one-layer model whose costs round to zero still plans (or says why not)."""
    import hetcompile

    model = tmp_path / "model.py"
    model.write_text(MODEL_HEAD + GOOD_MODEL + GOOD_BATCH + GOOD_LOSS)
    try:
        hetcompile.compile(model, {"nodes": [{"device": "A100-80GB", "count": 2}]}, time_limit_s=2)
    except UserError:
        pass


@pytest.mark.parametrize("case", sorted(BAD_MODEL_FILES))
def test_bad_model_file_is_a_user_error(case, tmp_path):
    import hetcompile

    model = tmp_path / "model.py"
    model.write_text(BAD_MODEL_FILES[case])
    with pytest.raises(UserError):
        hetcompile.compile(model, {"nodes": [{"device": "A100-80GB", "count": 2}]}, time_limit_s=2)


# -- flags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--microbatches", "0"], ["--microbatches", "-2"], ["--microbatches", "x"], ["--max-stages", "0"],
    ["--time-limit", "nan"], ["--time-limit", "-1"], ["--schedule", "zigzag"],
])
def test_bad_compile_flags(argv, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = cli.main([str(ROOT / "examples" / "mlp.py"), "--cluster", str(ROOT / "examples" / "a100_v100.json"),
                         "-o", str(out)] + argv)
    except SystemExit as e:  # argparse's own clean error: usage line, message, exit code 2
        code = e.code
    assert code == 2, capsys.readouterr()
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--steps", "-3"], ["--timeout", "0"], ["--timeout", "nan"], ["--timeout", "inf"],
    ["--checkpoint-every", "2"], ["--checkpoint-dir", "ck", "--checkpoint-every", "0"],
])
def test_bad_run_flags(argv, tmp_path, capsys):
    plan = tmp_path / "plan"  # the flags are refused before the plan is read
    try:
        code = cli.main(["run", str(plan)] + argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
