"""Inline ``torch.no_grad()`` regions that torch.export wraps in a higher-order op.

``torch.export`` keeps a ``with torch.no_grad():`` block (Llama's rotary
embedding, for one) as ``wrap_with_set_grad_enabled(False, submod, *args)``.
Stage code is easier to split and read as one flat graph, so this pass copies
the region's nodes into the parent graph and detaches the region's outputs,
which keeps the semantics: nothing computed there receives a gradient.
"""

from __future__ import annotations

import torch
import torch.fx

from hetcompile.capture import ASSERTIONS
from hetcompile.errors import UserError


def inline_grad_regions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inline every ``wrap_with_set_grad_enabled`` node of ``gm`` in place and return it."""
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hop:
            continue
        enabled, sub_attr, *args = node.args
        if enabled:
            raise UserError("The model enables gradients inside a no_grad region (torch.enable_grad() in "
                            "forward); hetcompile cannot split such a region yet. Remove the enable_grad block.")
        sub = getattr(gm, sub_attr.target)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, arg in zip(placeholders, args):
            env[ph] = arg
        outputs = None
        with gm.graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = torch.fx.map_arg(inner.args[0], lambda n: env[n])
                    continue
                if inner.op == "call_function" and inner.target in ASSERTIONS and not inner.users:
                    continue  # as capture drops them from the graph around the region
                new = gm.graph.node_copy(inner, lambda n: env[n])
                new.meta = dict(inner.meta)
                new.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack", {}))
                env[inner] = new
            detached = []
            for out in outputs:
                d = gm.graph.call_function(torch.ops.aten.detach.default, (out,))
                d.meta = dict(out.meta)
                detached.append(d)
        for user in list(node.users):
            assert user.op == "call_function" and user.target.__name__ == "getitem", user
            user.replace_all_uses_with(detached[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        gm.graph.erase_node(sub_attr)
        delattr(gm, sub_attr.target)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
