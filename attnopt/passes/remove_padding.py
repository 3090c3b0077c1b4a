"""``remove-padding``: token-wise work on the real tokens only, attention per sequence.

Entry point: :class:`RemovePadding`.

When the attention sites of a model share one proven key padding mask (mask analysis: kind
``key_padding``, a ``[B, 1, 1, S]`` bool computed from the model's integer/bool inputs alone), the
pass packs the real tokens of the padded batch into one ``[T, ...]`` layout at the first token-wise
op (token embeddings are looked up for the real tokens only), runs every token-wise op on it
(projections, MLPs, norms, activations, residual adds, RoPE), and runs attention over the packed
tokens as attention within each sequence (the ``segments`` operand: one SDPA call per run of
equal-length sequences on the CPU). Values leave the packed layout, scattered back to
``[B, S, ...]`` with zeros at the padded positions, only where something that is not token-wise
reads them (a pooler reading token 0, the model's outputs).

Contract: outputs at real positions equal the model's within the exact tolerance; outputs at
padded positions are zeros (mask-aware pooling and Hugging Face's heads never read them).
Reductions over the sequence inside the model (a pooler reading position 0 of a left-padded batch)
read those zeros: such models should pool outside, as sentence-transformers does.

Sites the pass cannot serve (other masks, biases, cross-attention, non-dense variants) keep the
padded layout (their inputs are scattered back) and are reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.core_ops import DimAttrs, ShapeAttrs, TransposeAttrs
from attnopt.ir.token_reduce import SiteTapAttrs
from attnopt.ir.tokens import TokenIndexAttrs
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.helpers import (
    ATEN_DIM_ARG,
    ATEN_POINTWISE,
    ELEMENTWISE_OPS,
    emit_at,
    emit_aten_before,
    emit_before,
    key_padding_keep,
)
from attnopt.passes.select import decline

TOKEN, HEAD = "token", "head"


@dataclass
class _Packed:
    value: Value  # in the packed layout: token [T, *rest], head [1, H, T, *rest]
    layout: str


class _Rewriter:
    def __init__(self, graph: Graph, mask: Value, symbol: str) -> None:
        self.graph = graph
        self.mask = mask
        self.batch, self.seq = mask.shape[0], mask.shape[3]
        self.symbol = symbol
        self.packed: dict[int, _Packed] = {}
        self.unpacked: dict[int, Value] = {}
        self.valid: Value | None = None
        self.indices: Value | None = None
        self.segments: Value | None = None
        self.sites: list[int] = []

    # -- layouts -------------------------------------------------------------------------------
    def is_token(self, value: Value) -> bool:
        shape = getattr(value.type, "shape", None)
        return shape is not None and len(shape) >= 2 and shape[:2] == (self.batch, self.seq)

    def packed_dim(self, dim: int, rank: int, layout: str) -> int | None:
        """The packed layout's dim for an original dim (None: a token dim)."""
        d = dim % rank
        if layout == TOKEN:
            return None if d < 2 else d - 1
        return None if d in (0, 2) else d

    def setup(self, anchor: Node) -> None:
        g = self.graph
        keep = key_padding_keep(self.mask)
        assert keep is not None
        self.valid = emit_before(
            g, anchor, "reshape", [keep], ShapeAttrs(shape=(self.batch, self.seq))
        )
        node = g.make_node("token_index", [self.valid], TokenIndexAttrs(symbol=self.symbol))
        g.insert_before(anchor, node)
        self.indices, self.segments = node.outputs[0], node.outputs[1]

    def pack(self, anchor: Node, value: Value, layout: str) -> Value:
        """``value`` (original layout, broadcastable to the token/head layout) packed."""
        g = self.graph
        assert self.indices is not None and self.valid is not None
        if layout == TOKEN:
            return emit_before(g, anchor, "pack", [value, self.indices, self.valid])
        # head layout [b, h, s, *rest] -> [B, S, h, *rest] -> [T, h, *rest] -> [1, h, T, *rest]
        shape = tuple(value.shape)
        full = (self.batch, shape[1], self.seq, *shape[3:])
        if shape != full:
            value = emit_before(g, anchor, "expand", [value], ShapeAttrs(shape=full))
        token = emit_before(g, anchor, "transpose", [value], TransposeAttrs(dim0=1, dim1=2))
        packed = emit_before(g, anchor, "pack", [token, self.indices, self.valid])
        moved = emit_before(g, anchor, "transpose", [packed], TransposeAttrs(dim0=0, dim1=1))
        return emit_before(g, anchor, "unsqueeze", [moved], DimAttrs(dim=0))

    def unpack(self, anchor: Node | None, value: Value) -> Value:
        """The original-layout value of a packed one (zeros at padded positions), emitted before
        ``anchor`` (None: at the end of the graph)."""
        cached = self.unpacked.get(id(value))
        if cached is not None:
            return cached
        entry = self.packed[id(value)]
        assert self.indices is not None and self.valid is not None
        if entry.layout == TOKEN:
            out = emit_at(self.graph, anchor, "unpack", [entry.value, self.indices, self.valid])
        else:
            shape = tuple(entry.value.shape[1:])
            inner = emit_at(self.graph, anchor, "reshape", [entry.value], ShapeAttrs(shape=shape))
            token = emit_at(
                self.graph, anchor, "transpose", [inner], TransposeAttrs(dim0=0, dim1=1)
            )
            padded = emit_at(self.graph, anchor, "unpack", [token, self.indices, self.valid])
            out = emit_at(self.graph, anchor, "transpose", [padded], TransposeAttrs(dim0=1, dim1=2))
        self.unpacked[id(value)] = out
        return out

    def operand(self, anchor: Node, value: Value, out: Value, layout: str) -> Value | None:
        """An operand of an elementwise op whose output is packed: packed, or broadcastable as
        it is, or None when it cannot be aligned."""
        if id(value) in self.packed:
            entry = self.packed[id(value)]
            return entry.value if entry.layout == layout else None
        rank, out_rank = value.tensor_type.rank, out.tensor_type.rank
        if rank < out_rank:
            lead = out_rank - rank
            if layout == TOKEN and lead >= 2:
                return value
            if layout == HEAD and lead >= 3:
                return value
            value = emit_before(
                self.graph,
                anchor,
                "reshape",
                [value],
                ShapeAttrs(shape=(1,) * lead + tuple(value.shape)),
            )
        shape = tuple(value.shape)
        token_dims = (0, 1) if layout == TOKEN else (0, 2)
        sizes = (self.batch, self.seq)
        for axis, size in zip(token_dims, sizes):
            # A symbolic dim (Min(512, s1) of a position table) is 1 or the length at run time,
            # or the op it feeds fails in the model too: pack's broadcast handles both.
            if shape[axis] not in (1, size) and not isinstance(shape[axis], str):
                return None
        if all(shape[axis] == 1 for axis in token_dims):
            if layout == TOKEN:  # [1, 1, *rest] -> [*rest]
                return emit_before(
                    self.graph, anchor, "reshape", [value], ShapeAttrs(shape=shape[2:])
                )
            return value  # [1, h, 1, *rest] broadcasts against [1, H, T, *rest]
        return self.pack(anchor, value, layout)

    # -- one node ------------------------------------------------------------------------------
    def rewrite(self, node: Node) -> bool:
        """Emit the packed version of ``node`` when it is token-wise over packed inputs."""
        reads_packed = any(v is not None and id(v) in self.packed for v in node.inputs)
        op = node.op
        if op == "aten" and node.attrs.target == "aten.embedding.default":
            return self._embedding(node)
        if not reads_packed or len(node.outputs) != 1:
            return False
        layouts = {
            self.packed[id(v)].layout for v in node.inputs if v is not None and id(v) in self.packed
        }
        if len(layouts) != 1:
            return False
        layout = layouts.pop()
        out = node.output
        if op in ELEMENTWISE_OPS or (op == "aten" and node.attrs.target in ATEN_POINTWISE):
            return self._elementwise(node, layout)
        if op == "linear" and id(node.inputs[0]) in self.packed and layout == TOKEN:
            others = node.inputs[1:]
            if any(v is not None and id(v) in self.packed for v in others):
                return False
            new = emit_before(
                self.graph,
                node,
                "linear",
                [self.packed[id(node.inputs[0])].value, *others],
                node.attrs,
            )
            self.packed[id(out)] = _Packed(new, TOKEN)
            return True
        if op == "reshape" and tuple(out.shape) == tuple(node.inputs[0].shape):  # type: ignore[union-attr]
            self.packed[id(out)] = self.packed[id(node.inputs[0])]  # an identity reshape
            return True
        if op == "reshape" and layout == TOKEN and self.is_token(out):
            source = self.packed[id(node.inputs[0])].value
            shape = (self.symbol, *out.shape[2:])
            new = emit_before(self.graph, node, "reshape", [source], ShapeAttrs(shape=shape))
            self.packed[id(out)] = _Packed(new, TOKEN)
            return True
        if op in ("transpose", "permute") and out.tensor_type.rank == 4:
            return self._swap(node, layout)
        if op in ("softmax", "log_softmax"):
            dim = self.packed_dim(node.attrs.dim, out.tensor_type.rank, layout)
            if dim is None:
                return False
            source = self.packed[id(node.inputs[0])].value
            new = emit_before(
                self.graph, node, op, [source], dataclasses.replace(node.attrs, dim=dim)
            )
            self.packed[id(out)] = _Packed(new, layout)
            return True
        if op == "aten" and node.attrs.target == "aten.layer_norm.default":
            return self._layer_norm(node, layout)
        if op == "aten" and node.attrs.target in ATEN_DIM_ARG:
            return self._dim_op(node, layout)
        if op == "attention":
            return self._attention(node, layout)
        return False

    def _embedding(self, node: Node) -> bool:
        args, kwargs = aten_call_args(node)
        weight, ids = args[0], args[1]
        if not isinstance(ids, Value) or id(ids) in self.packed or ids.tensor_type.rank != 2:
            return False
        if ids.shape[1] != self.seq or ids.shape[0] not in (1, self.batch):
            return False
        packed_ids = self.pack(node, ids, TOKEN)
        new = emit_aten_before(
            self.graph, node, node.attrs.target, [weight, packed_ids, *args[2:]], kwargs
        )
        self.packed[id(node.output)] = _Packed(new, TOKEN)
        return True

    def _elementwise(self, node: Node, layout: str) -> bool:
        out = node.output
        if node.op == "aten":
            args, kwargs = aten_call_args(node)
            new_args = []
            for arg in args:
                if isinstance(arg, Value):
                    aligned = self.operand(node, arg, out, layout)
                    if aligned is None:
                        return False
                    arg = aligned
                elif isinstance(arg, (list, tuple)) and any(isinstance(a, Value) for a in arg):
                    return False
                new_args.append(arg)
            new = emit_aten_before(self.graph, node, node.attrs.target, new_args, kwargs)
        else:
            inputs = []
            for value in node.inputs:
                if value is None:
                    inputs.append(None)
                    continue
                aligned = self.operand(node, value, out, layout)
                if aligned is None:
                    return False
                inputs.append(aligned)
            new = emit_before(self.graph, node, node.op, inputs, node.attrs)
        self.packed[id(out)] = _Packed(new, layout)
        return True

    def _swap(self, node: Node, layout: str) -> bool:
        """``transpose(1, 2)`` / ``permute(0, 2, 1, 3)``: token <-> head layout."""
        if node.op == "transpose":
            pair = sorted((node.attrs.dim0 % 4, node.attrs.dim1 % 4))
            if pair != [1, 2]:
                return False
        elif tuple(d % 4 for d in node.attrs.dims) != (0, 2, 1, 3):
            return False
        source = self.packed[id(node.inputs[0])].value
        g = self.graph
        if layout == TOKEN:  # [T, H, *] -> [1, H, T, *]
            moved = emit_before(g, node, "transpose", [source], TransposeAttrs(dim0=0, dim1=1))
            new = emit_before(g, node, "unsqueeze", [moved], DimAttrs(dim=0))
            self.packed[id(node.output)] = _Packed(new, HEAD)
        else:  # [1, H, T, *] -> [T, H, *]
            inner = emit_before(
                g, node, "reshape", [source], ShapeAttrs(shape=tuple(source.shape[1:]))
            )
            new = emit_before(g, node, "transpose", [inner], TransposeAttrs(dim0=0, dim1=1))
            self.packed[id(node.output)] = _Packed(new, TOKEN)
        return True

    def _layer_norm(self, node: Node, layout: str) -> bool:
        args, kwargs = aten_call_args(node)
        x, shape = args[0], args[1]
        rank = node.output.tensor_type.rank
        trailing = rank - (2 if layout == TOKEN else 3)
        if id(x) not in self.packed or len(shape) > trailing:
            return False
        if any(isinstance(a, Value) and id(a) in self.packed for a in args[2:]):
            return False
        new = emit_aten_before(
            self.graph, node, node.attrs.target, [self.packed[id(x)].value, *args[1:]], kwargs
        )
        self.packed[id(node.output)] = _Packed(new, layout)
        return True

    def _dim_op(self, node: Node, layout: str) -> bool:
        target = node.attrs.target
        args, kwargs = aten_call_args(node)
        position = ATEN_DIM_ARG[target]
        source = args[0]
        rank = (source[0] if isinstance(source, (list, tuple)) else source).tensor_type.rank
        if position >= len(args):
            return False
        dims = args[position]
        listed = isinstance(dims, (list, tuple))
        mapped = [self.packed_dim(d, rank, layout) for d in (dims if listed else [dims])]
        if any(d is None for d in mapped):
            return False
        new_args = list(args)
        new_args[position] = list(mapped) if listed else mapped[0]
        if isinstance(source, (list, tuple)):
            parts = []
            for part in source:
                if not isinstance(part, Value) or id(part) not in self.packed:
                    return False
                if self.packed[id(part)].layout != layout:
                    return False
                parts.append(self.packed[id(part)].value)
            new_args[0] = parts
        else:
            if id(source) not in self.packed:
                return False
            new_args[0] = self.packed[id(source)].value
        if any(isinstance(a, Value) for a in new_args[1:]):
            return False
        new = emit_aten_before(self.graph, node, target, new_args, kwargs)
        self.packed[id(node.output)] = _Packed(new, layout)
        return True

    def _attention(self, node: Node, layout: str) -> bool:
        q, k, v = node.inputs[:3]
        rest = list(node.inputs[3:]) + [None] * (5 - len(node.inputs))
        mask, bias, extra = rest[0], rest[1], rest[2:]
        if layout != HEAD or any(
            id(x) not in self.packed or self.packed[id(x)].layout != HEAD for x in (q, k, v)
        ):  # type: ignore[arg-type]
            return False
        if mask is not self.mask or bias is not None or any(x is not None for x in extra):
            return False
        if node.attrs.variant != "dense" or node.attrs.softcap is not None:
            return False
        inputs = [self.packed[id(x)].value for x in (q, k, v)] + [
            None,
            None,
            None,
            None,
            self.segments,
        ]  # type: ignore[arg-type]
        new = emit_before(self.graph, node, "attention", inputs, node.attrs)
        new.producer.meta.update(node.meta)  # type: ignore[union-attr]
        tap = self.graph.make_node(
            "site_tap",
            [new, None, self.indices, self.valid],
            SiteTapAttrs(site=node.attrs.site, batch=None),
        )
        self.graph.insert_before(node, tap)
        self.packed[id(node.output)] = _Packed(new, HEAD)
        self.sites.append(node.attrs.site)
        return True


def _shared_padding_mask(graph: Graph) -> tuple[Value | None, list[tuple[int, str]]]:
    """The key padding mask every servable site reads, and the sites that cannot be served."""
    counts: dict[int, tuple[Value, int]] = {}
    refused: list[tuple[int, str]] = []
    for node in graph.find("attention"):
        attrs = node.attrs
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        kinds = set((attrs.mask_kind or "").split("+"))
        if mask is None or "key_padding" not in kinds:
            refused.append(
                (
                    attrs.site,
                    f"no proven key padding mask (mask analysis: {attrs.mask_kind or 'none'})",
                )
            )
            continue
        if "mask" in kinds or "documents" in kinds:
            refused.append((attrs.site, f"a mask beyond key padding ({attrs.mask_kind})"))
            continue
        if (
            key_padding_keep(mask) is None
            or mask.tensor_type.rank != 4
            or mask.shape[1:3] != (1, 1)
        ):
            refused.append((attrs.site, "the key padding mask is not a [B, 1, 1, S] bool"))
            continue
        if node.inputs[0].shape[2] != node.inputs[1].shape[2]:  # type: ignore[union-attr]
            refused.append((attrs.site, "cross-attention (queries and keys differ)"))
            continue
        if (
            attrs.variant != "dense"
            or attrs.softcap is not None
            or node.inputs[4:5] not in ([], [None])
        ):
            refused.append((attrs.site, "a bias, soft-capping or a non-dense variant"))
            continue
        seen = counts.get(id(mask))
        counts[id(mask)] = (mask, (seen[1] if seen else 0) + 1)
    if not counts:
        return None, refused
    mask = max(counts.values(), key=lambda item: item[1])[0]
    for node in graph.find("attention"):
        other = node.inputs[3] if len(node.inputs) > 3 else None
        if other is not None and other is not mask and id(other) in counts:
            refused.append((node.attrs.site, "reads another padding mask than the other sites"))
    return mask, refused


def _hoist_cone(graph: Graph, value: Value) -> Node | None:
    """Move the nodes computing ``value`` (from inputs and constants only) to the front; returns
    the node after which ``value`` is available (None: it could not be proven input-only)."""
    cone: set[int] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer
        if node is None or id(node) in cone:
            continue
        if current.dtype.is_floating_point and node.op != "param":
            return None
        cone.add(id(node))
        stack.extend(v for v in node.inputs if v is not None)
    moved = [n for n in graph.nodes if id(n) in cone]
    rest = [n for n in graph.nodes if id(n) not in cone]
    graph.nodes = moved + rest
    return value.producer


@dataclass(frozen=True)
class RemovePadding(Pass):
    """Run token-wise ops on the real tokens only and attention per sequence (exact at the real
    positions; padded positions of the outputs become zeros).

    Options:
        min_sites: rewrite only when at least this many attention sites are served.
    """

    name: ClassVar[str] = "remove-padding"
    exact: ClassVar[bool] = True
    min_sites: int = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Pack the real tokens around the sites that share the proven key padding mask."""
        notes: list[str] = []
        declined: list[tuple[int, str]] = []
        mask, refused = _shared_padding_mask(graph)
        for site, reason in refused:
            decline(notes, declined, site, reason)
        if mask is None:
            return PassResult(changed=False, notes=notes, declined=declined)
        symbol = _fresh_symbol(graph)
        snapshot = graph.copy()
        order = list(graph.nodes)
        keep = key_padding_keep(mask)
        assert keep is not None
        anchor = _hoist_cone(graph, keep)
        if anchor is None:
            graph.nodes = order
            notes.append("the padding mask is not computed from the inputs alone")
            return PassResult(changed=False, notes=notes, declined=declined)
        rewriter = _Rewriter(graph, mask, symbol)
        after = graph.nodes[graph.nodes.index(anchor) + 1]
        rewriter.setup(after)
        graph.meta.setdefault("symbol_hints", {})[symbol] = _example_tokens(graph, mask)
        created: set[int] = set()
        for node in list(graph.nodes):
            if id(node) in created or node.op in ("param", "token_index"):
                continue
            before = len(graph.nodes)
            index = graph.nodes.index(node)
            if rewriter.rewrite(node):
                created.update(
                    id(n) for n in graph.nodes[index : index + len(graph.nodes) - before]
                )
                continue
            for position, value in enumerate(node.inputs):
                if value is not None and id(value) in rewriter.packed:
                    node.inputs[position] = rewriter.unpack(node, value)
            start = graph.nodes.index(node)
            created.update(id(n) for n in graph.nodes[index:start])
        for position, value in enumerate(graph.outputs):
            if value is not None and id(value) in rewriter.packed:
                graph.outputs[position] = rewriter.unpack(None, value)
        if len(rewriter.sites) < self.min_sites:
            graph.nodes = snapshot.nodes
            graph.inputs, graph.outputs = snapshot.inputs, snapshot.outputs
            graph.meta.clear()
            graph.meta.update(snapshot.meta)
            notes.append(
                f"{len(rewriter.sites)} sites packed (min_sites={self.min_sites}): unchanged"
            )
            return PassResult(changed=False, notes=notes, declined=declined)
        graph.dead_code_elimination()
        graph.infer_types()
        notes.append(f"packed real tokens around sites {sorted(rewriter.sites)}")
        graph.meta["removed_padding"] = {"symbol": symbol, "input": _mask_input(graph, mask)}
        return PassResult(
            changed=True, rewrites=len(rewriter.sites), notes=notes, declined=declined
        )


def _mask_input(graph: Graph, mask: Value) -> str | None:
    """The graph input the padding mask reads as ``input != 0`` (the user's attention mask): one
    ``[B, S]`` input, read in the mask's computation only by casts to bool. Validation compares
    real positions by it; None when the mask is built otherwise."""
    inputs = {id(v): v for v in graph.inputs}
    found: set[int] = set()
    stack, seen = [mask], set()
    while stack:
        value = stack.pop()
        node = value.producer
        if id(value) in seen or node is None:
            continue
        seen.add(id(value))
        for operand in node.inputs:
            if operand is None:
                continue
            if id(operand) in inputs:
                if node.op != "cast" or value.dtype != torch.bool:
                    return None
                found.add(id(operand))
            else:
                stack.append(operand)
    if len(found) != 1:
        return None
    source = inputs[found.pop()]
    return source.name if source.tensor_type.rank == 2 else None


def _fresh_symbol(graph: Graph) -> str:
    hints = graph.meta.get("symbol_hints", {})
    index = 0
    while f"ntok{index}" in hints:
        index += 1
    return f"ntok{index}"


def _example_tokens(graph: Graph, mask: Value) -> int:
    """A hint for the number of real tokens (guides shape inference only): the padded size at
    the example, minus one so it is never mistaken for it."""
    from attnopt.ir.symbolic import evaluate_dim

    hints = graph.meta.get("symbol_hints", {})
    try:
        size = evaluate_dim(mask.shape[0], hints) * evaluate_dim(mask.shape[3], hints)
    except KeyError:
        size = 64
    return max(3, size - 1)
