"""Canonical softmax forms (rules of ``canonicalize``).

Entry point: :data:`SOFTMAX_RULES`: softmax written as exp/sum (with or without max subtraction)
or as ``exp(log_softmax)`` becomes one ``softmax`` node. Every rule is exact.
"""

from __future__ import annotations

from typing import Any

from attnopt.ir import Graph, Node, Value
from attnopt.ir.core_ops import DimAttrs
from attnopt.passes.helpers import emit_before
from attnopt.passes.pattern import Rule, p


def _softmax_of(graph: Graph, node: Node, x: Value, dim: Any) -> Value | None:
    dims = dim if isinstance(dim, tuple) else (dim,)
    if len(dims) != 1:
        return None
    return emit_before(graph, node, "softmax", [x], DimAttrs(dim=int(dims[0])))


def _exp_sum_softmax(
    graph: Graph, node: Node, x: Value, e: Value, dim: Any, **_: Any
) -> Value | None:
    sum_node = node.inputs[1].producer  # type: ignore[union-attr]
    if sum_node is None or not sum_node.attrs.keepdim:
        return None
    return _softmax_of(graph, node, x, dim)


def _shifted_softmax(graph: Graph, node: Node, x: Value, e: Value, dim: Any, mdim: Any, **_: Any):  # noqa: ANN202
    if tuple(dim if isinstance(dim, tuple) else (dim,)) != tuple(
        mdim if isinstance(mdim, tuple) else (mdim,)
    ):
        return None
    amax = node.inputs[0].producer.inputs[0].producer.inputs[1].producer  # type: ignore[union-attr]
    sum_node = node.inputs[1].producer  # type: ignore[union-attr]
    if not (amax.attrs.keepdim and sum_node.attrs.keepdim):  # type: ignore[union-attr]
        return None
    return _softmax_of(graph, node, x, dim)


def _exp_log_softmax(graph: Graph, node: Node, x: Value, dim: int) -> Value | None:
    return emit_before(graph, node, "softmax", [x], DimAttrs(dim=dim))


#: Decomposed softmaxes recomposed into ``softmax``.
SOFTMAX_RULES = [
    Rule(
        "exp-of-log-softmax", p.exp(p.log_softmax(p.var("x"), dim=p.var("dim"))), _exp_log_softmax
    ),
    Rule(
        "exp-sum-softmax-shifted",
        p.div(
            p.exp(p.sub(p.var("x"), p.amax(p.var("x"), dims=p.var("mdim")), scalar=None)),
            p.sum(
                p.exp(p.sub(p.var("x"), p.amax(p.var("x"), dims=p.var("mdim2")))), dims=p.var("dim")
            ),
            scalar=None,
        ),
        lambda graph, node, x, dim, mdim, mdim2, **kw: (
            _shifted_softmax(graph, node, x, None, dim, mdim) if mdim == mdim2 else None
        ),
    ),
    Rule(
        "exp-sum-softmax",
        p.div(p.exp(p.var("x")), p.sum(p.exp(p.var("x")), dims=p.var("dim")), scalar=None),
        lambda graph, node, x, dim, **kw: _exp_sum_softmax(graph, node, x, None, dim),
    ),
]
