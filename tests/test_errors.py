"""Bad input: a clear one-paragraph error, exit code 2, no traceback, no output directory."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hetcompile.cli"]


def _compile(model, cluster, out):
    return subprocess.run(CLI + [str(model), "--cluster", str(cluster), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)


def _assert_clean_error(done, out, *words):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("hetcompile: error: ")
    for w in words:
        assert w.lower() in done.stderr.lower(), done.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def good_cluster(tmp_path):
    p = tmp_path / "cluster.json"
    p.write_text(json.dumps({"nodes": [{"device": "A100-80GB", "count": 2}, {"device": "V100-32GB", "count": 2}]}))
    return p


def test_malformed_json(examples, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [{"device": "A100-80GB", "count": 2},]}')
    _assert_clean_error(_compile(examples / "mlp.py", bad, tmp_path / "out"), tmp_path / "out", "json", "line")


def test_unknown_device(examples, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"device": "A100-80G", "count": 2}]}))
    _assert_clean_error(_compile(examples / "mlp.py", bad, tmp_path / "out"), tmp_path / "out",
                        "A100-80G", "A100-80GB")


def test_model_file_without_get_model(good_cluster, tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import torch\n\ndef make_model():\n    return torch.nn.Linear(2, 2)\n\n"
                     "def get_batch(step):\n    return torch.randn(4, 2)\n")
    _assert_clean_error(_compile(model, good_cluster, tmp_path / "out"), tmp_path / "out", "get_model",
                        "make_model")


def test_model_that_cannot_be_captured(good_cluster, tmp_path):
    model = tmp_path / "model.py"
    model.write_text(
        "import torch\n\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.l = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:  # control flow on data\n            return self.l(x).mean()\n"
        "        return x.mean()\n\n"
        "def get_model():\n    return M()\n\n"
        "def get_batch(step):\n    return torch.randn(8, 4)\n")
    _assert_clean_error(_compile(model, good_cluster, tmp_path / "out"), tmp_path / "out", "torch.export")


def test_model_that_fits_nowhere(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import torch\n\n"
                     "def get_model():\n    return torch.nn.Sequential(torch.nn.Linear(8192, 8192), "
                     "torch.nn.Linear(8192, 8192))\n\n"
                     "def get_batch(step):\n    return torch.randn(8, 8192)\n\n"
                     "def loss_fn(out, _):\n    return out.mean()\n")
    model.write_text(model.read_text().replace("return torch.randn(8, 8192)", "return torch.randn(8, 8192), torch.randn(8, 1)"))
    cluster = tmp_path / "tiny.json"
    cluster.write_text(json.dumps({"nodes": [{"device": "Tiny", "count": 2}],
                                   "devices": {"Tiny": {"fp32_tflops": 1, "mem_GB": 0.1, "mem_GBps": 10}}}))
    _assert_clean_error(_compile(model, cluster, tmp_path / "out"), tmp_path / "out", "memory")


def test_existing_output_directory_is_not_overwritten(examples, good_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = _compile(examples / "mlp.py", good_cluster, out)
    assert done.returncode == 2 and "--force" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_module_without_example_inputs_or_importable_class():
    import torch

    import hetcompile

    cluster = {"nodes": [{"device": "A100-80GB", "count": 2}]}
    with pytest.raises(hetcompile.UserError, match="example_inputs"):
        hetcompile.compile(torch.nn.Linear(4, 1), cluster)
    Local = type("Local", (torch.nn.Module,), {"__module__": "__main__"})
    with pytest.raises(hetcompile.UserError, match="importable"):
        hetcompile.compile(Local(), cluster, torch.zeros(4, 4))


def test_pinned_shape_that_cannot_fit(examples, good_cluster, tmp_path):
    """--tp/--pp/--dp pins the shape; one that cannot fit is one paragraph naming it and the fix."""
    def compile_pinned(*flags):
        return subprocess.run(CLI + [str(examples / "mlp.py"), "--cluster", str(good_cluster), "-o",
                                     str(tmp_path / "out"), *flags], capture_output=True, text=True, timeout=300)

    _assert_clean_error(compile_pinned("--pp", "2", "--dp", "3"), tmp_path / "out",
                        "needs at least 6 devices", "cluster has 4", "--tp/--pp/--dp")
    _assert_clean_error(compile_pinned("--pp", "99"), tmp_path / "out", "--pp 99", "blocks", "Pin --pp")
    # Two devices of each type: no TP group of 4 devices of one type.
    _assert_clean_error(compile_pinned("--tp", "4"), tmp_path / "out", "--tp 4", "devices of one type",
                        "leave --tp out")


def test_interleaved_schedule_where_it_cannot_apply(examples, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"nodes": [{"device": "A100-80GB", "count": 1}]}))
    out = tmp_path / "out"
    done = subprocess.run(CLI + [str(examples / "mlp.py"), "--cluster", str(one), "-o", str(out),
                                 "--schedule", "interleaved"], capture_output=True, text=True, timeout=300)
    _assert_clean_error(done, out, "interleaved schedule does not apply", "1 pipeline stage", "--schedule 1f1b")
