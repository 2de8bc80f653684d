"""Capture: stamping repeated layers gives the graph a full export gives."""

from collections import Counter

import torch

import passes.stamp_layers as stamp_module
from hetcompile.compiler import analyze
from hetcompile.modelfile import load_model_file
from passes.stamp_layers import repeated_layers


def _ops(cap) -> Counter:
    return Counter(str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function")


def test_stamped_layers_equal_a_full_export(examples, monkeypatch):
    mf = load_model_file(examples / "llama.py")
    stamped, stamped_costs = analyze(mf)
    monkeypatch.setattr(stamp_module, "MIN_LAYERS_TO_STAMP", 10**6)
    full, full_costs = analyze(mf)
    assert stamped_costs == full_costs
    assert _ops(stamped) == _ops(full)
    params = {p.target for p in stamped.placeholders.values() if p.kind == "param"}
    assert params == {p.target for p in full.placeholders.values() if p.kind == "param"}
    assert "model.layers.3.mlp.down_proj.weight" in params


def test_layers_that_differ_are_not_stamped():
    class Layer(torch.nn.Module):
        def __init__(self, width, act):
            super().__init__()
            self.lin = torch.nn.Linear(width, width)
            self.act = act

    same = torch.nn.Sequential(torch.nn.ModuleList(Layer(8, "gelu") for _ in range(4)))
    assert repeated_layers(same) == ("0", 4)
    mixed = torch.nn.Sequential(torch.nn.ModuleList(Layer(8, a) for a in ("gelu", "relu", "gelu", "relu")))
    assert repeated_layers(mixed) is None
    shapes = torch.nn.Sequential(torch.nn.ModuleList(Layer(w, "gelu") for w in (8, 8, 8, 16)))
    assert repeated_layers(shapes) is None


def test_every_cut_of_a_llama_sends_only_the_hidden_state(examples):
    """The later stage recomputes the masks and rotary tables it reads (lowering.replicate_shared),
    wherever the cut: copies that two of them share are defined before either's first reader."""
    import hetcompile
    from hetcompile.planner import PlanDecision, StageDecision

    mf = load_model_file(examples / "llama.py")
    _, costs = analyze(mf)
    b = costs.global_batch
    for cut in range(1, costs.num_blocks):
        decision = PlanDecision(stages=(StageDecision(0, cut - 1, (0,), (b,)),
                                        StageDecision(cut, costs.num_blocks - 1, (1,), (b,))),
                                num_microbatches=1, microbatch_size=b)
        plan = hetcompile.compile(mf, {"nodes": [{"device": "CPU", "count": 2}]}, schedule="gpipe",
                                  decision=decision)
        assert len(plan.values) == 1, (cut, [v.name for v in plan.values])
