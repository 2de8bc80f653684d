"""passes/grouped_attention.py: repeated key/value heads become ``enable_gqa=True``, and nothing else does."""

import pytest
import torch

from hetcompile.compiler import analyze

aten = torch.ops.aten


@pytest.mark.parametrize("model, grouped", [("llama.py", True), ("gpt2.py", False)])
def test_repeated_key_value_heads_become_grouped_attention(examples, model, grouped):
    """Llama's 4 query heads read 2 key/value heads, no longer repeated; GPT-2 has no groups."""
    cap, _ = analyze(examples / model)
    sdpa = aten.scaled_dot_product_attention.default
    nodes = [n for n in cap.gm.graph.nodes if n.op == "call_function" and n.target is sdpa]
    assert nodes and all(n.kwargs.get("enable_gqa", False) == grouped for n in nodes)
    if grouped:
        assert all(n.args[1].meta["val"].shape[1] == 2 and n.args[0].meta["val"].shape[1] == 4 for n in nodes)
        assert not any(n.target is aten.expand.default for n in cap.gm.graph.nodes)  # the copies are gone


def test_grouped_attention_is_the_same_attention():
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    repeated = [x[:, :, None].expand(2, 2, 2, 8, 16).reshape(2, 4, 8, 16) for x in (k, v)]
    assert torch.allclose(aten.scaled_dot_product_attention.default(q, *repeated, is_causal=True),
                          aten.scaled_dot_product_attention.default(q, k, v, is_causal=True, enable_gqa=True))
