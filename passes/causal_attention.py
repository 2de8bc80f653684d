"""Attention under a causal mask built from sizes alone runs as causal attention.

Traced, transformers cannot take the shortcut it takes in eager mode (no mask,
``is_causal=True``): it materialises the causal mask from ``arange``s and hands it
to ``scaled_dot_product_attention`` as ``attn_mask``. With an explicit mask SDPA
cannot use its causal kernels: on a GPU it loses FlashAttention, and on the CPU
the flash kernel reads the whole mask and skips no block. On this project's
2-vCPU VM (torch profiler, the Llama example's first two layers, 8 samples of 32
tokens) the attention forward took 0.33 ms a call with the mask and 0.19 ms
causal, against 0.17-0.20 ms for the same layers run eagerly.

For each SDPA node whose mask is replicable (:mod:`passes.mark_replicable`: made
from sizes and constants only), the mask is computed for two batch sizes; when it
is the lower-triangular causal mask at both (query and key of one length, every
batch row and head alike), the node gets ``attn_mask=None, is_causal=True``, which
is the same attention, and the mask's nodes go when nothing else reads them.
"""

from __future__ import annotations

import torch
import torch.fx

from hetcompile.capture import Captured

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SDPA_ARGS = [a.name for a in SDPA._schema.arguments]  # query, key, value, attn_mask, dropout_p, is_causal, ...
# Batch sizes the mask is checked at: a mask that changes with the batch size is left alone.
_BATCHES = (1, 3)


def causal_attention(cap: Captured) -> int:
    """Rewrite the SDPA nodes of ``cap.gm`` whose mask is causal; returns how many."""
    graph, rewritten = cap.gm.graph, 0
    causal: dict[torch.fx.Node, bool] = {}  # per mask node: the layers of a model share one
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not SDPA:
            continue
        given = {**dict(zip(SDPA_ARGS, n.args)), **n.kwargs}
        mask = given.get("attn_mask")
        if not isinstance(mask, torch.fx.Node) or not mask.meta.get("replicable") or given.get("is_causal"):
            continue
        q_len, k_len = n.args[0].meta["val"].shape[-2], n.args[1].meta["val"].shape[-2]
        if not (isinstance(q_len, int) and q_len == k_len):
            continue
        if mask not in causal:
            try:
                causal[mask] = all(_is_causal(_evaluate(cap, mask, batch), q_len) for batch in _BATCHES)
            except Exception:  # noqa: BLE001 - a mask this cannot compute stays as the model built it
                causal[mask] = False
        if causal[mask]:
            options = {k: v for k, v in given.items() if k not in SDPA_ARGS[:3]}
            n.args, n.kwargs = n.args[:3], {**options, "attn_mask": None, "is_causal": True}
            rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        cap.gm.recompile()
    return rewritten


def _evaluate(cap: Captured, node: torch.fx.Node, batch: int) -> torch.Tensor | None:
    """The value of a replicable ``node`` when the batch has ``batch`` samples (None: it reads a
    buffer, which is fake at compile time)."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if not (n.op == "call_function" and n.target is aten.sym_size.int):
                stack.extend(n.all_input_nodes)
    env: dict[torch.fx.Node, object] = {}
    for n in cap.gm.graph.nodes:  # graph order is a topological order
        if n not in needed:
            continue
        if n.op == "placeholder":
            placeholder = cap.placeholders[n.name]
            if placeholder.kind != "constant":
                return None
            env[n] = cap.constants[placeholder.target]
        elif n.target is aten.sym_size.int:
            size = n.args[0].meta["val"].shape[n.args[1]]
            env[n] = int(size.node.expr.subs(cap.batch_symbol, batch)) if isinstance(size, torch.SymInt) else size
        else:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            env[n] = n.target(*args, **kwargs)
    return env[node]


def _is_causal(mask, length: int) -> bool:
    """Whether ``mask`` (boolean: True attends; or additive) is the causal mask of a sequence of ``length``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or tuple(mask.shape[-2:]) != (length, length):
        return False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if not mask.is_floating_point():
        return False
    # Additive: 0 where attended, and -inf (or the dtype's lowest, which softmax turns into 0) elsewhere.
    blocked = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min / 2)
    return bool(((mask == 0) == causal).all() and (blocked == ~causal).all())
