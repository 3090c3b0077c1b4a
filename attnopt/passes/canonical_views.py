"""Canonical forms of views, transposes and batched matmuls (rules of ``canonicalize``).

Entry points: :data:`VIEW_RULES` (transposes of transposes and permutes of permutes compose, an
identity disappears; nested ``contiguous``, full slices and identity casts go) and
:data:`MATMUL_RULES` (``baddbmm`` becomes matmul, mul and add; a two-operand ``einsum`` batched
matmul becomes ``matmul`` with explicit permutes). ``fuse-attention`` reuses :data:`VIEW_RULES`.
Every rule is exact.
"""

from __future__ import annotations

from typing import Any

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.core_ops import PermuteAttrs, ScalarOperandAttrs
from attnopt.ir.ops import NoAttrs
from attnopt.ir.symbolic import SymbolRef
from attnopt.passes.helpers import emit_before
from attnopt.passes.pattern import Rule, p


def _compose_transposes(graph: Graph, node: Node, x: Value) -> Value | None:
    inner = node.inputs[0].producer  # type: ignore[union-attr]
    rank = x.tensor_type.rank
    outer_pair = {node.attrs.dim0 % rank, node.attrs.dim1 % rank}
    inner_pair = {inner.attrs.dim0 % rank, inner.attrs.dim1 % rank}  # type: ignore[union-attr]
    return x if outer_pair == inner_pair else None


def _as_perm(node: Node, rank: int) -> list[int]:
    if node.op == "permute":
        return [d % rank for d in node.attrs.dims]
    perm = list(range(rank))
    a, b = node.attrs.dim0 % rank, node.attrs.dim1 % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _compose_permutes(graph: Graph, node: Node, x: Value) -> Value | None:
    inner = node.inputs[0].producer
    if inner is None or inner.op not in ("permute", "transpose"):
        return None
    rank = x.tensor_type.rank
    outer_perm, inner_perm = _as_perm(node, rank), _as_perm(inner, rank)
    composed = [inner_perm[d] for d in outer_perm]
    if composed == list(range(rank)):
        return x
    return emit_before(graph, node, "permute", [x], PermuteAttrs(dims=tuple(composed)))


def _contiguous_of_contiguous(graph: Graph, node: Node, x: Value) -> Value | None:
    return node.inputs[0]


def _full_slice(graph: Graph, node: Node) -> Value | None:
    args, kwargs = aten_call_args(node)
    names = ["self", "dim", "start", "end", "step"]
    bound = {"dim": 0, "start": None, "end": None, "step": 1}
    bound.update(dict(zip(names, args)))
    bound.update(kwargs)
    source = bound["self"]
    if not isinstance(source, Value) or bound["step"] != 1:
        return None
    size = source.shape[bound["dim"]]
    start, end = bound["start"], bound["end"]
    if start not in (None, 0) or not (end is None or _reaches(end, size)):
        return None
    return source if node.output.type == source.type else None


def _reaches(end: Any, size: int | str) -> bool:
    """Whether a slice end covers a whole dim (a symbolic dim: by its name or INT64_MAX)."""
    if isinstance(end, SymbolRef):
        return end.expr == size
    if not isinstance(end, int):
        return False
    return end >= size if isinstance(size, int) else end >= 2**62


def _baddbmm(graph: Graph, node: Node, **_: Any) -> Value | None:
    args, kwargs = aten_call_args(node)
    base, left, right = args[0], args[1], args[2]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    if not all(isinstance(v, Value) for v in (base, left, right)):
        return None
    product = emit_before(graph, node, "matmul", [left, right], NoAttrs())
    if alpha != 1:
        product = emit_before(
            graph, node, "mul", [product], ScalarOperandAttrs(scalar=float(alpha))
        )
    if beta == 0:
        if product.type != node.output.type:
            return None
        return product
    if beta != 1:
        base = emit_before(graph, node, "mul", [base], ScalarOperandAttrs(scalar=float(beta)))
    result = emit_before(graph, node, "add", [product, base], ScalarOperandAttrs())
    return result if result.type == node.output.type else None


def _einsum(graph: Graph, node: Node, **_: Any) -> Value | None:
    args, _kwargs = aten_call_args(node)
    equation, operands = args[0], args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "..." in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    left, right = lhs.split(",")
    if len(set(left)) != len(left) or len(set(right)) != len(right) or len(set(out)) != len(out):
        return None
    batch = [c for c in out if c in left and c in right]
    contracted = [c for c in left if c in right and c not in out]
    free_left = [c for c in left if c not in right]
    free_right = [c for c in right if c not in left]
    if len(contracted) != 1 or len(free_left) != 1 or len(free_right) != 1:
        return None
    if set(out) != set(batch) | set(free_left) | set(free_right):
        return None
    a_order = batch + free_left + contracted
    b_order = batch + contracted + free_right
    a = _permute_to(graph, node, operands[0], left, a_order)
    b = _permute_to(graph, node, operands[1], right, b_order)
    product = emit_before(graph, node, "matmul", [a, b], NoAttrs())
    produced = batch + free_left + free_right
    result = _permute_to(graph, node, product, "".join(produced), list(out))
    return result if result.type == node.output.type else None


def _permute_to(graph: Graph, node: Node, value: Value, have: str, want: list[str]) -> Value:
    perm = [have.index(c) for c in want]
    if perm == list(range(len(perm))):
        return value
    return emit_before(graph, node, "permute", [value], PermuteAttrs(dims=tuple(perm)))


VIEW_RULES = [
    Rule("transpose-of-transpose", p.transpose(p.transpose(p.var("x"))), _compose_transposes),
    Rule("permute-of-permute", p.permute(p.permute(p.var("x"))), _compose_permutes),
    Rule("permute-of-transpose", p.permute(p.transpose(p.var("x"))), _compose_permutes),
    Rule("transpose-of-permute", p.transpose(p.permute(p.var("x"))), _compose_permutes),
    Rule(
        "contiguous-of-contiguous",
        p.contiguous(p.contiguous(p.var("x"))),
        _contiguous_of_contiguous,
    ),
    Rule("full-slice", p.aten("aten.slice.Tensor"), _full_slice),
    Rule(
        "identity-cast",
        p.cast(p.var("x")),
        lambda graph, node, x: x if x.type == node.output.type else None,
    ),
]


#: Batched-matmul spellings rewritten to ``matmul`` (with explicit permutes and scales).
MATMUL_RULES = [
    Rule("baddbmm", p.aten("aten.baddbmm.default"), _baddbmm),
    Rule("einsum", p.aten("aten.einsum.default"), _einsum),
]
