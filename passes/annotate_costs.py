"""Annotate every node with its cost and its relation to the batch.

Writes into ``node.meta``:

- ``"flops"``: forward FLOPs at the capture batch size, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` while the node runs on fake
  tensors of concrete shape (so composite ops such as ``aten.linear`` are
  counted through their decomposition),
- ``"bytes"``: bytes the node reads and writes (tensor inputs and outputs),
- ``"out_bytes"``: bytes of the node's output,
- ``"batch_coef"``: for a tensor whose dim 0 is ``k * batch``, ``k``; ``0`` for a
  tensor without the batch; ``None`` when the batch is on another dim,
- ``"requires_grad"``: whether the value depends on a parameter through a
  floating-point path, that is, whether backward sends it a gradient.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from hetcompile.capture import Captured
from passes.stamp_layers import STAMPED_FROM


# NOTE: [attention FLOPs on CPU] On a CPU fake tensor, scaled_dot_product_attention
# dispatches to the CPU flash kernel, which flop_counter has no formula for; it
# is the same computation as the CUDA flash kernel, so count it the same way.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _hint(x):
    if isinstance(x, torch.SymInt):
        return x.node.hint
    return x


def _concrete_fake(val, mode: FakeTensorMode):
    if isinstance(val, torch.Tensor):
        with mode:
            return torch.empty([_hint(s) for s in val.shape], dtype=val.dtype, device=val.device)
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(val)
    return val


def _tensor_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


def batch_coef(val, batch_symbol) -> int | None:
    """``k`` when dim 0 of ``val`` is ``k * batch``; 0 when ``val`` has no batch; None otherwise."""
    if not isinstance(val, torch.Tensor):
        return 0
    exprs = [s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(s) for s in val.shape]
    if any(batch_symbol in e.free_symbols for e in exprs[1:]):
        return None
    if not exprs or batch_symbol not in exprs[0].free_symbols:
        return 0
    coef = sympy.simplify(exprs[0] / batch_symbol)
    return int(coef) if coef.is_Integer else None


def annotate_costs(cap: Captured) -> None:
    """Run the graph once on concrete fake tensors and write the costs into ``node.meta``.

    A stamped copy of a layer (passes/stamp_layers.py) runs the same ops on the same shapes as
    the layer-1 node it copies: it takes that node's costs and output instead of running again.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[torch.fx.Node, object] = {}
    param_names = {n for n, p in cap.placeholders.items() if p.kind == "param"}
    by_name = {node.name: node for node in cap.gm.graph.nodes}
    for node in cap.gm.graph.nodes:
        val = node.meta.get("val")
        source = by_name.get(node.meta.get(STAMPED_FROM, ""))
        if node.op == "call_function" and source is not None and source in env:
            env[node] = env[source]
            for key in ("flops", "out_bytes", "bytes", "batch_coef"):
                node.meta[key] = source.meta[key]
            floating = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
            node.meta["requires_grad"] = (floating and node.target is not torch.ops.aten.detach.default
                                          and any(n.meta.get("requires_grad") for n in node.all_input_nodes))
            continue
        if node.op == "placeholder":
            env[node] = _concrete_fake(val, mode)
            node.meta["requires_grad"] = node.name in param_names
        elif node.op == "call_function":
            args = torch.fx.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.map_arg(node.kwargs, lambda n: env[n])
            # A fresh counter per node: FlopCounterMode resets its totals on entry.
            counter = FlopCounterMode(display=False)
            with mode, counter:
                out = node.target(*args, **kwargs)
            env[node] = out
            node.meta["flops"] = counter.get_total_flops()
            inputs = [env[n] for n in node.all_input_nodes]
            node.meta["out_bytes"] = _tensor_bytes(out)
            node.meta["bytes"] = node.meta["out_bytes"] + sum(_tensor_bytes(v) for v in inputs)
            floating = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
            node.meta["requires_grad"] = (floating and node.target is not torch.ops.aten.detach.default
                                          and any(n.meta.get("requires_grad") for n in node.all_input_nodes))
        elif node.op == "get_attr":
            env[node] = getattr(cap.gm, node.target)
            node.meta["requires_grad"] = False
        node.meta["batch_coef"] = batch_coef(val, cap.batch_symbol)
