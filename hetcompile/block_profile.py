"""Profile the model's own blocks: forward and backward time of each distinct block, on this device.

A device profile's generic kernels (a square-ish matmul, an elementwise mix, a
chain of tiny ATen calls) miss what a model's layers actually run: thin
matmuls, GELU, layer norm, softmax, and their backward. So, as nnScaler and
Metis do, time the layers themselves:

1. capture the model (:func:`hetcompile.compiler.analyze`) and run the whole
   captured graph on the real weights and a real batch of ``n`` samples, to
   get real values for every block's inputs;
2. cut each distinct block (:func:`block_signature`: identical layers share one)
   out of the graph as its own ``GraphModule``, which calls the same ATen ops
   the emitted stage programs call;
3. time its forward (autograd recording, as a rank runs it) and its forward +
   backward (gradients of the block's outputs fed in, as a rank receives them)
   at a few ``n``, in interleaved rounds, by this process's CPU time on a
   one-thread CPU (NOTE: [CPU time of a block]), and the whole graph beside
   them; take out what timing a block as its own graph adds (the parts' sum
   less the whole, per extra part: NOTE: [one call per stage]), which a stage
   pays once, not once per block; fit ``t = fixed + per_sample * n`` to each
   (:class:`cost_models.profile.BlockTime`).

The predictor uses a device's measured block times where its profile has the
block's signature, and the kernel-level model otherwise
(:func:`cost_models.roofline.block_time_s`). Beside the blocks, the model file's
own optimizer is timed (:func:`measure_model_optimizer`): a step costs what
that optimizer does, not what AdamW does.

>>> times, _ = measure_blocks("examples/mlp.py", sizes=(1, 2, 4))  # doctest: +SKIP
>>> times[0].signature == block_signatures(*analyze("examples/mlp.py"))[0]  # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import logging
import operator
import statistics
import time

import torch
import torch.fx

from cost_models.profile import BlockTime, OptimizerTime, fit_overhead_and_rate, torch_threads

logger = logging.getLogger(__name__)

# The smallest micro-batch sizes (samples per call) the blocks are timed at; block_sizes goes on
# doubling up to the model's batch.
BLOCK_SIZES = (1, 2, 4, 8, 16)


def block_sizes(global_batch: int) -> tuple[int, ...]:
    """Samples per call to time the blocks at: BLOCK_SIZES, then doubling, up to the model's
    batch (no rank runs more in one call), and the batch itself: the cost model reads the measured
    curve between them (NOTE: [measured curve] in cost_models/profile.py).

    >>> block_sizes(8), block_sizes(96)
    ((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32, 64, 96))
    """
    sizes = list(BLOCK_SIZES)
    while sizes[-1] * 2 < global_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < global_batch:
        sizes.append(global_batch)
    return tuple(sizes)


def _block_of(n: torch.fx.Node) -> int:
    # A tuple never crosses stages, its items do (lowering.assign_stages): getitem goes with its tuple.
    if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
        return _block_of(n.args[0])
    return n.meta.get("block", -1)


def _describe(v, batch_symbol) -> str:
    """A value's type, shape and dtype with the batch size written ``B``: what identical layers share."""
    if isinstance(v, torch.Tensor):
        dims = []
        for s in v.shape:
            expr = s.node.expr if isinstance(s, torch.SymInt) else s
            dims.append(str(expr).replace(str(batch_symbol), "B"))
        return f"T[{','.join(dims)}]{str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_describe(x, batch_symbol) for x in v) + ")"
    if isinstance(v, torch.SymInt):
        return str(v.node.expr).replace(str(batch_symbol), "B")
    return type(v).__name__


def _block_nodes(gm: torch.fx.GraphModule, block: int) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and _block_of(n) == block]


def block_signature(cap, block: int) -> str:
    """A stable hash of what block ``block`` computes: its ops in order, how they connect, their
    shapes (batch as ``B``), dtypes, constant arguments and which inputs need gradients; not node
    or parameter names.

    Identical layers (``h.1``, ``h.2``, ...) get one signature and so share one measurement.
    """
    nodes = _block_nodes(cap.gm, block)
    local = {n: f"%{i}" for i, n in enumerate(nodes)}
    external: dict[torch.fx.Node, str] = {}

    def ref(a):
        if isinstance(a, torch.fx.Node):
            if a in local:
                return local[a]
            if a not in external:
                # Whether the input needs a gradient changes the backward (a layer's first input
                # does not: its backward computes no input gradient) and so the time.
                grad = "+grad" if a.meta.get("requires_grad") else ""
                external[a] = f"in{len(external)}:{_describe(a.meta.get('val'), cap.batch_symbol)}{grad}"
            return external[a]
        if isinstance(a, (tuple, list)):
            return "(" + ",".join(ref(x) for x in a) + ")"
        if isinstance(a, torch.dtype):
            return str(a)
        return repr(a)

    lines = []
    for n in nodes:
        kwargs = ",".join(f"{k}={ref(v)}" for k, v in sorted(n.kwargs.items()))
        lines.append(f"{getattr(n.target, '__name__', str(n.target))}({ref(n.args)};{kwargs})"
                     f"->{_describe(n.meta.get('val'), cap.batch_symbol)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def block_signatures(cap, costs) -> list[str]:
    """:func:`block_signature` of every block of ``costs``, in order."""
    return [block_signature(cap, b) for b in range(costs.num_blocks)]


def _split_block(gm: torch.fx.GraphModule, block: int):
    """Block ``block`` as its own GraphModule: (module, external input nodes, output nodes)."""
    nodes = _block_nodes(gm, block)
    inside = set(nodes)
    inputs: list[torch.fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    g = torch.fx.Graph()
    env = {a: g.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(torch.nn.Module(), g), inputs, outputs


def _real_values(cap, mf, samples: int, device) -> dict[torch.fx.Node, object]:
    """Every node's value when the captured graph runs on the real model and ``samples`` real samples."""
    model = mf.build_model(0)
    flat, _ = mf.flat_batch(0)
    args = []
    for n in cap.gm.graph.nodes:
        if n.op != "placeholder":
            continue
        p = cap.placeholders[n.name]
        if p.kind == "param":
            args.append(model.get_parameter(p.target).detach().to(device))
        elif p.kind == "buffer":
            args.append(model.get_buffer(p.target).detach().to(device))
        elif p.kind == "constant":
            args.append(cap.constants[p.target].to(device))
        else:
            x = flat[p.input_index]
            reps = -(-samples // x.shape[0])  # more samples than the batch: repeat it
            args.append(torch.cat([x] * reps)[:samples].to(device))
    values: dict[torch.fx.Node, object] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        _Recorder(cap.gm).run(*args)
    return values


def _time_once_s(fn, sync, clock) -> float:
    start = clock()
    fn()
    sync()
    return clock() - start


def _timer(device: str, num_threads: int):
    """(torch device, sync, clock) to time work on ``device`` with: sync waits for a GPU's queue,
    clock is :func:`_clock`."""
    from cost_models.profile import _device

    dev, sync_stmt, _ = _device(device)
    return dev, (torch.cuda.synchronize if sync_stmt else (lambda: None)), _clock(device, num_threads)


def _clock(device: str, num_threads: int):
    """The clock a block is timed with.

    # NOTE: [CPU time of a block] On a CPU with one torch thread a block's work is this
    # process's CPU time; wall time adds whatever other processes take of the core
    # meanwhile (on a shared machine, several times the work), which is not the
    # device's speed and changes by the minute. With more threads, or on a GPU (time
    # to synchronize), wall time.
    """
    if device == "cpu" and num_threads == 1:
        return time.process_time
    return time.perf_counter


class _BlockRunner:
    """One block at one size, ready to time: its forward, and its forward + backward, as a rank runs them."""

    def __init__(self, gm_block, in_values, needs_grad):
        gen = torch.Generator().manual_seed(0)
        self.gm = gm_block
        self.leaves = []
        for v, grad in zip(in_values, needs_grad):
            if isinstance(v, torch.Tensor):
                v = v.detach().clone()
                if grad:
                    v.requires_grad_(True)
            self.leaves.append(v)
        outs = self.forward()
        # The gradients a rank would receive for the block's outputs (1 for the loss).
        self.grads = [torch.ones_like(o) if o.dim() == 0 else
                      (torch.randn(o.shape, generator=gen) * 1e-3).to(o.device, o.dtype)
                      for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def forward(self):
        return self.gm(*self.leaves)

    def forward_backward(self) -> None:
        diff = [o for o in self.forward() if isinstance(o, torch.Tensor) and o.requires_grad]
        if diff:
            torch.autograd.backward(diff, self.grads)


WHOLE = -1  # the key of the whole captured graph's runner, beside the blocks


# NOTE: [one call per stage] Each block is timed as its own graph (and its own backward call),
# cold, between other blocks' timings; a stage runs all its blocks in one graph and one backward
# call. Each part's time is its work plus one call's overhead h, and the whole graph's is the
# work of all plus one h, so h = (sum of parts - whole) / (N - 1) for N blocks, per size, taken
# as the median over sizes. It comes out of every block, and the predictor charges it once per
# stage and micro-batch (roofline.stage_call_overhead_s), so that the blocks of a stage add up to
# about what the stage takes. (A graph of one op, timed alone, took the op's own cost out too: tiny
# blocks measured 0, and the MLP's stage came out 2-4x shorter than it runs.) Clipped to
# [0, the smallest part], so no block's time goes negative.
def _call_overhead_s(times: dict[tuple[int, int], float], signatures: list[str], first_of: dict[str, int],
                     sizes) -> float:
    """What timing a block as its own graph adds to its work: the sum of the parts less the whole
    (NOTE: [one call per stage])."""
    if len(signatures) < 2:
        return 0.0
    per_size = []
    for n in sizes:
        parts = sum(times[first_of[sig], n] for sig in signatures)
        per_size.append((parts - times[WHOLE, n]) / (len(signatures) - 1))
    smallest = min(t for (b, _), t in times.items() if b != WHOLE)
    return min(max(statistics.median(per_size), 0.0), smallest)


def measure_blocks(model, device: str = "cpu", *, num_threads: int = 1, sizes=None,
                   min_run_time_s: float = 0.05, min_rounds: int = 5,
                   analyzed=None) -> tuple[tuple[BlockTime, ...], tuple[float, float]]:
    """Time every distinct block of ``model`` (a model file path or ModelFile) at ``sizes`` samples per call.

    Returns the blocks' times and ``(call_fwd_s, call_bwd_s)``: what calling one graph
    module, and one ``autograd.backward``, costs apart from the ops. A rank pays that once
    per stage and micro-batch, not once per block, so it is taken out of every block's
    times (NOTE: [one call per stage]).

    About ``min_run_time_s`` per (block, size), and at least ``min_rounds`` timings of each.
    ``sizes``: samples per call, by default :func:`block_sizes` of the model's batch.
    ``analyzed``: the ``(cap, costs)`` of :func:`hetcompile.compiler.analyze` on this model,
    when the caller has them (saves a capture; they are not modified).

    >>> times, (call_fwd_s, call_bwd_s) = measure_blocks("examples/mlp.py", sizes=(1, 4))  # doctest: +SKIP
    >>> times[0].fwd_per_sample_s > 0  # doctest: +SKIP
    True
    """
    from hetcompile.compiler import _as_model_file, analyze
    from hetcompile.runtime.host_memory import keep_freed_memory

    dev, sync, clock = _timer(device, num_threads)
    mf = _as_model_file(model, None)
    cap, costs = analyzed if analyzed is not None else analyze(mf)
    signatures = block_signatures(cap, costs)
    sizes = sizes or block_sizes(costs.global_batch)
    first_of: dict[str, int] = {}
    for b, sig in enumerate(signatures):
        first_of.setdefault(sig, b)
    split = {b: _split_block(cap.gm, b) for b in first_of.values()}
    samples: dict[int, list[tuple[int, float, float]]] = {b: [] for b in split}
    with torch_threads(num_threads):
        if dev.type == "cpu":
            keep_freed_memory()  # as a CPU rank runs (NOTE: [freed host memory])
        runners: dict[tuple[int, int], _BlockRunner] = {}
        placeholders = [a for a in cap.gm.graph.nodes if a.op == "placeholder"]
        for n in sizes:
            values = _real_values(cap, mf, n, dev)
            for b, (gm_block, inputs, _outputs) in [*split.items(), (WHOLE, (cap.gm, placeholders, None))]:
                in_values = [values[a] for a in inputs]
                needs_grad = [bool(a.meta.get("requires_grad")) and isinstance(v, torch.Tensor)
                              and v.dtype.is_floating_point for a, v in zip(inputs, in_values)]
                runners[b, n] = _BlockRunner(gm_block, in_values, needs_grad)
            del values
        # NOTE: [interleaved rounds] Every (block, size) is timed once per round, round after
        # round, so that a burst of load from other processes lands on all sizes alike instead
        # of tilting the fitted per-sample slope; each time is the median over the rounds.
        fwd_runs: dict[tuple[int, int], list[float]] = {k: [] for k in runners}
        both_runs: dict[tuple[int, int], list[float]] = {k: [] for k in runners}
        for r in runners.values():  # warm up: allocator, first-call dispatch
            r.forward_backward()
        deadline = time.perf_counter() + min_run_time_s * len(runners)
        rounds = 0
        while rounds < min_rounds or time.perf_counter() < deadline:
            for k, r in runners.items():
                fwd_runs[k].append(_time_once_s(r.forward, sync, clock))
                both_runs[k].append(_time_once_s(r.forward_backward, sync, clock))
            rounds += 1
        fwd = {k: statistics.median(v) for k, v in fwd_runs.items()}
        bwd = {k: max(statistics.median(both_runs[k]) - fwd[k], 0.0) for k in runners}
        logger.debug("whole graph: fwd %s, bwd %s", [fwd[WHOLE, n] for n in sizes], [bwd[WHOLE, n] for n in sizes])
        del runners
        call_fwd_s, call_bwd_s = _call_overhead_s(fwd, signatures, first_of, sizes), \
            _call_overhead_s(bwd, signatures, first_of, sizes)
        for b in split:
            for n in sizes:
                samples[b].append((n, max(fwd[b, n] - call_fwd_s, 0.0), max(bwd[b, n] - call_bwd_s, 0.0)))
    out = []
    for b, points in samples.items():
        ns = [p[0] for p in points]
        # A block without gradients (a loss of constants) measures ~0 backward: keep the fit defined.
        fwd_fixed, fwd_rate = fit_overhead_and_rate(ns, [max(p[1], 1e-9) for p in points])
        bwd_fixed, bwd_rate = fit_overhead_and_rate(ns, [max(p[2], 1e-9) for p in points])
        out.append(BlockTime(signature=signatures[b], name=f"{mf.path.name}:{costs.blocks[b].name}",
                             fwd_fixed_s=fwd_fixed, fwd_per_sample_s=1.0 / fwd_rate,
                             bwd_fixed_s=bwd_fixed, bwd_per_sample_s=1.0 / bwd_rate,
                             samples=tuple(points)))
        logger.info("block %s: fwd %.1f us + %.1f us/sample, bwd %.1f us + %.1f us/sample", out[-1].name,
                    fwd_fixed * 1e6, 1e6 / fwd_rate, bwd_fixed * 1e6, 1e6 / bwd_rate)
    return tuple(out), (call_fwd_s, call_bwd_s)


# ---------------------------------------------------------------- the model's optimizer


def _setting(value) -> str:
    """How an optimizer setting enters its signature: a number only as zero or not (a learning
    rate or a beta does not change the work, momentum 0 against 0.9 does: no buffer)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return "0" if value == 0 else "x"
    return "x"


def optimizer_signature(mf) -> str:
    """The model file's optimizer as a device profile keys its measured step: its class and
    which settings are on, e.g. ``SGD(dampening=0,...,momentum=x,nesterov=False,...)``.
    "" where the model file's ``get_optimizer`` cannot build one on a lone parameter (the cost
    model then prices the step as AdamW's)."""
    try:
        opt = mf.get_optimizer([torch.nn.Parameter(torch.zeros(1))])
    except Exception as e:  # a user's get_optimizer: pricing it is not worth failing the compile
        logger.debug("no optimizer signature: %s: %s", type(e).__name__, e)
        return ""
    settings = ",".join(f"{k}={_setting(v)}" for k, v in sorted(opt.defaults.items()))
    return f"{type(opt).__qualname__}({settings})"


# NOTE: [an optimizer step after a backward] A rank steps its optimizer right after its
# backward, which has streamed the stage's activations through the caches, so the parameters,
# gradients and optimizer state come from memory. Stepped back to back, they stay in the cache:
# on the 2-vCPU VM (32 MiB L3) the example GPT-2's AdamW step took 1.6-2.0 ms back to back,
# 2.2-2.3 ms after writing a 64 MiB buffer, and 2.4-2.8 ms in a training step's trace; the wide
# MLP's SGD step 0.45-0.60 ms back to back and 0.79-0.82 ms after the buffer (2026-11-25). So
# each timed step follows a sweep of a buffer larger than a CPU's last-level cache.
_CACHE_SWEEP_BYTES = 256 << 20


# Parameter tensors (16x16) of the small steps measure_model_optimizer fits its fixed and
# per-tensor parts to.
_SMALL_STEPS = (8, 16, 32, 64)


def measure_model_optimizer(model, device: str = "cpu", *, num_threads: int = 1,
                            min_run_time_s: float = 0.1) -> OptimizerTime:
    """Time the model file's own optimizer: its step over the model's parameters, and over 8 to 64
    small tensors. The small steps, fitted as ``fixed + per_tensor * tensors``, give the step's
    fixed part and its per-tensor loop; the model's step what is left per byte. Timed like the
    blocks (NOTE: [CPU time of a block]), each step after a sweep of the caches (NOTE: [an
    optimizer step after a backward]).

    >>> measure_model_optimizer("examples/mlp.py").name  # doctest: +SKIP
    'mlp.py: SGD'
    """
    from hetcompile.compiler import _as_model_file

    dev, sync, clock = _timer(device, num_threads)
    mf = _as_model_file(model, None)
    params = [p for p in mf.build_model(0).to(dev).parameters() if p.requires_grad]
    sweep = torch.zeros(_CACHE_SWEEP_BYTES // 4, device=dev)

    def step_s(tensors) -> float:
        for t in tensors:
            t.grad = torch.randn_like(t) * 1e-3
        opt = mf.get_optimizer(tensors)
        opt.step()  # its state, as after a rank's first step
        runs, deadline = [], time.perf_counter() + min_run_time_s
        while len(runs) < 5 or time.perf_counter() < deadline:
            sweep.add_(1.0)
            sync()
            runs.append(_time_once_s(opt.step, sync, clock))
        return statistics.median(runs)

    with torch_threads(num_threads):
        model_s = step_s(params)
        small_s = [step_s([torch.nn.Parameter(torch.randn(16, 16, device=dev)) for _ in range(n)])
                   for n in _SMALL_STEPS]
    fixed_s, tensors_per_s = fit_overhead_and_rate(_SMALL_STEPS, small_s)
    per_tensor_s = 1.0 / tensors_per_s
    param_bytes = sum(t.numel() * t.element_size() for t in params)
    per_byte_s = max(model_s - fixed_s - len(params) * per_tensor_s, 0.0) / max(param_bytes, 1)
    signature = optimizer_signature(mf)
    name = f"{mf.path.name}: {signature.split('(')[0]}"
    logger.info("optimizer %s: %.1f us + %.1f us per tensor + %.1f us/MB", name, fixed_s * 1e6,
                per_tensor_s * 1e6, per_byte_s * 1e12)
    return OptimizerTime(signature=signature, name=name, fixed_s=fixed_s,
                         per_tensor_s=per_tensor_s, per_byte_s=per_byte_s)
