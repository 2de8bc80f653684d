"""Tensor parallelism: split a stage's operators across the ranks of a tensor-parallel group.

The Megatron pairing, found on the ATen graph instead of written per model:

- a matmul whose weight is a parameter and whose input is whole (replicated) is
  split by **columns**: each rank computes some of the output features, with
  its slice of the weight and bias;
- the ops after it follow the split: element-wise ops, views and reshapes,
  transposes, splits (the fused q|k|v of GPT-2), attention over a subset of
  the heads (GQA's repeated key/value heads too);
- a matmul whose input arrives split on its contraction dim is split by
  **rows**; its partial results are summed over the group, then the bias added.

Two collectives keep the math exact, with autograd (:mod:`hetcompile.runtime.tp`):
``tp.enter(x)`` (identity forward, all-reduce of the gradient backward) where a
whole tensor enters split computation, and ``tp.all_reduce(x)`` (all-reduce
forward, identity backward) after a row split. So a transformer layer costs one
all-reduce per matmul pair forward and one backward.

A layout (:class:`Shard`) says which global indices of one dimension each rank
holds, so shards can be uneven (3:1 of the heads for a 3x faster device).
Column splits follow the unit structure the graph shows (q|k|v groups, whole
heads), found by looking ahead at the splits and views the output goes through.

When a split reaches an op without a rule here, or a stage output, the column
split it came from is dropped and the analysis runs again: what hetcompile
cannot split stays whole (replicated), never wrong, and :attr:`TPAnalysis.left_whole`
names it.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch
import torch.fx

from hetcompile.plan import ParamShard
from hetcompile.runtime import tp

aten = torch.ops.aten

# Ops whose only tensor input passes its layout through unchanged (same shape, same dims).
_SAME_LAYOUT = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default, aten.detach.default}
# (input, weight, bias) positions and which weight dim holds the output features.
_LINEAR = {aten.linear.default: (0, 1, 2, 0), aten.addmm.default: (1, 2, 0, 1), aten.mm.default: (0, 1, None, 1)}
_ATTENTION = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MAX_PERIOD = 1 << 24  # view analysis works on index arrays of this many elements at most


@dataclass(eq=False)
class Shard:
    """Rank r holds the global indices ``index[r]`` (sorted) of dimension ``dim``."""

    dim: int
    index: tuple[np.ndarray, ...]
    origins: frozenset[str]  # the column-split matmuls this split comes from

    def same_split(self, other: "Shard") -> bool:
        return self.dim == other.dim and all(np.array_equal(a, b) for a, b in zip(self.index, other.index))

    def moved(self, dim: int, index=None) -> "Shard":
        return Shard(dim, self.index if index is None else index, self.origins)


@dataclass
class TPAnalysis:
    layouts: dict  # node -> Shard | None | list of chunk layouts (split)
    params: dict[str, ParamShard]  # placeholder name -> how it is split (``param``: the placeholder name)
    rewrites: dict  # node -> (rank, env, builder) -> new node
    left_whole: dict[str, str]  # matmul node -> why its split was dropped
    column: dict[str, int] = field(default_factory=dict)  # column-split matmul -> units (heads, features)
    row: dict[str, int] = field(default_factory=dict)  # row-split matmuls (an all-reduce each) -> units


def partition(graph: torch.fx.Graph, parts: tuple[int, ...], shardable: set[str]) -> TPAnalysis:
    """Decide the split of ``graph`` for a group whose ranks get ``parts`` of every split dim.

    ``shardable`` names the parameter placeholders that may be split (used by
    one op, in this stage only). Runs the analysis until no split reaches an op
    without a rule, dropping the column splits that did.
    """
    seeds = {n.name for n in graph.nodes if _linear_weight(n, shardable) is not None}
    left_whole: dict[str, str] = {}
    while True:
        prop = _Propagation(graph, parts, seeds, shardable)
        prop.run()
        if not prop.poisoned:
            # A matmul dropped as a column split may still be split by rows in the end.
            left_whole = {k: v for k, v in left_whole.items() if k not in prop.column and k not in prop.row}
            return TPAnalysis(prop.layouts, prop.params, prop.rewrites, left_whole, prop.column, prop.row)
        for origin, reason in prop.poisoned.items():
            left_whole.setdefault(origin, reason)
        seeds -= set(prop.poisoned)


def rank_graph(graph: torch.fx.Graph, analysis: TPAnalysis, rank: int) -> torch.fx.Graph:
    """The graph tensor-parallel rank ``rank`` runs: local sizes, its shards, the collectives."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    builder = _Builder(g, env)
    for n in graph.nodes:
        rewrite = analysis.rewrites.get(n)
        if rewrite is None:
            env[n] = g.node_copy(n, lambda a: env[a])
        else:
            env[n] = rewrite(rank, builder)
            env[n].meta = dict(n.meta)
            env[n]._rename(n.name)  # the emitted program keeps the captured graph's names
    g.lint()
    return g


def ranges_of(index: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted indices as half-open intervals: [0 1 2 8 9] -> ((0, 3), (8, 10))."""
    if len(index) == 0:
        return ()
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(index) - 1]])
    return tuple((int(index[s]), int(index[e]) + 1) for s, e in zip(starts, ends))


def split_units(units: int, parts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Units (heads, features) [lo, hi) of each rank, in proportion to ``parts``, rounded to whole units."""
    total = sum(parts)
    bounds = [0]
    acc = 0
    for p in parts:
        acc += p
        bounds.append((units * acc + total // 2) // total)
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------
# Building a rank's graph


class _Builder:
    """What a rewrite needs to emit the nodes of one rank's graph."""

    def __init__(self, graph: torch.fx.Graph, env: dict):
        self.graph, self.env = graph, env
        self.entered: dict[torch.fx.Node, torch.fx.Node] = {}

    def arg(self, a):
        return torch.fx.map_arg(a, lambda x: self.env[x])

    def call(self, target, *args, name: str | None = None):
        node = self.graph.call_function(target, tuple(args))
        if name is not None:
            node._rename(name)
        return node

    def enter(self, x: torch.fx.Node) -> torch.fx.Node:
        """One ``tp.enter`` per replicated value, shared by all the split ops that read it."""
        if x not in self.entered:
            node = self.call(tp.enter, self.env[x])
            node.meta = dict(x.meta)
            self.entered[x] = node
        return self.entered[x]

    def local(self, x: torch.fx.Node, dim: int, index: np.ndarray) -> torch.fx.Node:
        """A replicated value cut down to this rank's indices of ``dim`` (slices, concatenated)."""
        src = self.enter(x) if x.meta.get("requires_grad") else self.env[x]
        pieces = [self.call(aten.slice.Tensor, src, dim, lo, hi) for lo, hi in ranges_of(index)]
        return pieces[0] if len(pieces) == 1 else self.call(aten.cat.default, pieces, dim)


# ---------------------------------------------------------------------------------------------
# The analysis


def _shape(n) -> tuple:
    val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _linear_weight(n: torch.fx.Node, shardable: set[str]):
    """(input, weight, bias, weight's output dim) of a matmul with a splittable 2-D parameter weight."""
    if n.op != "call_function" or n.target not in _LINEAR:
        return None
    xi, wi, bi, out_dim = _LINEAR[n.target]
    args = list(n.args) + [None] * 3
    w = args[wi]
    if not isinstance(w, torch.fx.Node) or w.name not in shardable or len(_shape(w)) != 2:
        return None
    if n.target is aten.addmm.default and (n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1):
        return None
    b = args[bi] if bi is not None else None
    if b is not None and (not isinstance(b, torch.fx.Node) or b.name not in shardable or len(_shape(b)) != 1):
        return None
    return args[xi], w, b, out_dim


class _Propagation:
    """One pass over the graph: the layout of every value, given which matmuls may split by columns."""

    def __init__(self, graph, parts, seeds, shardable):
        self.graph, self.parts, self.seeds, self.shardable = graph, tuple(parts), seeds, shardable
        self.layouts: dict = {}
        self.params: dict[str, ParamShard] = {}
        self.rewrites: dict = {}
        self.poisoned: dict[str, str] = {}
        self.column: dict[str, int] = {}
        self.row: dict[str, int] = {}

    def poison(self, layout, reason: str) -> None:
        for origin in layout.origins:
            self.poisoned.setdefault(origin, reason)

    def layout(self, a):
        return self.layouts.get(a) if isinstance(a, torch.fx.Node) else None

    def run(self) -> None:
        for n in self.graph.nodes:
            if n.op == "output":
                for a in n.all_input_nodes:
                    if isinstance(self.layout(a), Shard):
                        self.poison(self.layout(a), f"its split reaches the stage output {a.name}")
                continue
            if n.op != "call_function":
                continue
            inputs = [a for a in n.all_input_nodes if isinstance(self.layout(a), (Shard, list))]
            if n.target is operator.getitem:
                chunks = self.layout(n.args[0])
                if isinstance(chunks, Shard):  # an item of a tuple some rule split: no rule knows which
                    self.layouts[n] = self.unknown(n, "an item of a split op's tuple")
                else:
                    self.layouts[n] = chunks[n.args[1]] if isinstance(chunks, list) else None
                continue
            if not inputs and n.name not in self.seeds and not self.vocab_parallel(n):
                continue  # all replicated: stays replicated
            self.layouts[n] = self.visit(n)

    # -- rules ----------------------------------------------------------------------------------

    def visit(self, n: torch.fx.Node):
        t = n.target
        if t in _LINEAR:
            return self.linear(n)
        if t is aten.embedding.default:
            return self.embedding(n)
        if t is aten.dropout.default:
            # Members draw from their own generators: dropout on a split would not draw the masks
            # one device draws, and would make the members' generators drift apart.
            if n.args[1] and (len(n.args) < 3 or n.args[2]):
                return self.unknown(n, "dropout with p > 0 on a split tensor")
            return self.pointwise(n)
        if t in _VIEWS:
            return self.view(n)
        if t is aten.sym_size.int:
            lay = self.layout(n.args[0])
            if n.args[1] % len(_shape(n.args[0])) != lay.dim:
                return None  # the size of a dim that is not split: the same on every rank
            return self.unknown(n, "the size of the split dim is read")
        if t in _ATTENTION:
            return self.attention(n)
        if t in _SAME_LAYOUT or torch.Tag.pointwise in getattr(t, "tags", ()):
            return self.pointwise(n)
        handler = {
            aten.transpose.int: self.transpose, aten.permute.default: self.permute,
            aten.unsqueeze.default: self.unsqueeze, aten.expand.default: self.expand,
            aten.slice.Tensor: self.slice, aten.split.Tensor: self.split,
            aten.split_with_sizes.default: self.split, aten.cat.default: self.cat,
            aten.mean.dim: self.reduce, aten.sum.dim_IntList: self.reduce, aten.amax.default: self.reduce,
            aten.softmax.int: self.along, aten._softmax.default: self.along, aten.log_softmax.int: self.along,
            aten._log_softmax.default: self.along, aten.layer_norm.default: self.layer_norm,
        }.get(t)
        if handler is not None:
            return handler(n)
        return self.unknown(n, f"{_op_name(n)} has no tensor-parallel rule")

    def unknown(self, n, reason: str):
        for a in n.all_input_nodes:
            lay = self.layout(a)
            if isinstance(lay, Shard):
                self.poison(lay, f"{reason} ({n.name})")
            elif isinstance(lay, list):
                for c in lay:
                    if isinstance(c, Shard):
                        self.poison(c, f"{reason} ({n.name})")
        return None

    def linear(self, n):
        found = _linear_weight(n, self.shardable)
        if found is None:
            return self.matmul(n)
        x, w, b, out_dim = found
        lay = self.layout(x)
        in_dim = 1 - out_dim
        if isinstance(lay, Shard):
            if lay.dim != len(_shape(x)) - 1:
                return self.unknown(n, f"{_op_name(n)} reads an input split on a dim other than its features")
            self.param(w, in_dim, lay.index)
            self.row[n.name] = min(self.column[o] for o in lay.origins)

            def row(rank, bld, n=n, b=b):
                args = list(bld.arg(n.args))
                partial = f"{n.name}_partial"  # this member's share of the sum
                if n.target is aten.addmm.default:
                    out = bld.call(aten.mm.default, args[1], args[2], name=partial)
                elif n.target is aten.linear.default:
                    out = bld.call(aten.linear.default, args[0], args[1], name=partial)
                else:
                    out = bld.call(n.target, *args, name=partial)
                out = bld.call(tp.all_reduce, out, name=f"{n.name}_sum")
                return bld.call(aten.add.Tensor, out, bld.env[b]) if b is not None else out

            self.rewrites[n] = row
            return None
        if lay is not None or n.name not in self.seeds:
            return self.unknown(n, f"{_op_name(n)} has no rule for this input")
        size = _shape(w)[out_dim]
        if not isinstance(size, int):
            return None
        groups, inner = self.structure(n, len(_shape(n)) - 1, size)
        units = size // (groups * inner)
        if any(hi == lo for lo, hi in split_units(units, self.parts)):
            self.poisoned.setdefault(n.name, f"{units} units (heads) cannot be split "
                                             f"{':'.join(map(str, self.parts))} with a share for every member")
            return None
        index = tuple(np.concatenate([np.arange(g * units * inner + lo * inner, g * units * inner + hi * inner)
                                      for g in range(groups)]).astype(np.int64)
                      for lo, hi in split_units(units, self.parts))
        self.param(w, out_dim, index)
        if b is not None:
            self.param(b, 0, index)
        self.column[n.name] = units
        xi = _LINEAR[n.target][0]

        def column(rank, bld, n=n, xi=xi, x=x):
            args = list(bld.arg(n.args))
            args[xi] = bld.enter(x)
            return bld.call(n.target, *args)

        self.rewrites[n] = column
        return Shard(len(_shape(n)) - 1, index, frozenset([n.name]))

    def vocab_parallel(self, n) -> bool:
        """An embedding whose table is split by vocabulary rows: a vocabulary (rows > 2x the width), whose
        table, gradient and optimizer state are worth an all-reduce; a position table stays whole."""
        if n.target is not aten.embedding.default:
            return False
        w, ids = n.args[:2]
        shape = _shape(w)
        return (w.name in self.shardable and len(shape) == 2 and isinstance(shape[0], int)
                and isinstance(shape[1], int) and shape[0] > 2 * shape[1]
                and not isinstance(self.layout(ids), Shard) and not any(n.args[3:5]))

    def embedding(self, n):
        """Vocabulary-parallel lookup: each member looks up the ids in its rows (zeros elsewhere); the sum
        over the group is the whole embedding."""
        if not self.vocab_parallel(n):
            return self.unknown(n, "embedding of split ids")
        w, ids = n.args[:2]
        padding = n.args[2] if len(n.args) > 2 else -1
        bounds = split_units(_shape(w)[0], self.parts)
        self.param(w, 0, tuple(np.arange(lo, hi) for lo, hi in bounds))

        def lookup(rank, bld, n=n, w=w, ids=ids, bounds=bounds, padding=padding):
            lo, hi = bounds[rank]
            x = bld.env[ids]
            outside = bld.call(aten.bitwise_or.Tensor, bld.call(aten.lt.Scalar, x, lo), bld.call(aten.ge.Scalar, x, hi),
                               name=f"{n.name}_outside")
            local_ids = bld.call(aten.masked_fill.Scalar, bld.call(aten.sub.Tensor, x, lo), outside, 0)
            local_padding = padding - lo if lo <= padding < hi else -1
            rows = bld.call(aten.embedding.default, bld.env[w], local_ids, local_padding, name=f"{n.name}_partial")
            rows = bld.call(aten.masked_fill.Scalar, rows, bld.call(aten.unsqueeze.default, outside, -1), 0.0)
            return bld.call(tp.all_reduce, rows, name=f"{n.name}_sum")

        self.rewrites[n] = lookup
        self.row[n.name] = _shape(w)[0]
        return None

    def param(self, p: torch.fx.Node, dim: int, index) -> None:
        self.params[p.name] = ParamShard(p.name, dim, tuple(ranges_of(i) for i in index))

    def structure(self, n: torch.fx.Node, dim: int, size: int) -> tuple[int, int]:
        """(groups, inner) of a column split's output features: GPT-2's fused q|k|v is 3 groups, and
        a view to (heads, head_dim) makes head_dim the inner size, so ranks get whole heads of each."""
        groups, inner = 1, 1
        frontier, seen = [(n, dim, size)], set()
        while frontier:
            node, d, s = frontier.pop(0)
            if node in seen or len(seen) > 64:
                continue
            seen.add(node)
            for u in node.users:
                t = u.target
                if t in (aten.split.Tensor, aten.split_with_sizes.default) and _dim_arg(u, 2, 0) % len(_shape(node)) == d:
                    chunks = u.args[1] if isinstance(u.args[1], (list, tuple)) else [u.args[1]] * (s // u.args[1])
                    if len(set(chunks)) == 1 and groups == 1 and s % chunks[0] == 0:
                        groups = s // chunks[0]
                        for item in u.users:
                            frontier.append((item, d, chunks[0]))
                elif t in _VIEWS:
                    pieces = _view_pieces(_shape(node), d, _shape(u))
                    if pieces is None:
                        continue
                    if len(pieces) == 1:
                        frontier.append((u, pieces[0], s))
                    else:
                        return groups, s // _shape(u)[pieces[0]]
                elif t in _SAME_LAYOUT or torch.Tag.pointwise in getattr(t, "tags", ()):
                    if len(_shape(u)) == len(_shape(node)):
                        frontier.append((u, d, s))
                elif t is aten.transpose.int:
                    a, b = (x % len(_shape(node)) for x in u.args[1:3])
                    frontier.append((u, b if d == a else a if d == b else d, s))
        return groups, inner

    def pointwise(self, n):
        out_shape = _shape(n)
        shards = []
        for a in n.all_input_nodes:
            lay = self.layout(a)
            if isinstance(lay, Shard):
                shards.append((a, lay.moved(lay.dim + len(out_shape) - len(_shape(a)))))
        if not shards:
            return None
        first = shards[0][1]
        for a, lay in shards[1:]:
            if not lay.same_split(first):
                self.poison(lay, f"{_op_name(n)} mixes two different splits ({n.name})")
                self.poison(first, f"{_op_name(n)} mixes two different splits ({n.name})")
                return None
        cut = {}  # replicated inputs that have the split dim in full: cut to the rank's part
        for i, a in enumerate(n.args):
            if not isinstance(a, torch.fx.Node) or isinstance(self.layout(a), Shard):
                continue
            shape = _shape(a)
            d = first.dim - (len(out_shape) - len(shape))
            if d >= 0 and shape[d] != 1:
                if a.name in self.shardable and a.op == "placeholder" and len(a.users) == 1:
                    self.param(a, d, first.index)
                else:
                    cut[i] = (a, d)
        if cut:
            def local(rank, bld, n=n, cut=cut, index=first.index):
                args = list(bld.arg(n.args))
                for i, (a, d) in cut.items():
                    args[i] = bld.local(a, d, index[rank])
                return bld.graph.call_function(n.target, tuple(args), bld.arg(n.kwargs))

            self.rewrites[n] = local
        return Shard(first.dim, first.index, frozenset().union(*(lay.origins for _, lay in shards)))

    def _only(self, n):
        """The layout of the op's single split input (its first argument), or None after poisoning."""
        lay = self.layout(n.args[0])
        others = [a for a in n.all_input_nodes[1:] if isinstance(self.layout(a), (Shard, list))]
        if not isinstance(lay, Shard) or others:
            return self.unknown(n, f"{_op_name(n)} has no rule for these inputs")
        return lay

    def transpose(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        rank = len(_shape(n.args[0]))
        a, b = (x % rank for x in n.args[1:3])
        return lay.moved(b if lay.dim == a else a if lay.dim == b else lay.dim)

    def permute(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        order = [d % len(n.args[1]) for d in n.args[1]]
        return lay.moved(order.index(lay.dim))

    def unsqueeze(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        d = n.args[1] % len(_shape(n))
        return lay.moved(lay.dim + (1 if d <= lay.dim else 0))

    def expand(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        dim = lay.dim + len(_shape(n)) - len(_shape(n.args[0]))
        if n.args[1][dim] != -1:
            self.rewrites[n] = _resize(n, 1, dim, lay.index)
        return lay.moved(dim)

    def slice(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        rank = len(_shape(n.args[0]))
        args = list(n.args) + [0, 0, None, None, 1][len(n.args):]
        dim, start, end, step = args[1] % rank, args[2], args[3], args[4]
        if dim != lay.dim:
            return lay
        size = _shape(n.args[0])[dim]
        start = 0 if start is None else start
        end = size if end is None or end > size else end
        if step != 1 or not isinstance(start, int) or not isinstance(end, int) or start < 0 or end < 0:
            return self.unknown(n, "a slice of the split dim with a step or negative bounds")
        index = tuple(i[(i >= start) & (i < end)] - start for i in lay.index)
        bounds = [(int(np.sum(i < start)), int(np.sum(i < end))) for i in lay.index]

        def local(rank, bld, n=n, dim=dim, bounds=bounds):
            lo, hi = bounds[rank]
            return bld.call(aten.slice.Tensor, bld.env[n.args[0]], dim, lo, hi)

        self.rewrites[n] = local
        return lay.moved(dim, index)

    def split(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        shape = _shape(n.args[0])
        dim = _dim_arg(n, 2, 0) % len(shape)
        size = shape[dim]
        if dim != lay.dim:
            return [lay] * len(n.meta["val"])
        if n.target is aten.split.Tensor:
            chunk = n.args[1]
            sizes = [min(chunk, size - s) for s in range(0, size, chunk)]
        else:
            sizes = list(n.args[1])
        starts = np.cumsum([0] + sizes)
        chunks = [lay.moved(dim, tuple(i[(i >= lo) & (i < hi)] - lo for i in lay.index))
                  for lo, hi in zip(starts[:-1], starts[1:])]
        local_sizes = [[len(c.index[r]) for c in chunks] for r in range(len(self.parts))]

        def local(rank, bld, n=n, dim=dim, local_sizes=local_sizes):
            return bld.call(aten.split_with_sizes.default, bld.env[n.args[0]], local_sizes[rank], dim)

        self.rewrites[n] = local
        return chunks

    def cat(self, n):
        tensors = [a for a in n.args[0] if _shape(a) != (0,)]  # torch.cat skips legacy empty 1-D tensors
        dim = _dim_arg(n, 1, 0) % len(_shape(n))
        lays = [self.layout(a) for a in tensors]
        if not all(isinstance(lay, Shard) for lay in lays):
            return self.unknown(n, "cat of split and whole tensors")
        first = lays[0]
        if dim != first.dim:
            if all(lay.same_split(first) for lay in lays):
                return Shard(first.dim, first.index, frozenset().union(*(lay.origins for lay in lays)))
            return self.unknown(n, "cat of tensors split differently")
        if any(lay.dim != dim for lay in lays):
            return self.unknown(n, "cat of tensors split on different dims")
        offsets = np.cumsum([0] + [_shape(a)[dim] for a in tensors])
        index = tuple(np.concatenate([lay.index[r] + off for lay, off in zip(lays, offsets)])
                      for r in range(len(self.parts)))
        return Shard(dim, index, frozenset().union(*(lay.origins for lay in lays)))

    def reduce(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        rank = len(_shape(n.args[0]))
        dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(rank))
        dims = sorted(d % rank for d in ([dims] if isinstance(dims, int) else dims))
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if lay.dim in dims:
            return self.unknown(n, f"{_op_name(n)} reduces over the split dim")
        return lay if keepdim else lay.moved(lay.dim - sum(d < lay.dim for d in dims))

    def along(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        if n.args[1] % len(_shape(n)) == lay.dim:
            return self.unknown(n, f"{_op_name(n)} runs along the split dim")
        return lay

    def layer_norm(self, n):
        lay = self.layout(n.args[0])
        rank = len(_shape(n.args[0]))
        normalized = len(n.args[1])
        if not isinstance(lay, Shard) or lay.dim >= rank - normalized or any(
                isinstance(self.layout(a), Shard) for a in n.all_input_nodes[1:]):
            return self.unknown(n, "layer_norm over the split dim")
        return lay

    def view(self, n):
        lay = self._only(n)
        if lay is None:
            return None
        moved = _view_layout(_shape(n.args[0]), lay, _shape(n))
        if moved is None:
            return self.unknown(n, f"{_op_name(n)} regroups the split dim")
        if isinstance(n.args[1][moved.dim], int) and n.args[1][moved.dim] != -1:
            self.rewrites[n] = _resize(n, 1, moved.dim, moved.index)
        return moved

    def attention(self, n):
        q, k, v = (self.layout(a) for a in n.args[:3])
        if not all(isinstance(lay, Shard) and lay.dim == 1 for lay in (q, k, v)) or not k.same_split(v):
            return self.unknown(n, "attention with query, key and value not split by the same heads")
        if n.kwargs.get("enable_gqa"):
            # Grouped heads (passes/grouped_attention.py): query head h reads key/value head h // g,
            # so a member's query heads must be the groups of its key/value heads.
            g = _shape(n.args[0])[1] // _shape(n.args[1])[1]
            groups = [(i[:, None] * g + np.arange(g)).ravel() for i in k.index]
            if not all(np.array_equal(a, b) for a, b in zip(q.index, groups)):
                return self.unknown(n, "grouped-query attention with query heads split unlike their "
                                       "key/value groups")
        elif not q.same_split(k):
            return self.unknown(n, "attention with query, key and value not split by the same heads")
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        if isinstance(mask, torch.fx.Node):
            mlay = self.layout(mask)
            mshape = _shape(mask)
            d = 1 - (4 - len(mshape))
            if isinstance(mlay, Shard):
                if not mlay.same_split(q):
                    return self.unknown(n, "attention with a mask split differently from the heads")
            elif d >= 0 and mshape[d] != 1:
                def local(rank, bld, n=n, mask=mask, d=d, index=q.index):
                    args = list(bld.arg(n.args))
                    args[3] = bld.local(mask, d, index[rank])
                    return bld.graph.call_function(n.target, tuple(args), bld.arg(n.kwargs))

                self.rewrites[n] = local
        if n.target is not aten.scaled_dot_product_attention.default:
            return self.unknown(n, "a fused attention variant without a rule")
        return Shard(1, q.index, q.origins | k.origins | v.origins)

    def matmul(self, n):
        """A matmul between activations (or a weight that cannot be split): batch dims may be split."""
        lays = [self.layout(a) for a in n.args[:2]]
        shapes = [_shape(a) for a in n.args[:2]]
        if (n.target is aten.bmm.default or n.target is aten.matmul.default) and all(
                isinstance(lay, Shard) for lay in lays) and lays[0].same_split(lays[1]) and \
                lays[0].dim < len(shapes[0]) - 2 and len(shapes[0]) == len(shapes[1]):
            return lays[0]
        return self.unknown(n, f"{_op_name(n)} with a split input")


def _op_name(n: torch.fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def _dim_arg(n: torch.fx.Node, pos: int, default: int) -> int:
    return n.args[pos] if len(n.args) > pos else n.kwargs.get("dim", default)


def _resize(n: torch.fx.Node, pos: int, dim: int, index) -> callable:
    """A rewrite that sets entry ``dim`` of the size list in argument ``pos`` to the rank's size."""
    def local(rank, bld, n=n, pos=pos, dim=dim, index=index):
        args = list(bld.arg(n.args))
        sizes = list(args[pos])
        sizes[dim] = len(index[rank])
        args[pos] = sizes
        return bld.graph.call_function(n.target, tuple(args), bld.arg(n.kwargs))

    return local


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)


def _inner(shape, dim) -> int | None:
    """The product of the sizes after ``dim``, when they are all static."""
    rest = shape[dim + 1:]
    return math.prod(rest) if all(isinstance(d, int) for d in rest) else None  # str: a symbolic size


def _view_pieces(in_shape, dim: int, out_shape) -> list[int] | None:
    """The output dims that dim ``dim`` of the input becomes in a view (one dim, or several when it splits)."""
    pin = _inner(in_shape, dim)
    if pin is None or not isinstance(in_shape[dim], int):
        return None
    period = pin * in_shape[dim]
    pieces = []
    for e in range(len(out_shape)):
        q = _inner(out_shape, e)
        if q is not None and isinstance(out_shape[e], int) and q >= pin and q * out_shape[e] <= period \
                and out_shape[e] > 1:
            pieces.append(e)
    if not pieces or math.prod(out_shape[e] for e in pieces) != in_shape[dim]:
        return None
    return pieces


def _view_layout(in_shape, lay: Shard, out_shape) -> Shard | None:
    """:func:`_moved_by_view` on hashable sizes and ranges, cached: every layer repeats the same views."""
    key = tuple(tuple(d if isinstance(d, int) else str(d) for d in shape) for shape in (in_shape, out_shape))
    found = _moved_by_view(*key, lay.dim, tuple(ranges_of(i) for i in lay.index))
    if found is None:
        return None
    e, ranges = found
    return lay.moved(e, tuple(np.concatenate([np.arange(lo, hi) for lo, hi in r] or [np.zeros(0)]).astype(np.int64)
                              for r in ranges))


def _table(size: int, indices: np.ndarray) -> np.ndarray:
    """A boolean array of ``size`` entries, True at ``indices``."""
    table = np.zeros(size, dtype=bool)
    table[indices] = True
    return table


@functools.lru_cache(maxsize=4096)
def _moved_by_view(in_shape, out_shape, d: int, ranges) -> tuple[int, tuple] | None:
    """Where a view moves a split: the output dim whose index alone decides which rank holds an element.

    Element o (counting over the static dims from the split one inwards) is held by
    the rank whose indices contain ``(o // inner_in) % size_in``; the split moves to
    output dim e if that equals membership of ``(o // inner_e) % size_e`` in some
    index set, checked on index arrays (in units of the common inner block).
    """
    pin = _inner(in_shape, d)
    if pin is None or not isinstance(in_shape[d], int):
        return None
    for e in range(len(out_shape)):  # the common case: the dim is kept as it is
        if out_shape[e] == in_shape[d] and _inner(out_shape, e) == pin:
            return e, ranges
    index_in = [np.concatenate([np.arange(lo, hi) for lo, hi in r] or [np.zeros(0)]).astype(np.int64)
                for r in ranges]
    period = pin * in_shape[d]
    split = any(0 < len(held) < in_shape[d] for held in index_in)  # some rank holds part of dim d
    for e in reversed(range(len(out_shape))):
        q = _inner(out_shape, e)
        if q is None or not isinstance(out_shape[e], int) or out_shape[e] == 1:
            continue
        pe = q * out_shape[e]
        if pe % period and period % pe:
            continue
        if pe <= pin and split:
            # Dim e runs through all its values inside one index of dim d, so a rank holding part
            # of dim d would hold every index of e and none: e cannot tell the ranks apart (the
            # check below would fail, on arrays of up to _MAX_PERIOD elements).
            continue
        unit = math.gcd(pin, q)  # membership is constant over blocks of this many elements
        length = max(pe, period) // unit
        if length > _MAX_PERIOD:
            continue
        o = np.arange(length)
        along_in = (o // (pin // unit)) % in_shape[d]
        along_out = (o // (q // unit)) % out_shape[e]
        index = []
        for held in index_in:
            # Membership by table lookup (np.isin sorts; these arrays reach millions of elements).
            member = _table(in_shape[d], held)[along_in]
            held_out = np.zeros(out_shape[e], dtype=bool)
            held_out[along_out[member]] = True
            mine = np.flatnonzero(held_out)
            if not np.array_equal(member, held_out[along_out]):
                break
            index.append(ranges_of(mine))
        else:
            return e, tuple(index)
    return None


# ---------------------------------------------------------------------------------------------
# What the planner needs to know


def _without_stamped_copies(graph: torch.fx.Graph) -> torch.fx.Graph:
    """The graph as traced, before passes/stamp_layers.py copied layer 1: the copies (and their
    parameter placeholders) left out, and what read the last copy reading layer 1 again. The TP
    analysis of a copy is that of layer 1 (same ops, same shapes, a whole input from the layer
    before), so analysing two layers instead of all of them gives the same answer, faster.
    Returns ``graph`` itself when nothing was stamped."""
    from passes.stamp_layers import STAMPED_FROM

    if not any(STAMPED_FROM in n.meta for n in graph.nodes):
        return graph
    by_name = {n.name: n for n in graph.nodes}
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        while a not in env:  # a copy of a copy of ... layer 1
            a = by_name[a.meta[STAMPED_FROM]]
        return env[a]

    for n in graph.nodes:
        if STAMPED_FROM not in n.meta:
            env[n] = sub.node_copy(n, arg)
    return sub


def _stamped_blocks(graph: torch.fx.Graph) -> dict[int, int]:
    """Block of a stamped layer -> block of the layer-1 nodes it copies."""
    from passes.stamp_layers import STAMPED_FROM

    by_name = {n.name: n for n in graph.nodes}
    out = {}
    for n in graph.nodes:
        if n.op == "call_function" and STAMPED_FROM in n.meta:
            out.setdefault(n.meta["block"], by_name[n.meta[STAMPED_FROM]].meta["block"])
    return out


def annotate_tp(cap, costs):
    """The blocks' costs with what tensor parallelism can do to them (:class:`~hetcompile.ir.Block` ``tp_*``).

    Splits the whole captured graph two ways and counts, per block, the FLOPs of
    the split ops, the bytes of the split parameters, the bytes all-reduced per
    sample and the fewest units (heads) a split has. A parameter two ops read (a
    tied embedding) stays whole, as lowering keeps it.
    """
    import dataclasses

    graph = _without_stamped_copies(cap.gm.graph)
    params = {n.name: n for n in graph.nodes if n.op == "placeholder" and cap.placeholders[n.name].kind == "param"}
    analysis = partition(graph, (1, 1), {name for name, n in params.items() if len(n.users) == 1})
    num = costs.num_blocks
    split_flops, comm, units = [0.0] * num, [0.0] * num, [None] * num
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        b = n.meta["block"]
        if isinstance(analysis.layouts.get(n), Shard) or n.name in analysis.row:
            split_flops[b] += n.meta["flops"]
        if n.name in analysis.row:
            comm[b] += n.meta["out_bytes"]
        split = analysis.column.get(n.name) or analysis.row.get(n.name)
        if split:
            units[b] = min(units[b] or split, split)
    split_bytes = [0] * num
    for name in analysis.params:
        p = params[name]
        split_bytes[min(u.meta["block"] for u in p.users)] += p.meta["val"].numel() * p.meta["val"].element_size()
    # A stamped layer's block gets the answer of the layer it copies.
    for b, source in _stamped_blocks(cap.gm.graph).items():
        split_flops[b], comm[b], units[b], split_bytes[b] = split_flops[source], comm[source], units[source], \
            split_bytes[source]
    per = 1.0 / cap.global_batch
    blocks = []
    for blk in costs.blocks:
        b = blk.index
        flops = blk.fwd_flops_per_sample / per
        blocks.append(dataclasses.replace(
            blk, tp_flops_fraction=split_flops[b] / flops if flops else 0.0,
            tp_param_fraction=split_bytes[b] / blk.param_bytes if blk.param_bytes else 0.0,
            tp_comm_bytes_per_sample=comm[b] * per, tp_units=units[b] or 1))
    return dataclasses.replace(costs, blocks=tuple(blocks))
