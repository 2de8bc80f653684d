"""Mark values any pipeline stage can recompute: those built only from sizes, buffers and constants.

Rotary tables and causal masks are built once before the first layer and read
by every layer. Sending them from stage to stage would move, for a causal mask,
``batch x seq x seq`` elements per micro-batch; yet they depend on no batch data
and no parameter. A stage that reads such a value recomputes it instead
(:func:`hetcompile.lowering.replicate_shared`), and the cost model leaves it out
of the bytes that cross a cut (:mod:`passes.group_blocks`).

Writes ``node.meta["replicable"]`` (bool) on every ``call_function`` node: true
when the node and its ancestors read only buffers, constants and tensor sizes,
draw no random numbers, and number at most :data:`MAX_REPLICATED_NODES`.
"""

from __future__ import annotations

import torch
import torch.fx

from hetcompile.capture import Captured

# A shared subgraph larger than this is left to be sent: recomputing it in every stage costs more.
MAX_REPLICATED_NODES = 64


def mark_replicable(cap: Captured) -> None:
    """Set ``node.meta["replicable"]`` on the call_function nodes of ``cap.gm``."""
    free: dict[torch.fx.Node, bool] = {}
    ancestors: dict[torch.fx.Node, frozenset] = {}
    for n in cap.gm.graph.nodes:
        if n.op == "placeholder":
            free[n] = cap.placeholders[n.name].kind in ("buffer", "constant")
            ancestors[n] = frozenset()
        elif n.op == "call_function":
            if n.target is torch.ops.aten.sym_size.int:
                ok, anc = True, frozenset()  # a size, never the data
            else:
                random = isinstance(n.target, torch._ops.OpOverload) and \
                    torch.Tag.nondeterministic_seeded in n.target.tags
                ok = not random and all(free.get(a, False) for a in n.all_input_nodes)
                anc = frozenset().union(*(ancestors[a] | {a} for a in n.all_input_nodes
                                          if a.op == "call_function")) if ok else frozenset()
                ok = ok and len(anc) < MAX_REPLICATED_NODES
            free[n], ancestors[n] = ok, anc
            n.meta["replicable"] = ok
