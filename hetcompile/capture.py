"""Capture: the training loss as an FX graph, on fake tensors.

``torch.export`` (non-strict) traces :class:`~hetcompile.modelfile.TrainingLoss`
with the batch dimension of every input marked dynamic, so the graph is valid
for any micro-batch size and every node's ``meta["val"]`` carries a symbolic
shape in which the batch size is one symbol. The model is built under a
``FakeTensorMode``: planning never materialises the weights.

The captured graph has the parameters, buffers and constants lifted to
placeholders; :class:`Captured` records what each placeholder is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from hetcompile.errors import UserError
from hetcompile.modelfile import ModelFile, TrainingLoss
from passes.stamp_layers import repeated_layers, stamp_layers

log = logging.getLogger(__name__)

# The wrapper module's attribute that holds the user's model: stripped from names.
_PREFIX = "model."
# What export asserts about shapes and dtypes, which holds by construction for every micro-batch:
# dropped from the captured graph (and from the regions passes/inline_grad_regions.py inlines).
ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
              torch.ops.aten.sym_constrain_range_for_size.default)


@dataclass(frozen=True)
class Placeholder:
    """What one graph input is: a parameter, buffer or constant (by name) or the i-th batch tensor."""

    kind: str  # "param" | "buffer" | "constant" | "input"
    target: str  # parameter/buffer name in get_model()'s state dict, constant name, or "" for inputs
    input_index: int = -1


@dataclass
class Captured:
    """The captured training loss, and what the rest of the compiler needs to know about it."""

    gm: torch.fx.GraphModule
    placeholders: dict[str, Placeholder]  # placeholder node name -> what it is
    constants: dict[str, torch.Tensor]  # real values of lifted constants, by target
    batch_symbol: object  # the sympy symbol of the batch size in node.meta["val"] shapes
    global_batch: int
    batch_spec: pytree.TreeSpec
    dtype: str  # "fp32" | "bf16" | "fp16", of the parameters


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@contextlib.contextmanager
def _no_stack_traces():
    import torch.fx.config as fx_config

    previous = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = previous


@contextlib.contextmanager
def _quiet_logs():
    """Silence library warnings (transformers, torch) while tracing: the CLI reports problems itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def capture(mf: ModelFile, *, seed: int = 0) -> Captured:
    """Build the model on fake tensors and export its training loss with a dynamic batch dimension.

    >>> cap = capture(load_model_file("examples/mlp.py"))  # doctest: +SKIP
    >>> cap.global_batch
    32
    """
    flat, spec = mf.flat_batch(0)
    batch_size = flat[0].shape[0]
    if batch_size < 2:
        raise UserError(f"{mf.path.name}: get_batch(0) has batch size {batch_size}; hetcompile splits the "
                        "batch across devices and micro-batches, so it needs at least 2 samples. Return a "
                        "larger global batch.")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        try:
            model = mf.build_model(seed)
        except Exception as e:
            raise UserError(f"get_model() in {mf.path.name} failed while building the model on fake tensors: "
                            f"{type(e).__name__}: {e}. hetcompile builds the model without real weights, so "
                            "get_model() must not read tensor values (no .item(), .tolist() or numpy on weights) "
                            "and must not load files of weights.") from e
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"get_model() in {mf.path.name} returned a {type(model).__name__}; it must return a "
                        "torch.nn.Module.")
    model.train()
    root = TrainingLoss(model, mf.loss_fn, spec)
    fake_flat = tuple(mode.from_tensor(t) for t in flat)
    stack = repeated_layers(model)
    if stack is not None:
        # Deep stacks of identical layers: trace two of them, copy the rest (passes/stamp_layers.py).
        path, num_layers = stack
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        full = getattr(parent, attr)
        setattr(parent, attr, torch.nn.ModuleList(list(full)[:2]))
        try:
            ep = _export(root, fake_flat, mf)
        finally:
            setattr(parent, attr, full)
        cap = _from_exported(ep, batch_size, spec, mf)
        stamped = stamp_layers(cap.gm, cap.placeholders, f"{_PREFIX}{path}", num_layers, Placeholder)
        if stamped is not None:
            return dataclasses.replace(cap, placeholders=stamped)
        log.info("layers of %s are not copies of each other once traced; exporting the whole model", path)
    return _from_exported(_export(root, fake_flat, mf), batch_size, spec, mf)


def _export(root: torch.nn.Module, fake_flat: tuple, mf: ModelFile):
    """torch.export (non-strict) with every input's dim 0 dynamic; failures become one clear UserError."""
    batch = Dim("batch", min=1)
    noise = io.StringIO()  # export prints the graph on failure; the error below says what matters
    try:
        # Stack traces per node cost a third of export's time on deep models, and nothing reads them.
        with contextlib.redirect_stderr(noise), contextlib.redirect_stdout(noise), _quiet_logs(), \
                _no_stack_traces():
            return torch.export.export(root, fake_flat, dynamic_shapes=(tuple({0: batch} for _ in fake_flat),),
                                       strict=False)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"torch.export could not capture {mf.path.name} with a dynamic batch dimension: "
            f"{type(e).__name__}: {first[:400]}. hetcompile needs a model whose forward is traceable by "
            "torch.export (non-strict) and works for any batch size: avoid Python control flow on tensor "
            "values and on the batch size, and shapes computed from data.") from e


def _from_exported(ep, batch_size, spec, mf) -> Captured:
    sig = ep.graph_signature
    mutations = [s for s in sig.output_specs if s.kind != OutputKind.LOSS_OUTPUT and s.kind != OutputKind.USER_OUTPUT]
    if mutations:
        names = ", ".join(str(s.target) for s in mutations[:3])
        raise UserError(f"{mf.path.name}: the model updates buffers in its forward ({names}), for example "
                        "BatchNorm's running statistics; hetcompile cannot yet keep such state consistent across "
                        "a split batch. Use LayerNorm/GroupNorm, or freeze the statistics.")
    placeholders: dict[str, Placeholder] = {}
    input_index = 0
    for s in sig.input_specs:
        name = s.arg.name
        if s.kind == InputKind.PARAMETER:
            placeholders[name] = Placeholder("param", s.target.removeprefix(_PREFIX))
        elif s.kind == InputKind.BUFFER:
            placeholders[name] = Placeholder("buffer", s.target.removeprefix(_PREFIX))
        elif s.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            placeholders[name] = Placeholder("constant", s.target)
        elif s.kind == InputKind.USER_INPUT:
            placeholders[name] = Placeholder("input", "", input_index)
            input_index += 1
        else:
            raise UserError(f"{mf.path.name}: unsupported graph input kind {s.kind.name} for {name}.")
    constants = {}
    constant_targets = {p.target for p in placeholders.values() if p.kind == "constant"}
    for key, value in ep.constants.items():
        if key not in constant_targets:
            continue  # a non-persistent buffer: loaded from the model at run time
        if isinstance(value, FakeTensor):
            # A constant created in forward from data we did not see; a buffer would be loaded at run time.
            raise UserError(f"{mf.path.name}: the model creates a tensor constant {key!r} with values in "
                            "forward; hetcompile cannot recover its values from a fake capture. Register it "
                            "as a buffer in __init__ (self.register_buffer(...)).")
        constants[key] = value.detach().clone()

    # NOTE: [lazy recompile] Capture and the passes rewrite the graph several times (stamping,
    # inlining) and nothing calls the module in between; regenerating its Python code after each
    # rewrite costs about a second on a deep model. A _LazyGraphModule regenerates it only when
    # someone calls it or reads its code.
    gm = _LazyGraphModule.from_graphmodule(ep.graph_module)
    # Export leaves shape assertions in the graph; they hold by construction for every micro-batch.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTIONS:
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()

    batch_symbol = None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and placeholders[node.name].kind == "input":
            batch_symbol = node.meta["val"].shape[0].node.expr
            break
    params = [p for p in placeholders.values() if p.kind == "param"]
    dtype = "fp32"
    for node in gm.graph.nodes:
        if node.op == "placeholder" and placeholders[node.name].kind == "param":
            dtype = _dtype_name(node.meta["val"].dtype)
            break
    log.info("captured %d nodes, %d parameters", len(gm.graph.nodes), len(params))
    return Captured(gm=gm, placeholders=placeholders, constants=constants, batch_symbol=batch_symbol,
                    global_batch=batch_size, batch_spec=spec, dtype=dtype)
