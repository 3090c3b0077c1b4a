"""Canonical mask forms (rules of ``canonicalize``): keep masks small.

Entry point: :data:`MASK_RULES`: broadcasts (``expand``) move outward through elementwise ops,
nested expands merge, and conjunctions with an all-true constant disappear. Every rule is exact.
"""

from __future__ import annotations

import torch

from attnopt.ir import Graph, Node, Value
from attnopt.ir.core_ops import DimAttrs, ShapeAttrs
from attnopt.passes.helpers import constant_tensor, emit_aten_before, emit_before
from attnopt.passes.pattern import Rule, p

#: Elementwise ops through which a broadcast (``expand``) can be moved outward exactly.
_ELEMENTWISE_TARGETS = {
    "aten.where.ScalarOther",
    "aten.where.ScalarSelf",
    "aten.where.self",
    "aten.logical_not.default",
    "aten.bitwise_not.default",
    "aten.__and__.Tensor",
    "aten.logical_and.default",
    "aten.__or__.Tensor",
    "aten.logical_or.default",
    "aten.eq.Scalar",
    "aten.ne.Scalar",
    "aten.lt.Scalar",
    "aten.le.Scalar",
    "aten.gt.Scalar",
    "aten.ge.Scalar",
    "aten.masked_fill.Scalar",
}
_ELEMENTWISE_CORE = {"cast", "where", "masked_fill", "add", "sub", "mul", "div", "neg", "exp"}


def _is_elementwise(node: Node) -> bool:
    if node.op == "aten":
        return node.attrs.target in _ELEMENTWISE_TARGETS
    return node.op in _ELEMENTWISE_CORE


def _hoist_expand(graph: Graph, node: Node) -> Value | None:
    """``f(expand(x), scalars...)`` -> ``expand(f(x, scalars...))`` for elementwise ``f``."""
    if not _is_elementwise(node) or len(node.outputs) != 1:
        return None
    expanded = [
        i
        for i, v in enumerate(node.inputs)
        if v is not None and v.producer is not None and v.producer.op == "expand"
    ]
    if len(expanded) != 1:
        return None
    position = expanded[0]
    others = [v for i, v in enumerate(node.inputs) if i != position and v is not None]
    if any(v.tensor_type.rank != 0 for v in others):
        return None
    source = node.inputs[position].producer.inputs[0]  # type: ignore[union-attr]
    inputs = list(node.inputs)
    inputs[position] = source
    try:
        inner = emit_before(graph, node, node.op, inputs, node.attrs)
    except Exception:  # noqa: BLE001 - the op does not accept the smaller shape: leave it
        return None
    if inner.tensor_type.rank != node.output.tensor_type.rank:
        return None
    return emit_before(graph, node, "expand", [inner], ShapeAttrs(shape=tuple(node.output.shape)))


def _and_all_true(graph: Graph, node: Node) -> Value | None:
    """``x & True`` -> ``x`` (broadcast to the result shape)."""
    if node.op != "aten" or node.attrs.target not in (
        "aten.__and__.Tensor",
        "aten.logical_and.default",
    ):
        return None
    if len(node.inputs) != 2:
        return None
    for const_side, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        tensor = constant_tensor(graph, const_side)
        if tensor is None or tensor.dtype != torch.bool or not bool(tensor.all()):
            continue
        if other is None or other.dtype != torch.bool:
            continue
        if tuple(other.shape) == tuple(node.output.shape):
            return other
        return emit_before(
            graph, node, "expand", [other], ShapeAttrs(shape=tuple(node.output.shape))
        )
    return None


_AND_TARGETS = ("aten.__and__.Tensor", "aten.logical_and.default")


def _unsqueeze_of_and(graph: Graph, node: Node) -> Value | None:
    """``unsqueeze(a & b, d)`` -> ``unsqueeze'(a) & unsqueeze'(b)``: a conjunction inserted into
    the score layout (a ``[B, S, S]`` mask made ``[B, 1, S, S]``) keeps its conjuncts visible to
    mask analysis. Each operand is unsqueezed where the new dim falls inside its own
    right-aligned dims; operands it falls left of broadcast as they are."""
    inner = node.inputs[0]
    source = inner.producer if inner is not None else None
    if source is None or source.op != "aten" or source.attrs.target not in _AND_TARGETS:
        return None
    if len(source.inputs) != 2 or any(v is None or v.dtype != torch.bool for v in source.inputs):
        return None
    rank = inner.tensor_type.rank  # type: ignore[union-attr]
    dim = node.attrs.dim % (rank + 1)
    operands = []
    for operand in source.inputs:
        assert operand is not None
        position = dim - (rank - operand.tensor_type.rank)
        if position > 0:
            operand = emit_before(graph, node, "unsqueeze", [operand], DimAttrs(dim=position))
        operands.append(operand)
    out = emit_aten_before(graph, node, source.attrs.target, operands)
    return out if tuple(out.shape) == tuple(node.output.shape) else None


def _expand_of_expand(graph: Graph, node: Node, x: Value) -> Value | None:
    return emit_before(graph, node, "expand", [x], ShapeAttrs(shape=tuple(node.output.shape)))


#: Rules that keep masks small: broadcasts move outward, all-true conjunctions disappear.
MASK_RULES = [
    Rule("and-all-true", p.aten("aten.__and__.Tensor"), _and_all_true),
    Rule("logical-and-all-true", p.aten("aten.logical_and.default"), _and_all_true),
    Rule("expand-of-expand", p.expand(p.expand(p.var("x"))), _expand_of_expand),
    Rule("unsqueeze-of-and", p.unsqueeze(), _unsqueeze_of_and),
    *[
        Rule(f"hoist-expand-{target}", p.aten(target), _hoist_expand)
        for target in sorted(_ELEMENTWISE_TARGETS)
    ],
    *[
        Rule(f"hoist-expand-{op}", getattr(p, op)(), _hoist_expand)
        for op in sorted(_ELEMENTWISE_CORE)
    ],
]
