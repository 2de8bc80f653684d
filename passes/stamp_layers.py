"""Stamp repeated layers: trace two layers of a deep stack, then copy the second one.

``torch.export`` costs about a second per transformer layer, so a 96-layer model
would spend minutes in capture although its layers are copies of one another.
When a model's deepest stack of layers (an ``nn.ModuleList``) holds layers that
are structurally identical, :func:`repeated_layers` finds it, capture exports
the model with only its first two layers, and :func:`stamp_layers` rebuilds the
full graph: layer ``i`` (``i >= 2``) is a copy of layer 1's nodes whose inputs
from layer 0 are rewired to layer ``i - 1`` and whose parameters and buffers
are new placeholders named for layer ``i``. Whatever follows the stack (final
norm, head, loss) then reads the last layer's outputs.

Two layers, not one, because layer 1 shows how a layer reads its predecessor
(and what it shares with every layer, such as masks and rotary tables built
before the stack); layer 0 reads from the embeddings instead.

The copy is exact when every layer runs the same code on parameters of the
same shapes; :func:`repeated_layers` checks that the layers agree on their
module types, parameter and buffer shapes and plain attributes (apart from
their index), and :func:`stamp_layers` checks that layers 0 and 1 traced to
the same operators. Otherwise capture exports the whole model.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

log = logging.getLogger(__name__)

# Below this many layers a full export is cheap enough.
MIN_LAYERS_TO_STAMP = 4
# node.meta key of a copied node (and of a copied layer's parameter placeholder): the name of the
# layer-1 node it copies. Analyses that give every copy the same answer (costs, tensor parallelism)
# compute it once on layer 1 and reuse it (passes/annotate_costs.py, passes/partition_ops.py).
STAMPED_FROM = "stamped_from"
# Attributes that legitimately differ between otherwise identical layers.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_number", "idx", "index"})


def _signature(module: torch.nn.Module) -> tuple:
    """What must agree between two layers for one's graph to be a copy of the other's."""
    parts = []
    for name, sub in module.named_modules():
        plain = tuple(sorted((k, v) for k, v in vars(sub).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRS
                             and isinstance(v, (bool, int, float, str, type(None)))))
        tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad if isinstance(t, torch.nn.Parameter) else None)
                        for n, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
                        if t is not None)
        parts.append((name, type(sub).__qualname__, plain, tensors))
    return tuple(parts)


def repeated_layers(model: torch.nn.Module) -> tuple[str, int] | None:
    """The path (in ``model``) and length of the largest stack of identical layers worth stamping, or None."""
    best = None
    seen_params: set[int] = set()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < MIN_LAYERS_TO_STAMP:
            continue
        sig = _signature(module[0])
        if any(_signature(layer) != sig for layer in module[1:]):
            continue
        params = [id(p) for layer in module for p in layer.parameters()]
        if len(set(params)) != len(params) or seen_params & set(params):
            continue  # layers share weights (ALBERT-style): one graph per layer is not a copy
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (path, len(module), size)
    return None if best is None else (best[0], best[1])


def _layer_index(node: torch.fx.Node, list_path: str) -> int | None:
    for path, _type in node.meta.get("nn_module_stack", {}).values():
        if path.startswith(list_path + "."):
            head = path[len(list_path) + 1:].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _renamed_stack(stack: dict, list_path: str, i: int) -> dict:
    old, new = f"{list_path}.1", f"{list_path}.{i}"

    def rename(s: str) -> str:
        return new + s[len(old):] if s == old or s.startswith(old + ".") else s

    out = {}
    for key, (path, typ) in stack.items():
        key = key.replace(f"{list_path}.1", f"{list_path}.{i}") if isinstance(key, str) else key
        out[key] = (rename(path), typ)
    return out


def stamp_layers(gm: torch.fx.GraphModule, placeholders: dict, list_path: str, num_layers: int,
                 placeholder_type) -> dict | None:
    """Grow a graph traced with layers 0 and 1 of ``list_path`` to ``num_layers`` layers, in place.

    ``list_path`` is the stack's path in the graph's module stacks (``model.model.layers``);
    ``placeholders`` maps placeholder names to what they are (``kind``, ``target``; targets
    are relative to the user's model). Returns the new placeholder map, or None (graph
    untouched) when the traced layers are not copies of each other.
    """
    graph = gm.graph
    compute = [n for n in graph.nodes if n.op == "call_function"]
    index = {n: _layer_index(n, list_path) for n in compute}
    layer0 = [n for n in compute if index[n] == 0]
    layer1 = [n for n in compute if index[n] == 1]
    if not layer0 or len(layer0) != len(layer1) or any(a.target != b.target for a, b in zip(layer0, layer1)):
        return None
    first0, last1 = compute.index(layer0[0]), compute.index(layer1[-1])
    middle = compute[first0:last1 + 1]
    if any(index[n] not in (0, 1) for n in middle):
        return None  # something runs between the layers: not a plain stack
    set0, set1 = set(layer0), set(layer1)
    post = [n for n in compute[last1 + 1:]]
    if any(a in set0 for n in post for a in n.all_input_nodes):
        return None  # the head reads layer 0 directly: layers are not a chain
    pos0 = {n: k for k, n in enumerate(layer0)}

    target_prefix = list_path.removeprefix("model.") + "."  # placeholder targets drop the wrapper's "model."
    own = {}  # layer 1's parameter/buffer placeholders: name -> target suffix after "<prefix>1."
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        ph = placeholders[n.name]
        if ph.kind in ("param", "buffer") and ph.target.startswith(f"{target_prefix}1."):
            own[n] = ph.target[len(f"{target_prefix}1."):]
        elif ph.kind in ("param", "buffer") and ph.target.startswith(target_prefix) and \
                not ph.target.startswith(f"{target_prefix}0."):
            return None  # a deeper layer already traced: not the two-layer capture we expect

    placeholders = dict(placeholders)
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    prev = {n: n for n in layer1}  # layer i-1's node for each layer-1 node
    anchor = post[0] if post else next(n for n in graph.nodes if n.op == "output")
    for i in range(2, num_layers):
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for ph, suffix in own.items():
            kind = placeholders[ph.name].kind
            target = f"{target_prefix}{i}.{suffix}"
            with graph.inserting_after(last_placeholder):
                new = graph.placeholder(("p_" if kind == "param" else "b_") + f"model.{target}".replace(".", "_"))
            new.meta = {**ph.meta, STAMPED_FROM: ph.name}
            placeholders[new.name] = placeholder_type(kind, target)
            env[ph] = new
            last_placeholder = new

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            if a in env:
                return env[a]
            if a in set0:
                return prev[layer1[pos0[a]]]  # what layer 1 read from layer 0, layer i reads from layer i-1
            return a  # shared: built before the stack, or a constant

        with graph.inserting_before(anchor):
            for n in layer1:
                new = graph.node_copy(n, arg)
                new.meta = {**n.meta, STAMPED_FROM: n.name,
                            "nn_module_stack": _renamed_stack(n.meta.get("nn_module_stack", {}), list_path, i)}
                env[n] = new
        prev = {n: env[n] for n in layer1}
    post_set = set(post) | {next(n for n in graph.nodes if n.op == "output")}
    for n in layer1:
        if prev[n] is not n:
            n.replace_all_uses_with(prev[n], delete_user_cb=lambda user: user in post_set)
    gm.recompile()
    log.info("stamped %s: traced 2 layers, copied to %d", list_path, num_layers)
    return placeholders
