"""Group graph nodes into blocks (layers) and sum their costs into plain data.

A block is the unit the planner assigns to pipeline stages. Nodes that run
inside one element of an ``nn.ModuleList`` (``model.transformer.h.3``) form
one block; nodes before the first such layer form a ``pre`` block (embeddings),
and those after the last one a ``post`` block (final norm, head, loss). Nodes
between layers join the layer before them. The assignment is made monotone
along every edge (a node's block is at least each input's), so every cut
between consecutive blocks is a valid pipeline cut.

Writes ``node.meta["block"]`` and returns :class:`~hetcompile.ir.ModelCosts`
(run ``annotate_costs`` first).
"""

from __future__ import annotations

import operator
import re

import torch.fx

from hetcompile.capture import Captured
from hetcompile.ir import Block, ModelCosts, SharedParams

_LAYER = re.compile(r"\.\d+$")


def _layer_path(node: torch.fx.Node) -> str | None:
    for path, _type in node.meta.get("nn_module_stack", {}).values():
        if _LAYER.search(path):
            return path
    return None


def _module_path(node: torch.fx.Node) -> str | None:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else None


def group_blocks(cap: Captured) -> ModelCosts:
    """Assign ``node.meta["block"]`` and return the blocks' costs, per sample.

    >>> costs = group_blocks(cap)  # doctest: +SKIP
    >>> [b.name for b in costs.blocks][:3]
    ['pre: transformer.wte, transformer.wpe', 'transformer.h.0', 'transformer.h.1']
    """
    graph = cap.gm.graph
    compute = [n for n in graph.nodes if n.op == "call_function"]
    layers: list[str] = []
    for n in compute:
        path = _layer_path(n)
        if path is not None and path not in layers:
            layers.append(path)
    has_pre = bool(compute) and _layer_path(compute[0]) is None
    offset = 1 if has_pre else 0
    current = 0
    for n in compute:
        path = _layer_path(n)
        if path is not None:
            current = layers.index(path) + offset
        elif layers and current == len(layers) - 1 + offset:
            current = len(layers) + offset  # outside any layer, once the last layer has started: post
        block = current
        for inp in n.all_input_nodes:
            block = max(block, inp.meta.get("block", 0))
        n.meta["block"] = block
        current = max(current, block)
    num_blocks = max((n.meta["block"] for n in compute), default=0) + 1
    for n in graph.nodes:
        if n.op != "call_function":
            n.meta["block"] = -1  # placeholders and outputs belong to no block

    names = []
    for b in range(num_blocks):
        nodes = [n for n in compute if n.meta["block"] == b]
        paths = [p for p in dict.fromkeys(_layer_path(n) for n in nodes) if p]
        if len(paths) == 1 and b - offset < len(layers) and layers[b - offset] == paths[0]:
            names.append(paths[0].removeprefix("model."))
        else:
            mods = [p.removeprefix("model.") for p in dict.fromkeys(_module_path(n) for n in nodes)
                    if p and p != "model" and not _LAYER.search(p) and not p.startswith("_")]
            label = "pre" if b == 0 and has_pre else "post"
            names.append(f"{label}: {', '.join(mods[:3]) or 'loss'}{', ...' if len(mods) > 3 else ''}")

    per = 1.0 / cap.global_batch
    param_bytes = [0] * num_blocks
    num_params = [0] * num_blocks
    num_param_tensors = [0] * num_blocks
    shared: dict[tuple[int, ...], list[int]] = {}  # blocks -> [bytes, tensors] of params they share
    for n in graph.nodes:
        if n.op == "placeholder" and cap.placeholders[n.name].kind == "param" and n.users:
            users = sorted({u.meta["block"] for u in n.users})
            first = users[0]
            val = n.meta["val"]
            param_bytes[first] += val.numel() * val.element_size()
            num_params[first] += val.numel()
            num_param_tensors[first] += 1
            if len(users) > 1:
                entry = shared.setdefault(tuple(users), [0, 0])
                entry[0] += val.numel() * val.element_size()
                entry[1] += 1
    out_bytes = [0.0] * num_blocks
    for n in compute:
        if n.meta.get("replicable"):
            continue  # the reading stage recomputes it (passes/mark_replicable.py)
        users = [u.meta["block"] for u in n.users if u.op == "call_function"]
        for b in range(n.meta["block"], max(users, default=-1)):
            out_bytes[b] += n.meta["out_bytes"]
    blocks = []
    for b in range(num_blocks):
        nodes = [n for n in compute if n.meta["block"] == b]
        blocks.append(Block(
            index=b, name=names[b],
            fwd_flops_per_sample=sum(n.meta["flops"] for n in nodes) * per,
            fwd_bytes_per_sample=sum(n.meta["bytes"] for n in nodes) * per,
            param_bytes=param_bytes[b], num_params=num_params[b],
            act_bytes_per_sample=sum(n.meta["out_bytes"] for n in nodes if n.meta.get("requires_grad")) * per,
            out_bytes_per_sample=out_bytes[b] * per,
            # getitem only unpacks a tuple in Python; it dispatches no ATen op.
            num_ops=sum(1 for n in nodes if n.target is not operator.getitem),
            num_grad_ops=sum(1 for n in nodes if n.target is not operator.getitem and n.meta.get("requires_grad")),
            num_param_tensors=num_param_tensors[b],
            num_matmul_ops=sum(1 for n in nodes if n.meta["flops"] > 0),
        ))
    return ModelCosts(blocks=tuple(blocks), global_batch=cap.global_batch, dtype=cap.dtype,
                      shared_params=tuple(SharedParams(b, *entry) for b, entry in sorted(shared.items())))

