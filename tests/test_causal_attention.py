"""passes/causal_attention.py: a causal mask built from sizes becomes ``is_causal=True``, and nothing else does."""

import pytest
import torch

from hetcompile.compiler import analyze

SDPA = torch.ops.aten.scaled_dot_product_attention.default

_MODEL = '''
import torch

SEQ = 8


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], SEQ, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i = torch.arange(SEQ)
        mask = {mask}
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(x.shape[0], 1, SEQ, SEQ))
        return self.head(y.transpose(1, 2).reshape(x.shape[0], SEQ, 16)).mean()


def get_model():
    return Attention()


def get_batch(step):
    return torch.randn(4, SEQ, 16, generator=torch.Generator().manual_seed(step))
'''


def _sdpa(cap):
    return [n for n in cap.gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


@pytest.mark.parametrize("mask, causal", [
    ("i[None, :] <= i[:, None]", True),  # the causal mask, as transformers builds it
    ("torch.zeros(SEQ, SEQ).masked_fill(i[None, :] > i[:, None], float('-inf'))", True),  # additive
    ("i[None, :] >= i[:, None]", False),  # anti-causal
    ("(i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)", False),  # a sliding window
])
def test_only_a_causal_mask_becomes_is_causal(tmp_path, mask, causal):
    path = tmp_path / "attention.py"
    path.write_text(_MODEL.format(mask=mask))
    cap, _ = analyze(path)
    (node,) = _sdpa(cap)
    given = {**dict(zip([a.name for a in SDPA._schema.arguments], node.args)), **node.kwargs}
    assert (given.get("is_causal", False), given.get("attn_mask") is None) == (causal, causal)


@pytest.mark.parametrize("model, causal", [("llama.py", True), ("gpt2.py", True), ("bert.py", False)])
def test_transformers_models(examples, model, causal):
    """Llama and GPT-2 attend causally; BERT's padding mask depends on the batch's data and stays."""
    cap, _ = analyze(examples / model)
    nodes = _sdpa(cap)
    assert all(n.kwargs.get("is_causal", False) == causal for n in nodes)
    assert causal == bool(nodes)
