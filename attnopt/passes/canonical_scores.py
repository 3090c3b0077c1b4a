"""Canonical forms of the attention scores on their way to the softmax (rules of ``canonicalize``).

Entry points: :data:`SCALE_RULES` (scales held in constant tensors become scalar attributes) and
:data:`SCORE_RULES`: around a softmax, reshapes that only regroup batch axes move to ``q @ k^T``
and past ``P @ V`` (scores kept as ``[B H, S, S]``), ``scores - term`` becomes
``scores + (-term)`` and a per-head or per-row factor on the scores moves into q. Every rule is
exact.
"""

from __future__ import annotations

import torch

from attnopt.ir import Graph, Node, Value
from attnopt.ir.core_ops import ScalarOperandAttrs, ShapeAttrs
from attnopt.ir.ops import NoAttrs
from attnopt.passes.attention_match import reaches_matmul
from attnopt.passes.helpers import constant_scalar, emit_before
from attnopt.passes.pattern import Rule, p


def _scalar_operand(graph: Graph, node: Node, x: Value, c: Value) -> Value | None:
    value = constant_scalar(graph, c)
    if value is None or node.attrs.alpha != 1.0:
        return None
    if c.tensor_type.rank > x.tensor_type.rank or not x.dtype.is_floating_point:
        return None
    promoted = torch.promote_types(x.dtype, c.dtype)
    if promoted != x.dtype:
        return None
    return emit_before(graph, node, node.op, [x], ScalarOperandAttrs(scalar=value))


def _softmax_output(value: Value) -> bool:
    """Whether ``value`` is a softmax output, possibly through floating-point casts."""
    node = value.producer
    while node is not None and node.op == "cast" and node.attrs.dtype.is_floating_point:
        node = node.inputs[0].producer  # type: ignore[union-attr]
    return node is not None and node.op == "softmax"


def _weights_reshape_before_pv(graph: Graph, node: Node, w: Value, x: Value) -> Value | None:
    """``matmul(reshape(P), X)`` -> ``reshape(matmul(P, reshape(X)))`` for attention weights ``P``
    when the reshape only regroups batch axes (BLOOM, DeBERTa, Falcon-ALiBi: ``[B, H, S, S]``
    weights flattened to ``[B H, S, S]`` for ``bmm``). Batched matmul is per batch element, so
    regrouping the batch axes of both operands the same row-major way is the same product."""
    reshaped = node.inputs[0]
    if not _softmax_output(w) or reshaped is None or x is None:
        return None
    if len(w.shape) < 3 or len(reshaped.shape) < 2 or len(x.shape) != len(reshaped.shape):
        return None
    if tuple(reshaped.shape[-2:]) != tuple(w.shape[-2:]):
        return None  # the query/key axes moved: not a batch regrouping
    if tuple(x.shape[:-2]) != tuple(reshaped.shape[:-2]) or not _static(w, x, node.output):
        return None  # broadcasting or symbolic shapes: leave it alone
    x_grouped = emit_before(
        graph, node, "reshape", [x], ShapeAttrs(shape=(*w.shape[:-2], *x.shape[-2:]))
    )
    product = emit_before(graph, node, "matmul", [w, x_grouped], NoAttrs())
    return emit_before(
        graph, node, "reshape", [product], ShapeAttrs(shape=tuple(node.output.shape))
    )


def _sink_batch_reshape(graph: Graph, node: Node, x: Value) -> Value | None:
    """Move a reshape that only regroups batch axes on its way to a softmax one op closer to
    ``q @ k^T``: ``reshape(op(a, b))`` -> ``op(reshape(a), reshape(b))`` for matmul, casts, tanh
    and arithmetic. Repeated, it reaches the matmul, whose operands then carry the attention's
    batch layout (BLOOM / DeBERTa score ``[B H, S, S]`` then view it as ``[B, H, S, S]``). Exact:
    every such op works per batch element, and both sides are regrouped the same row-major way."""
    out_shape = tuple(node.output.shape)
    if not _static(x, node.output) or len(x.shape) < 3 or len(out_shape) < 2:
        return None
    if tuple(x.shape[-2:]) != out_shape[-2:] or tuple(x.shape) == out_shape:
        return None
    producer = x.producer
    ops = ("matmul", "cast", "tanh", "add", "sub", "mul", "div")
    if producer is None or producer.op not in ops or len(graph.users().get(x, [])) != 1:
        return None
    softmax = _feeds_softmax(graph, node.output)
    if softmax is None or tuple(softmax.inputs[0].shape) != out_shape:  # type: ignore[union-attr]
        return None  # only the reshape to the softmax's own layout moves
    batch = tuple(x.shape[:-2])

    def regroup(value: Value | None) -> Value | None:
        if value is None or not _static(value) or tuple(value.shape[:-2]) != batch:
            return None
        shape = (*out_shape[:-2], *value.shape[-2:])
        return emit_before(graph, node, "reshape", [value], ShapeAttrs(shape=shape))

    operands = [v for v in producer.inputs if v is not None]
    if producer.op in ("matmul", "add", "sub", "mul", "div") and len(operands) == 2:
        if any(len(v.shape) != len(x.shape) or tuple(v.shape[:-2]) != batch for v in operands):
            return None
    regrouped = [regroup(v) for v in operands]
    if any(v is None for v in regrouped):
        return None
    return emit_before(graph, node, producer.op, regrouped, producer.attrs)


def _row_scale_into_q(graph: Graph, node: Node, a: Value, b: Value, t: Value) -> Value | None:
    """``(a @ b) * t`` -> ``(a * t) @ b`` when ``t`` is constant along the key axis (one factor per
    head or query row, Swin-v2's learned logit scale) and the product reaches a softmax: the
    detector then sees a plain ``q @ k^T`` with a scaled q. Same product, rounded differently."""
    product = node.inputs[0] if node.inputs[1] is t else node.inputs[1]
    if node.attrs.alpha != 1.0 or t is None or product is None or not _static(a, t, product):
        return None
    if not t.dtype.is_floating_point or t.dtype != a.dtype or len(t.shape) == 0:
        return None
    if t.shape[-1] != 1 or len(t.shape) > len(a.shape):
        return None
    try:
        if tuple(torch.broadcast_shapes(tuple(t.shape), tuple(product.shape))) != tuple(
            product.shape
        ) or tuple(torch.broadcast_shapes(tuple(t.shape), tuple(a.shape))) != tuple(a.shape):
            return None
    except RuntimeError:
        return None
    if len(graph.users().get(product, [])) != 1 or _feeds_softmax(graph, node.output) is None:
        return None
    scaled = emit_before(graph, node, "mul", [a, t], ScalarOperandAttrs())
    return emit_before(graph, node, "matmul", [scaled, b], NoAttrs())


def _static(*values: Value) -> bool:
    return all(v.tensor_type.is_static for v in values)


def _sub_of_scores(graph: Graph, node: Node, x: Value, y: Value) -> Value | None:
    """``scores - term`` -> ``scores + (-term)`` when ``scores`` comes from ``q @ k^T`` and the
    result reaches a softmax (Funnel subtracts its padding penalty): the detector then reads the
    term as an additive mask. Exact: ``a - b == a + (-b)`` in IEEE arithmetic."""
    if node.attrs.alpha != 1.0 or not reaches_matmul(x) or reaches_matmul(y):
        return None
    if _feeds_softmax(graph, node.output) is None:
        return None
    negated = emit_before(graph, node, "neg", [y])
    return emit_before(graph, node, "add", [x, negated], ScalarOperandAttrs())


def _feeds_softmax(graph: Graph, value: Value, depth: int = 8) -> Node | None:
    """The softmax ``value`` reaches through the ops that sit between scores and softmax."""
    users = graph.users()
    between = {"add", "sub", "mul", "div", "masked_fill", "where", "cast", "reshape", "aten"}
    while depth > 0:
        readers = users.get(value, [])
        if len(readers) != 1:
            return None
        reader = readers[0]
        if reader.op == "softmax":
            return reader
        if reader.op not in between:
            return None
        value, depth = reader.output, depth - 1
    return None


#: Scales held in constant tensors become scalar attributes.
SCALE_RULES = [
    Rule("mul-by-constant", p.mul(p.var("x"), p.var("c"), scalar=None), _scalar_operand),
    Rule("div-by-constant", p.div(p.var("x"), p.var("c"), scalar=None), _scalar_operand),
]

#: Rules that bring the path from ``q @ k^T`` through the softmax to ``P @ V`` to one layout.
SCORE_RULES = [
    Rule(
        "weights-reshape-before-pv",
        p.matmul(p.reshape(p.var("w")), p.var("x")),
        _weights_reshape_before_pv,
    ),
    Rule("sub-of-scores", p.sub(p.var("x"), p.var("y"), scalar=None), _sub_of_scores),
    Rule("sink-batch-reshape-to-scores", p.reshape(p.var("x")), _sink_batch_reshape),
    Rule(
        "row-scale-into-q",
        p.mul(p.matmul(p.var("a"), p.var("b")), p.var("t"), scalar=None),
        _row_scale_into_q,
    ),
    Rule(
        "row-scale-into-q-left",
        p.mul(p.var("t"), p.matmul(p.var("a"), p.var("b")), scalar=None),
        _row_scale_into_q,
    ),
]
