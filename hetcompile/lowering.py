"""Lowering: split the captured graph into stage functions and emit one program per rank.

The whole lowering, top to bottom (:func:`lower`):

1. ``assign_stages``      every graph node -> the pipeline stage that runs it
2. ``replicate_shared``   a stage recomputes masks and tables instead of receiving them
   ``localize_sizes``     ... and symbolic sizes
3. ``assign_ranks``       every used device -> a rank, a stage, a replica and its samples
4. ``split_stages``       one FX graph per stage; the tensors that cross stages
5. ``split_operators``    tensor-parallel stages: one graph per member, with its shards
                          and collectives (:mod:`passes.partition_ops`)
6. ``grad_groups``        ranks that hold the same parameters sum their gradients
7. ``emit_*``             readable Python: stage_K.py (stage_K_tpJ.py), rank_R.py, main.py, launch.sh

Decisions come in as a :class:`~hetcompile.planner.PlanDecision`; nothing here
chooses anything, it only applies the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from dataclasses import dataclass

import torch
import torch.fx

from hetcompile.capture import Captured
from hetcompile.errors import UserError
from hetcompile.plan import (GradGroup, Plan, RankSpec, SCHEMA_VERSION, StageInput, StageSpec, ValueSpec,
                             fingerprint)
from hetcompile.runtime import tp
from hetcompile.schedule import make_schedule
from passes.partition_ops import partition, rank_graph


def lower(cap: Captured, decision, cluster, *, schedule: str, seed: int, model_file: str,
          block_names: list[str], predicted: dict, solver: dict, model_source: str,
          data_files: dict[str, bytes] | None = None, before_emit=None) -> Plan:
    """Apply ``decision`` to the captured graph and return the plan with its emitted sources.

    ``before_emit(plan)``, when given, is called with the plan before its programs are emitted
    (the compiler has the timeline drawn meanwhile)."""
    stage_of = assign_stages(cap.gm, decision)
    replicate_shared(cap, stage_of)
    localize_sizes(cap, stage_of)
    ranks, idle = assign_ranks(decision, cluster)
    graphs, stages, values, loss = split_stages(cap, stage_of, decision, ranks, block_names)
    member_graphs, stages = split_operators(cap, graphs, stages, block_names)
    groups = grad_groups(stages)
    num_stages = len(stages)
    chunks = len(ranks[0].stages)
    actions = make_schedule(schedule, num_stages, decision.num_microbatches, chunks)
    cluster_json = cluster.to_json()
    fp = fingerprint(cluster_json, [s.__dict__ for s in decision.stages], schedule, decision.num_microbatches,
                     seed, model_source, [str(g) for gs in member_graphs for g in gs],
                     {name: hashlib.sha256(data).hexdigest() for name, data in sorted((data_files or {}).items())})
    plan = Plan(schema_version=SCHEMA_VERSION, fingerprint=fp, model_file=model_file, seed=seed,
                global_batch=cap.global_batch, num_microbatches=decision.num_microbatches,
                microbatch_size=decision.microbatch_size, schedule=schedule, cluster=cluster_json,
                stages=tuple(stages), ranks=tuple(ranks), values=tuple(values), grad_groups=tuple(groups),
                loss=loss, idle_devices=tuple(idle), predicted=predicted, solver=solver)
    if before_emit is not None:
        before_emit(plan)
    sources: dict = {f"{stage_module(s, j)}.py": emit_stage(plan, s, g, j)
                     for s in stages for j, g in enumerate(member_graphs[s.index])}
    sources.update({f"rank_{r.rank}.py": emit_rank(plan, r, actions[r.stages[0] % len(actions)]) for r in ranks})
    sources["main.py"] = MAIN_PY
    sources["launch.sh"] = emit_launch(plan)
    sources["model.py"] = model_source
    sources.update(data_files or {})
    buf = io.BytesIO()
    torch.save(cap.constants, buf)
    sources["constants.pt"] = buf.getvalue()
    return dataclasses.replace(plan, sources=sources)


# ---------------------------------------------------------------------------------------------
# 1-2. Which stage runs each node


def assign_stages(gm: torch.fx.GraphModule, decision) -> dict[torch.fx.Node, int]:
    """Map each compute node to its stage from the block ranges of the decision."""
    stage_of_block = {}
    for s, st in enumerate(decision.stages):
        for b in range(st.first_block, st.last_block + 1):
            stage_of_block[b] = s
    stage_of = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        stage = stage_of_block[n.meta["block"]]
        if n.target.__name__ == "getitem":  # a tuple never crosses stages: its items do
            stage = stage_of[n.args[0]]
        stage_of[n] = stage
    return stage_of


def replicate_shared(cap: Captured, stage_of: dict[torch.fx.Node, int]) -> None:
    """A stage recomputes the masks and tables it reads instead of receiving them.

    Values marked ``replicable`` (:mod:`passes.mark_replicable`: built from sizes,
    buffers and constants only) that a later stage reads are copied, with their
    ancestors, into that stage, just before the first node of the stage that reads one:
    one place per stage, so a copy shared by two values (an ancestor of both) is
    defined before either's readers, whichever comes first.
    """
    graph = cap.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    made: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}

    def copy_into(n: torch.fx.Node, s: int, before: torch.fx.Node) -> torch.fx.Node:
        if n.op != "call_function" or stage_of[n] == s:
            return n
        if (n, s) not in made:
            with graph.inserting_before(before):
                new = graph.node_copy(n, lambda a: copy_into(a, s, before))
            new.meta = {**n.meta, "block": before.meta["block"]}
            stage_of[new] = s
            made[n, s] = new
        return made[n, s]

    reads = []  # (value, reading stage, its readers there)
    for n in graph.nodes:
        if n.op != "call_function" or not n.meta.get("replicable"):
            continue
        readers: dict[int, list[torch.fx.Node]] = {}
        for user in n.users:
            if user.op == "call_function" and stage_of[user] != stage_of[n]:
                readers.setdefault(stage_of[user], []).append(user)
        reads.extend((n, s, users) for s, users in readers.items())
    first_reader: dict[int, torch.fx.Node] = {}
    for _, s, users in reads:
        first_reader[s] = min([*users, first_reader.get(s, users[0])], key=order.__getitem__)
    for n, s, users in reads:
        copy = copy_into(n, s, first_reader[s])
        for user in users:
            user.replace_input_with(n, copy)
    graph.eliminate_dead_code()


def localize_sizes(cap: Captured, stage_of: dict[torch.fx.Node, int]) -> None:
    """Let each stage compute the batch size from its own batch slice instead of receiving an int.

    Only the batch dimension is dynamic, so every symbolic int equals the batch
    symbol; a stage that uses one from another stage gets ``sym_size(input, 0)``.
    """
    graph = cap.gm.graph
    first_input = next(n for n in graph.nodes if n.op == "placeholder" and cap.placeholders[n.name].kind == "input")
    for n in list(graph.nodes):
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.SymInt):
            continue
        for user in list(n.users):
            if user.op != "call_function" or stage_of[user] == stage_of[n]:
                continue
            if n.meta["val"].node.expr != cap.batch_symbol:
                raise UserError(f"Node {n.name} computes the size {n.meta['val']} from the batch size and is "
                                f"used by another pipeline stage; hetcompile can only pass the batch size itself. "
                                "Compute the size inside the layer that uses it.")
            with graph.inserting_before(user):
                local = graph.call_function(torch.ops.aten.sym_size.int, (first_input, 0))
            local.meta = {**n.meta, "block": user.meta["block"]}
            stage_of[local] = stage_of[user]
            user.replace_input_with(n, local)
    graph.eliminate_dead_code()


# ---------------------------------------------------------------------------------------------
# 3. Ranks


def assign_ranks(decision, cluster) -> tuple[list[RankSpec], list[int]]:
    """Number the used devices in cluster order (node by node, as torchrun numbers ranks).

    Stages on the same devices (the interleaved schedule) share their ranks: each
    rank lists all of its stages.
    """
    devices = cluster.devices
    used = sorted({d for st in decision.stages for d in st.devices})
    rank_of = {d: r for r, d in enumerate(used)}
    stages_of: dict[tuple[int, ...], list[int]] = {}
    for s, st in enumerate(decision.stages):
        stages_of.setdefault(st.devices, []).append(s)
    ranks = []
    for group_stages in stages_of.values():
        st = decision.stages[group_stages[0]]
        if any((o.shares, o.tp, o.tp_parts) != (st.shares, st.tp, st.tp_parts)
               for o in (decision.stages[s] for s in group_stages)):
            raise ValueError(f"Stages {group_stages} run on the same devices with different shares or TP: "
                             "interleaved stages must split every micro-batch alike")
        t = st.tp
        # A replica is a tensor-parallel group of t devices (one device without TP); its members
        # keep their order, which matches tp_parts.
        groups = sorted((range(i, i + t) for i in range(0, len(st.devices), t)),
                        key=lambda g: min(st.devices[i] for i in g))
        lo = 0
        for replica, group in enumerate(groups):
            share = st.shares[group[0]]
            for member, i in enumerate(group):
                d = st.devices[i]
                ranks.append(RankSpec(rank=rank_of[d], device_index=d, device_type=devices[d].type,
                                      node=devices[d].node, stages=tuple(group_stages), replica=replica,
                                      sample_lo=lo, sample_hi=lo + share, tp_rank=member))
            lo += share
    ranks.sort(key=lambda r: r.rank)
    idle = [d.index for d in devices if d.index not in rank_of]
    return ranks, idle


# ---------------------------------------------------------------------------------------------
# 4. Stage graphs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def split_stages(cap: Captured, stage_of, decision, ranks: list[RankSpec], block_names: list[str]):
    graph = cap.gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    loss_node = output.args[0][0]
    num_stages = len(decision.stages)
    if stage_of[loss_node] != num_stages - 1:
        raise UserError("The loss is not computed in the last pipeline stage; hetcompile expects the loss at "
                        "the end of the model's forward.")
    nodes_of = [[n for n in graph.nodes if n.op == "call_function" and stage_of[n] == s] for s in range(num_stages)]
    graphs, stages, values = [], [], {}
    for s in range(num_stages):
        needed: list[torch.fx.Node] = []
        for n in nodes_of[s]:
            for inp in n.all_input_nodes:
                if (inp.op == "placeholder" or stage_of[inp] != s) and inp not in needed:
                    needed.append(inp)
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs = []
        for inp in needed:
            ph = g.placeholder(inp.name)
            ph.meta = dict(inp.meta)
            env[inp] = ph
            if inp.op == "placeholder":
                p = cap.placeholders[inp.name]
                inputs.append(StageInput(inp.name, p.kind, p.target, p.input_index))
            else:
                inputs.append(StageInput(inp.name, "value"))
                values.setdefault(inp, set()).add(s)
        for n in nodes_of[s]:
            env[n] = g.node_copy(n, lambda x: env[x])
        outs = [n for n in nodes_of[s] if any(u.op == "call_function" and stage_of[u] != s for u in n.users)]
        if s == num_stages - 1:
            outs.append(loss_node)
        g.output(tuple(env[n] for n in outs))
        g.lint()
        graphs.append(g)
        st = decision.stages[s]
        stage_ranks = sorted((r for r in ranks if s in r.stages), key=lambda r: (r.replica, r.tp_rank))
        stages.append(StageSpec(index=s, first_block=st.first_block, last_block=st.last_block,
                                block_names=tuple(block_names[st.first_block:st.last_block + 1]),
                                ranks=tuple(r.rank for r in stage_ranks),
                                shares=tuple(r.sample_hi - r.sample_lo for r in stage_ranks),
                                inputs=tuple(inputs), outputs=tuple(n.name for n in outs),
                                recompute=st.recompute, tp=st.tp, tp_parts=tuple(st.tp_parts)))
    value_specs = []
    for n, consumers in values.items():
        val = n.meta["val"]
        coef = n.meta["batch_coef"]
        if not isinstance(val, torch.Tensor):
            raise UserError(f"Value {n.name} ({type(val).__name__}) crosses a pipeline stage boundary, but only "
                            "tensors can be sent between stages. This cut is not supported; please report it.")
        if coef is None:
            raise UserError(f"Tensor {n.name} of shape {tuple(val.shape)} crosses a pipeline stage boundary with "
                            "the batch on a dimension other than 0, so it cannot be split across data-parallel "
                            "ranks. Keep the batch on dim 0 between layers.")
        shape = []
        for i, d in enumerate(val.shape):
            if i == 0 and coef > 0:
                shape.append(f"B*{coef}")
            else:
                shape.append(int(d))
        value_specs.append(ValueSpec(name=n.name, producer=stage_of[n], consumers=tuple(sorted(consumers)),
                                     shape=tuple(shape), dtype=_dtype_name(val.dtype), batch_coef=coef,
                                     requires_grad=bool(n.meta.get("requires_grad"))))
    value_specs.sort(key=lambda v: (v.producer, v.name))
    return graphs, stages, value_specs, loss_node.name


# ---------------------------------------------------------------------------------------------
# 5. Tensor-parallel stages


def split_operators(cap: Captured, graphs: list[torch.fx.Graph], stages: list[StageSpec], block_names: list[str]):
    """Each member of a tensor-parallel stage gets its own graph: its shards, local sizes, collectives.

    Only parameters that one op of one stage reads are split (a weight tied across
    stages stays whole). Returns the graphs of every stage's members and the stages
    with their parameter shards and the matmuls left whole.
    """
    stages_of: dict[str, set[int]] = {}
    for st in stages:
        for inp in st.inputs:
            if inp.kind == "param":
                stages_of.setdefault(inp.target, set()).add(st.index)
    member_graphs, out = [], []
    for st, g in zip(stages, graphs):
        if st.tp == 1:
            member_graphs.append([g])
            out.append(st)
            continue
        target = {i.name: i.target for i in st.inputs if i.kind == "param"}
        users = {n.name: len(n.users) for n in g.nodes if n.op == "placeholder"}
        shardable = {name for name, t in target.items() if len(stages_of[t]) == 1 and users[name] == 1}
        parts = st.tp_parts or (1,) * st.tp
        analysis = partition(g, parts, shardable)
        member_graphs.append([rank_graph(g, analysis, j) for j in range(st.tp)])
        left = tuple(f"{_op_label(n, target)}: {analysis.left_whole[n.name]}"
                     for n in g.nodes if n.name in analysis.left_whole)
        shards = tuple(sorted((dataclasses.replace(p, param=target[p.param]) for p in analysis.params.values()),
                              key=lambda p: p.param))
        out.append(dataclasses.replace(st, param_shards=shards, left_whole=left))
    return member_graphs, out


def _op_label(n: torch.fx.Node, target: dict[str, str]) -> str:
    """A matmul for people: the module of its weight and the op, "model.layers.0.mlp.up_proj (linear)"."""
    op = getattr(n.target, "__name__", str(n.target)).split(".")[0]
    weight = next((target[a.name] for a in n.all_input_nodes if a.name in target), None)
    return f"{weight.removesuffix('.weight')} ({op})" if weight else f"{n.name} ({op})"


# ---------------------------------------------------------------------------------------------
# 6. Gradient groups


def grad_groups(stages: list[StageSpec]) -> list[GradGroup]:
    """Group parameters by the set of ranks that hold them; each group sums its gradients.

    A split parameter is held by the members at the same TP position of every
    replica. A whole parameter of a tensor-parallel stage has the same gradient on
    every member (``tp.enter`` made it whole), so one TP group alone needs no sum,
    and in a larger group each member adds 1/tp of it (RankContext.all_reduce_grads).
    """
    holders: dict[tuple[str, int], set[int]] = {}
    for st in stages:
        split = {p.param for p in st.param_shards}
        for inp in st.inputs:
            if inp.kind != "param":
                continue
            if inp.target in split:
                for i, r in enumerate(st.ranks):
                    holders.setdefault((inp.target, i % st.tp), set()).add(r)
            else:
                holders.setdefault((inp.target, -1), set()).update(st.ranks)
    one_tp_group = {frozenset(st.ranks) for st in stages if st.tp > 1 and len(st.ranks) == st.tp}
    by_ranks: dict[tuple[int, ...], list[str]] = {}
    for (param, member), rs in holders.items():
        if len(rs) > 1 and not (member == -1 and frozenset(rs) in one_tp_group):
            by_ranks.setdefault(tuple(sorted(rs)), []).append(param)
    return [GradGroup(ranks, tuple(params)) for ranks, params in sorted(by_ranks.items())]


# ---------------------------------------------------------------------------------------------
# 7. Emission


@dataclass(frozen=True)
class Transfer:
    """One message of a micro-batch: ``value`` rows for samples [lo, hi) between two ranks."""

    value: str
    peer: int
    lo: int
    hi: int


@dataclass
class Messages:
    """What one rank receives and sends for each micro-batch: values forward, their gradients backward."""

    recv: list[Transfer]  # inputs, before forward
    send: list[Transfer]  # outputs, after forward
    recv_grad: list[Transfer]  # gradients of outputs, before backward
    send_grad: list[Transfer]  # gradients of inputs, after backward


def transfers(plan: Plan, rank: RankSpec) -> dict[int, Messages]:
    """The messages of ``rank`` for each micro-batch, per stage it runs.

    A batched value moves the overlap of the producer's and consumer's sample
    ranges; a value without the batch goes whole, from producer replica
    ``j % num_producer_replicas`` to consumer replica ``j``. Every member of a
    tensor-parallel group holds stage inputs and outputs whole, so consumer member
    j receives from producer member ``j % producer tp``, and the gradient goes
    back to producer member i from consumer member ``i % consumer tp``: each
    piece once. Without TP, backward mirrors forward.

    A rank that runs several stages (interleaved) moves each value once: it
    receives it before the first of its stages that reads it and sends the summed
    gradient after the last backward among them; a value made and read on the same
    rank moves in memory (RankContext).
    """
    by_rank = {r.rank: r for r in plan.ranks}
    msgs = {s: Messages([], [], [], []) for s in rank.stages}
    for v in plan.values:
        prod = plan.stages[v.producer]
        mine = [c for c in v.consumers if c in rank.stages]
        if mine and v.producer not in rank.stages:
            cons = plan.stages[mine[0]]
            for p in (by_rank[r] for r in prod.ranks):
                lo, hi = _overlap(v, p, rank, prod)
                if lo < hi:
                    if p.tp_rank == rank.tp_rank % prod.tp:
                        msgs[mine[0]].recv.append(Transfer(v.name, p.rank, lo, hi))
                    if v.requires_grad and rank.tp_rank == p.tp_rank % cons.tp:
                        msgs[mine[0]].send_grad.append(Transfer(v.name, p.rank, lo, hi))
        if v.producer in rank.stages:
            readers: dict[int, int] = {}  # consumer rank -> the first stage of it that reads v
            for c_stage in v.consumers:
                for r in plan.stages[c_stage].ranks:
                    if r != rank.rank:
                        readers.setdefault(r, c_stage)
            for r, c_stage in sorted(readers.items()):
                cons, c = plan.stages[c_stage], by_rank[r]
                lo, hi = _overlap(v, rank, c, prod)
                if lo < hi:
                    if rank.tp_rank == c.tp_rank % prod.tp:
                        msgs[v.producer].send.append(Transfer(v.name, c.rank, lo, hi))
                    if v.requires_grad and c.tp_rank == rank.tp_rank % cons.tp:
                        msgs[v.producer].recv_grad.append(Transfer(v.name, c.rank, lo, hi))
    return msgs


def _overlap(v: ValueSpec, producer: RankSpec, consumer: RankSpec, prod: StageSpec) -> tuple[int, int]:
    if v.batch_coef == 0:
        replicas = len(prod.ranks) // prod.tp
        return (0, 1) if producer.replica == consumer.replica % replicas else (0, 0)
    return max(producer.sample_lo, consumer.sample_lo), min(producer.sample_hi, consumer.sample_hi)


def stage_module(st: StageSpec, member: int) -> str:
    """The module name of a stage's program (one per member of a tensor-parallel stage)."""
    return f"stage_{st.index}" if st.tp == 1 else f"stage_{st.index}_tp{member}"


def emit_stage(plan: Plan, st: StageSpec, graph: torch.fx.Graph, member: int = 0) -> str:
    code = graph.python_code(root_module="self")
    body = code.src.replace("def forward(self, ", "def forward(").replace("device(type='cpu')", "DEVICE")
    collectives = {name for name, obj in code.globals.items() if obj in tp.FUNCTIONS}
    for name in collectives:  # the runtime's collectives read as tp.enter(...), tp.all_reduce(...)
        body = re.sub(rf"\b{name}\(", f"tp.{code.globals[name].__name__}(", body)
    unknown = set(code.globals) - {"torch", "device", "inf", "nan", "fx_pytree", "pytree", "NoneType"} - collectives
    if unknown:
        raise UserError(f"Stage {st.index} needs Python globals hetcompile cannot emit: {sorted(unknown)}.")
    blocks = "\n".join(f"#   {b}" for b in st.block_names)
    inputs = "\n".join(f"#   {i.name:<40} {i.kind}{'  ' + i.target if i.target else ''}"
                       f"{'  batch[%d]' % i.input_index if i.kind == 'input' else ''}" for i in st.inputs)
    tp_doc, tp_import = "", ""
    if st.tp > 1:
        parts = st.tp_parts or (1,) * st.tp
        tp_doc = (f"\n\nTensor parallel: member {member} of {st.tp} (shares {':'.join(map(str, parts))}), holding its\n"
                  f"slices of {len(st.param_shards)} parameters; tp.enter and tp.all_reduce are the group's\n"
                  "collectives (hetcompile/runtime/tp.py).")
        tp_import = "from hetcompile.runtime import tp  # noqa: F401  (tensor-parallel collectives)\n"
        if st.left_whole:
            blocks += "\n# Left whole (replicated on every member):\n" + "\n".join(f"#   {w}" for w in st.left_whole)
    return f'''"""Stage {st.index} of plan {plan.fingerprint}: blocks {st.first_block}..{st.last_block}.

Generated by hetcompile from the captured graph of {plan.model_file}; the
forward of these blocks, as ATen calls. Autograd gives the backward.{tp_doc}
"""
# Blocks:
{blocks}
# Inputs (name, kind, source):
{inputs}
# Outputs: {", ".join(st.outputs)}

import torch
from torch import device, inf, nan  # noqa: F401  (used by generated code)
{tp_import}
DEVICE = torch.device("cpu")  # set by the runtime to this rank's device
{body}'''


def emit_rank(plan: Plan, rank: RankSpec, actions) -> str:
    st = plan.stages[rank.stages[0]]
    msgs = transfers(plan, rank)
    is_last = len(plan.stages) - 1 in rank.stages

    def receives(a) -> list[str]:
        m = msgs[a.stage]
        if a.kind == "F":
            return [f"    ctx.recv({t.value!r}, mb={a.microbatch}, src={t.peer}, samples=({t.lo}, {t.hi}))"
                    for t in m.recv]
        return [f"    ctx.recv_grad({t.value!r}, mb={a.microbatch}, src={t.peer}, samples=({t.lo}, {t.hi}))"
                for t in m.recv_grad]

    # NOTE: [receives one action ahead] A receive is posted (ctx.recv only posts it; forward and
    # backward wait for it) one action before the action that reads it: its notice reaches the
    # sender while this rank computes, so data that is ready leaves at once instead of one link
    # latency after this rank gets to it (NOTE: [receives posted in program order] in
    # hetcompile/schedule.py). The first action's receives are posted at its own start.
    lines = []
    for i, a in enumerate(actions):
        mb, m = a.microbatch, msgs[a.stage]
        lines.append(f"    # {a}: {'forward' if a.kind == 'F' else 'backward'} of stage {a.stage}, micro-batch {mb}")
        if i == 0:
            lines += receives(a)
        ahead = receives(actions[i + 1]) if i + 1 < len(actions) else []
        if ahead:
            lines += [f"    # ... and the receives of {actions[i + 1]}, ahead", *ahead]
        if a.kind == "F":
            lines.append(f"    ctx.forward({a.stage}, mb={mb})")
            for t in m.send:
                lines.append(f"    ctx.send({t.value!r}, mb={mb}, dst={t.peer}, samples=({t.lo}, {t.hi}))")
        else:
            lines.append(f"    ctx.backward({a.stage}, mb={mb})")
            for t in m.send_grad:
                lines.append(f"    ctx.send_grad({t.value!r}, mb={mb}, dst={t.peer}, samples=({t.lo}, {t.hi}))")
    groups = [g for g in plan.grad_groups if rank.rank in g.ranks]
    lines.append("    # Gradients: sum over the ranks that hold the same parameters (data parallel, tied weights)")
    for g in groups:
        lines.append(f"    ctx.all_reduce_grads(ranks={g.ranks})  # {len(g.params)} parameters")
    lines.append("    ctx.optimizer_step()")
    lines.append("    return ctx.end_step()  # the global loss: sum over ranks of each piece's weighted loss")
    step_body = "\n".join(lines)
    share = rank.sample_hi - rank.sample_lo
    replicas = len(st.ranks) // st.tp
    tensor_parallel = ""
    if st.tp > 1:
        parts = st.tp_parts or (1,) * st.tp
        tensor_parallel = (f"\nTensor:   member {rank.tp_rank} of a {st.tp}-way tensor-parallel group (ranks "
                           f"{', '.join(map(str, st.ranks[rank.replica * st.tp:(rank.replica + 1) * st.tp]))}), "
                           f"shares {':'.join(map(str, parts))}")
    def blocks_text(st: StageSpec) -> str:
        if st.first_block == st.last_block:
            return f"block {st.first_block} ({st.block_names[0]})"
        return f"blocks {st.first_block}..{st.last_block} ({st.block_names[0]} .. {st.block_names[-1]})"

    stages_doc = "\n".join(f"{'Stage:' if i == 0 else '':<10}{s} of {len(plan.stages)}, {blocks_text(plan.stages[s])}"
                           for i, s in enumerate(rank.stages))
    chunks_doc = f" ({len(rank.stages)} stages per rank)" if len(rank.stages) > 1 else ""
    imports = "\n".join(f"import {stage_module(plan.stages[s], rank.tp_rank)} as stage_{s}  # noqa: E402"
                        for s in rank.stages)
    stages_arg = "{" + ", ".join(f"{s}: stage_{s}" for s in rank.stages) + "}"
    return f'''"""hetcompile plan {plan.fingerprint}: rank {rank.rank} of {plan.world_size}.

Device:   {rank.device_type} (cluster device {rank.device_index}, node {rank.node})
{stages_doc}
Data:     replica {rank.replica} of {replicas}: samples {rank.sample_lo}:{rank.sample_hi} ({share} of {plan.microbatch_size}) of every micro-batch{"; computes the loss" if is_last else ""}{tensor_parallel}
Schedule: {plan.schedule}{chunks_doc}, {plan.num_microbatches} micro-batches of {plan.microbatch_size} samples (global batch {plan.global_batch})

Run every rank with `hetcompile run DIR`, or with torchrun (see launch.sh).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

{imports}
from hetcompile.runtime import RankContext  # noqa: E402

RANK = {rank.rank}
# What this program was compiled for: RankContext refuses to start if plan.json, the stage file
# or the launch (WORLD_SIZE, RANK) disagree.
FINGERPRINT = "{plan.fingerprint}"
WORLD_SIZE = {plan.world_size}
ctx: RankContext


def train_step(step: int) -> float:
    ctx.start_step(step)
{step_body}


if __name__ == "__main__":
    ctx = RankContext(os.path.dirname(os.path.abspath(__file__)), rank=RANK, stages={stages_arg},
                      fingerprint=FINGERPRINT, world_size=WORLD_SIZE)
    ctx.main(train_step)
'''


MAIN_PY = '''"""Entry point for torchrun: every process runs the program of its rank."""
import os
import runpy

here = os.path.dirname(os.path.abspath(__file__))
program = os.path.join(here, f"rank_{os.environ.get('RANK', '?')}.py")
if not os.path.isfile(program):
    raise SystemExit(f"hetcompile: {program} does not exist: this process was started as rank "
                     f"{os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}, more ranks than the plan in "
                     f"{here} has. Launch it with `hetcompile run {here}` or the commands in launch.sh.")
runpy.run_path(program, run_name="__main__")
'''


def emit_launch(plan: Plan) -> str:
    nodes: dict[int, int] = {}
    for r in plan.ranks:
        nodes[r.node] = nodes.get(r.node, 0) + 1
    lines = ["#!/usr/bin/env bash",
             f"# Launch plan {plan.fingerprint} ({plan.world_size} ranks on {len(nodes)} nodes) with torchrun.",
             "# Run the line of each node on that node; MASTER_ADDR is the first node's address.",
             "# On one machine (any devices, gloo on CPU): hetcompile run \"$(dirname \"$0\")\" --steps 10",
             "set -euo pipefail",
             'DIR="$(cd "$(dirname "$0")" && pwd)"',
             'MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"', 'MASTER_PORT="${MASTER_PORT:-29500}"',
             'NODE_RANK="${NODE_RANK:-0}"', "case \"$NODE_RANK\" in"]
    for i, (node, count) in enumerate(sorted(nodes.items())):
        cmd = (f"torchrun --nnodes={len(nodes)} --node-rank={i} --nproc-per-node={count} "
               '--master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$DIR/main.py" "$@"')
        lines.append(f"  {i}) exec {cmd} ;;  # cluster node {node}")
    lines.append("esac")
    return "\n".join(lines) + "\n"
