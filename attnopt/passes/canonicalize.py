"""``canonicalize``: fold constants and normalise the forms attention is written in.

Entry point: :class:`Canonicalize`.

After this pass attention detection needs one pattern: softmax written as exp/sum (with or without
max subtraction) or exp(log_softmax) becomes ``softmax``; ``baddbmm`` becomes matmul, mul and add;
two-operand ``einsum`` batched matmuls become ``matmul`` with explicit permutes; scales held in
constant tensors become scalar attributes; transposes of transposes and permutes of permutes
compose (an identity disappears). Subgraphs that depend on no input and no trainable parameter
(mask construction from shapes, aranges, ``sqrt(head_dim)``) are computed once at compile time.
Around a softmax, reshapes that only regroup batch axes move to ``q @ k^T`` and past ``P @ V``
(scores kept as ``[B H, S, S]``), ``scores - term`` becomes ``scores + (-term)`` and a per-head
or per-row factor on the scores moves into q.
Every rule is exact: it rewrites to the same computation, never an approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnopt.ir import Graph, Node, Value, aten_call_args, get_op
from attnopt.ir.aten_args import is_inplace_target
from attnopt.ir.core_ops import DimAttrs, PermuteAttrs, ScalarOperandAttrs, ShapeAttrs
from attnopt.ir.ops import NoAttrs
from attnopt.passes.attention_match import reaches_matmul
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.helpers import constant_scalar, constant_tensor, emit_before
from attnopt.passes.pattern import Rule, apply_rules, p

#: Folded constants larger than this many elements stay computed at run time.
FOLD_LIMIT = 1 << 27
_NONDETERMINISTIC = re.compile(r"rand|bernoulli|normal|uniform|dropout|empty|multinomial|poisson")


def fold_constants(graph: Graph, limit: int = FOLD_LIMIT) -> int:
    """Compute, once, every pure node that depends on no graph input and no trainable parameter.

    Args:
        graph: the graph, edited in place.
        limit: largest folded result, in elements.

    Returns:
        How many values were replaced by constants.
    """
    parameters = set(graph.meta.get("parameters", ()))
    known: dict[int, Any] = {}
    folded_nodes: list[Node] = []
    for node in graph.nodes:
        if node.op == "param":
            if node.attrs.name not in parameters and node.attrs.name in graph.tensors:
                known[id(node.output)] = graph.tensors[node.attrs.name]
            continue
        if not _foldable(node):
            continue
        if not all(v is None or id(v) in known for v in node.inputs):
            continue
        if any(getattr(v.type, "is_static", True) is False for v in node.outputs):
            continue
        values = [None if v is None else known[id(v)] for v in node.inputs]
        try:
            with torch.no_grad():
                result = get_op(node.op).impl(values, node.attrs)
        except Exception:  # noqa: BLE001 - an op that cannot run now simply stays in the graph
            continue
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if not all(isinstance(r, torch.Tensor) and r.numel() <= limit for r in results):
            continue
        for value, tensor in zip(node.outputs, results):
            known[id(value)] = tensor
        folded_nodes.append(node)
    if not folded_nodes:
        return 0
    folded_ids = {id(n) for n in folded_nodes}
    readers_outside = set()
    for node in graph.nodes:
        if id(node) in folded_ids:
            continue
        for value in node.inputs:
            if value is not None:
                readers_outside.add(id(value))
    readers_outside |= {id(v) for v in graph.outputs if v is not None}
    count = 0
    for node in folded_nodes:
        for value in node.outputs:
            if id(value) not in readers_outside:
                continue
            tensor = known[id(value)]
            if tensor.dim() and tensor.stride() and 0 in tensor.stride():
                tensor = tensor.contiguous()
            new = graph.add_tensor(f"folded.{value.name}", tensor)
            graph.replace_all_uses(value, new)
            count += 1
    graph.dead_code_elimination()
    return count


def _foldable(node: Node) -> bool:
    if node.op == "aten":
        target = node.attrs.target
        return not is_inplace_target(target) and not _NONDETERMINISTIC.search(target)
    return node.op not in ("attention",) and get_op(node.op).pure


# --- rules ------------------------------------------------------------------------------------
def _last_dim(value: Value, dim: int) -> bool:
    rank = value.tensor_type.rank
    return dim % rank == rank - 1 if rank else False


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


def _exp_log_softmax(graph: Graph, node: Node, x: Value, dim: int) -> Value | None:
    return emit_before(graph, node, "softmax", [x], DimAttrs(dim=dim))


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
    if start not in (None, 0) or not (end is None or (isinstance(end, int) and end >= size)):
        return None
    return source if node.output.type == source.type else None


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


def _expand_of_expand(graph: Graph, node: Node, x: Value) -> Value | None:
    return emit_before(graph, node, "expand", [x], ShapeAttrs(shape=tuple(node.output.shape)))


def _contiguous_of_contiguous(graph: Graph, node: Node, x: Value) -> Value | None:
    return node.inputs[0]


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

#: Rules that keep masks small: broadcasts move outward, all-true conjunctions disappear.
MASK_RULES = [
    Rule("and-all-true", p.aten("aten.__and__.Tensor"), _and_all_true),
    Rule("logical-and-all-true", p.aten("aten.logical_and.default"), _and_all_true),
    Rule("expand-of-expand", p.expand(p.expand(p.var("x"))), _expand_of_expand),
    *[
        Rule(f"hoist-expand-{target}", p.aten(target), _hoist_expand)
        for target in sorted(_ELEMENTWISE_TARGETS)
    ],
    *[
        Rule(f"hoist-expand-{op}", getattr(p, op)(), _hoist_expand)
        for op in sorted(_ELEMENTWISE_CORE)
    ],
]

RULES = [
    *VIEW_RULES,
    *MASK_RULES,
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
    Rule("mul-by-constant", p.mul(p.var("x"), p.var("c"), scalar=None), _scalar_operand),
    Rule("div-by-constant", p.div(p.var("x"), p.var("c"), scalar=None), _scalar_operand),
    Rule("baddbmm", p.aten("aten.baddbmm.default"), _baddbmm),
    Rule("einsum", p.aten("aten.einsum.default"), _einsum),
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


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Fold constants and normalise attention's many written forms (exact)."""

    name: ClassVar[str] = "canonicalize"
    exact: ClassVar[bool] = True
    fold: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Fold constants, then apply the canonical-form rules to a fixpoint."""
        folded = fold_constants(graph) if self.fold else 0
        stats = apply_rules(graph, RULES)
        notes = [f"{name}: {count}" for name, count in sorted(stats.fired.items())]
        if folded:
            notes.append(f"folded {folded} constant values")
        return PassResult(changed=bool(folded or stats.total), rewrites=stats.total, notes=notes)
