"""The attention detector: prove that a softmax is the middle of an attention computation.

Entry points: :func:`match_attention`, :class:`AttentionMatch`, :class:`NoMatch`,
:func:`reaches_matmul`.

Starting at a ``softmax`` over the last axis, the weights (through dtype casts) must have exactly
one reader, ``matmul(weights, v)``; backward, every value between ``q @ k^T`` and the softmax must
have one reader, and each op on the way must be one whose effect the ``attention`` op reproduces
exactly: a scalar scale, tanh soft-capping, additive tensors, masked_fill / where with a very
negative fill, dtype casts, constant shifts and reshapes that keep the last two axes. Nothing is
edited here; :mod:`attnopt.passes.attention_build` turns a match into an ``attention`` node.

A reader that takes only a value's shape, dtype and device (``torch.zeros_like(scores)``,
``scores.new_full(...)``, ``mask.expand_as(scores)``: :data:`METADATA_OPERAND`) is not a use of
its elements: it does not count, and the match lists it (``AttentionMatch.shape_readers``) so the
rewrite can make it stop reading the value the fused op no longer computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.core_ops import ScalarOperandAttrs
from attnopt.passes.helpers import (
    constant_scalar,
    constant_tensor,
)

#: A fill at or below this value masks a key (its softmax weight underflows to exactly zero).
MASK_FILL_LIMIT = -1.0e4
#: An additive constant at or below this value is a mask entry, not a bias.
ADDITIVE_MASK_LIMIT = -1.0e30
#: ATen ops that read one operand for its shape, dtype and device only, never its elements
#: (target -> that operand's position). Size queries (``x.size(-1)``, ``x.shape``,
#: ``x.numel()``, ``aten.sym_size.int``) never reach the IR: capture makes them ints or symbolic
#: dims.
METADATA_OPERAND = {
    "aten.zeros_like.default": 0,
    "aten.ones_like.default": 0,
    "aten.empty_like.default": 0,
    "aten.full_like.default": 0,
    "aten.new_zeros.default": 0,
    "aten.new_ones.default": 0,
    "aten.new_empty.default": 0,
    "aten.new_full.default": 0,
    "aten.expand_as.default": 1,
}
#: ATen factories of a tensor holding one number everywhere: target -> position of the number.
_FILL_POSITION = {"aten.full.default": 1, "aten.full_like.default": 1, "aten.new_full.default": 2}


class NoMatch(Exception):
    """Raised inside the detector with the reason a candidate is not attention."""


@dataclass
class AttentionMatch:
    """What the detector proved about one site (before any graph edit)."""

    softmax: Node
    qk: Node
    pv: Node
    scale: float = 1.0
    softcap: float | None = None
    additive: list[tuple[Value, tuple]] = field(default_factory=list)  # (term, shape it adds at)
    fills: list[tuple[Value, bool, float]] = field(default_factory=list)  # (mask, True=masked, v)
    out_cast: torch.dtype | None = None
    add_after_fill: bool = False  # an additive term applied after a fill
    # Readers of the scores, the weights or a value between that take only its shape, dtype and
    # device: (reader, the value it reads). The rewrite detaches them from the value.
    shape_readers: list[tuple[Node, Value]] = field(default_factory=list)
    nan_weights_zero: bool = False  # where(isnan(w), 0, w) between softmax and @ v


def _nan_zeroing(
    graph: Graph, users: dict[Value, list[Node]], readers: list[Node], w: Value
) -> Node | None:
    """The node computing ``where(isnan(w), 0, w)`` (or ``w.masked_fill(isnan(w), 0)``) when
    ``readers`` of the weights ``w`` are exactly that and its ``isnan``, else None."""
    if len(readers) != 2 or _returned(graph, w):
        return None
    isnan = next(
        (n for n in readers if n.op == "aten" and n.attrs.target == "aten.isnan.default"), None
    )
    if isnan is None:
        return None
    select = next(n for n in readers if n is not isnan)
    flag = isnan.output
    if users.get(flag) != [select] or _returned(graph, flag):
        return None
    if select.op == "where" and select.inputs[0] is flag and select.inputs[2] is w:
        zero = constant_tensor(graph, select.inputs[1])
        is_zero = zero is not None and zero.numel() == 1 and float(zero) == 0.0
    elif select.op == "masked_fill" and select.inputs == [w, flag]:
        is_zero = float(select.attrs.value) == 0.0
    elif select.op == "aten" and select.attrs.target == "aten.where.ScalarSelf":
        args, kwargs = aten_call_args(select)
        is_zero = not kwargs and args[0] is flag and args[2] is w and args[1] == 0
    else:
        return None
    return select if is_zero and select.output.dtype == w.dtype else None


def reads_metadata_only(node: Node, value: Value) -> bool:
    """Whether ``node`` reads only the shape, dtype and device of ``value``, never its elements.

    Args:
        node: a reader of ``value``.
        value: the value read.

    Returns:
        True for an op of :data:`METADATA_OPERAND` that takes ``value`` at that operand and
        nowhere else (``scores.expand_as(scores)`` reads the elements).
    """
    position = METADATA_OPERAND.get(node.attrs.target) if node.op == "aten" else None
    if position is None:
        return False
    args, kwargs = aten_call_args(node)
    return len(args) > position and args[position] is value and _count(value, [args, kwargs]) == 1


def _count(value: Value, data: Any) -> int:
    if data is value:
        return 1
    if isinstance(data, (list, tuple)):
        return sum(_count(value, item) for item in data)
    if isinstance(data, dict):
        return sum(_count(value, item) for item in data.values())
    return 0


def _element_readers(
    users: dict[Value, list[Node]], value: Value, shape_readers: list[tuple[Node, Value]]
) -> list[Node]:
    """The nodes that read the elements of ``value``; those that read only its metadata are
    added to ``shape_readers`` instead."""
    readers = []
    for node in users.get(value, []):
        if not reads_metadata_only(node, value):
            readers.append(node)
        elif all(node is not seen for seen, _ in shape_readers):
            shape_readers.append((node, value))
    return readers


def _returned(graph: Graph, value: Value) -> int:
    return sum(1 for v in graph.outputs if v is value)


def _describe(readers: list[Node], returned: bool, skip: Node | None = None) -> str:
    """Who else reads the elements of a value: "read by %a, %b" and/or "returned"."""
    names = [
        f"%{node.outputs[0].name}" if node.outputs else node.op
        for node in readers
        if node is not skip
    ]
    parts = [f"read by {', '.join(dict.fromkeys(names))}"] if names else []
    return ", ".join(parts + ["returned"] * returned)


def reaches_matmul(value: Value, depth: int = 32) -> bool:
    """Whether ``value`` is computed from a ``matmul`` through score-side ops only.

    The walk goes backward through casts, scalar scales, additive terms, fills, tanh soft-capping
    and reshapes (the ops between ``q @ k^T`` and a softmax), following both sides of a tensor
    add/sub and both branches of a ``where``.

    Args:
        value: where to start walking backward.
        depth: how many producers to visit at most before giving up.

    Returns:
        True when a ``matmul`` is reached within ``depth`` steps.
    """
    allowed = {"cast", "mul", "div", "add", "sub", "masked_fill", "where", "tanh", "reshape"}
    while depth > 0 and value.producer is not None:
        node = value.producer
        if node.op == "matmul":
            return True
        if node.op == "aten" and node.attrs.target.startswith(("aten.where.", "aten.masked_fill.")):
            value = _aten_chain_input(node)
        elif node.op not in allowed:
            return False
        elif node.op in ("add", "sub") and node.attrs.scalar is None:
            a, b = node.inputs[0], node.inputs[1]
            return reaches_matmul(a, depth - 1) or reaches_matmul(b, depth - 1)  # type: ignore[arg-type]
        elif node.op == "where":
            a, b = node.inputs[1], node.inputs[2]
            return reaches_matmul(a, depth - 1) or reaches_matmul(b, depth - 1)  # type: ignore[arg-type]
        else:
            value = node.inputs[0]  # type: ignore[assignment]
        depth -= 1
    return False


def _aten_chain_input(node: Node) -> Value:
    args, _ = aten_call_args(node)
    if node.attrs.target == "aten.where.ScalarSelf":
        return args[2]
    if node.attrs.target.startswith("aten.where."):
        return args[1]
    return args[0]


def match_attention(graph: Graph, softmax: Node, users: dict[Value, list[Node]]) -> AttentionMatch:
    """Prove that ``softmax`` is the middle of an attention computation.

    Args:
        graph: the graph.
        softmax: a ``softmax`` node.
        users: ``graph.users()``.

    Returns:
        The proven match.

    Raises:
        NoMatch: with the reason.
    """
    scores = softmax.inputs[0]
    assert scores is not None
    rank = scores.tensor_type.rank
    if rank < 2 or softmax.attrs.dim % rank != rank - 1:
        raise NoMatch(
            f"softmax over axis {softmax.attrs.dim} of a rank-{rank} tensor, not the key axis"
        )
    # Forward: weights -> (casts) -> matmul(weights, v).
    weights = softmax.output
    out_cast = None
    weight_casts: list[torch.dtype] = []
    shape_readers: list[tuple[Node, Value]] = []
    nan_weights_zero = False
    while True:
        readers = _element_readers(users, weights, shape_readers)
        returned = _returned(graph, weights)
        zeroing = None if nan_weights_zero else _nan_zeroing(graph, users, readers, weights)
        if zeroing is not None:
            weights, nan_weights_zero = zeroing.output, True
            continue
        if len(readers) + returned != 1:
            raise NoMatch(
                f"the attention weights %{weights.name} are used {len(readers) + returned} times "
                f"({_describe(readers, bool(returned))}); fusing would lose them"
            )
        if not readers:
            raise NoMatch(f"the attention weights %{weights.name} are returned, not applied to v")
        reader = readers[0]
        if reader.op == "cast" and reader.attrs.dtype.is_floating_point:
            weights, out_cast = reader.output, reader.attrs.dtype
            weight_casts.append(out_cast)
            continue
        break
    if reader.op != "matmul" or reader.inputs[0] is not weights:
        raise NoMatch(f"the softmax output feeds {reader.op}, not matmul(weights, v)")
    pv = reader
    # Backward: softmax input -> ... -> matmul(q, k^T).
    steps: list[tuple[str, Any]] = []
    value, consumer = scores, softmax
    while True:
        node = value.producer
        if node is None:
            raise NoMatch(f"the scores %{value.name} are a graph input, not q @ k^T")
        readers = _element_readers(users, value, shape_readers)
        returned = _returned(graph, value)
        if len(readers) + returned != 1:
            others = _describe(readers, bool(returned), skip=consumer)
            raise NoMatch(f"the scores %{value.name} are also used elsewhere ({others})")
        if node.op == "matmul":
            qk = node
            break
        value, consumer = _step_back(graph, node, steps), node
    if qk.inputs[0].tensor_type.rank != qk.inputs[1].tensor_type.rank:  # type: ignore[union-attr]
        raise NoMatch("q and k^T have different ranks")
    compute = qk.inputs[0].dtype  # type: ignore[union-attr]
    casts = [payload for kind, payload in steps if kind == "cast"] + weight_casts
    for dtype in casts:
        if dtype is not None and _less_precise(dtype, compute):
            raise NoMatch(
                f"a cast to {dtype} inside {compute} attention rounds what the fused op would not"
            )
    if qk.output.shape != steps_final_shape(qk, steps):
        raise NoMatch("reshapes between q @ k^T and softmax change the score layout")
    m = AttentionMatch(
        softmax=softmax,
        qk=qk,
        pv=pv,
        out_cast=out_cast,
        shape_readers=shape_readers,
        nan_weights_zero=nan_weights_zero,
    )
    _canonical_form(graph, m, list(reversed(steps)))
    return m


def _less_precise(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether floating ``dtype`` keeps fewer significant bits than ``than``."""
    if not than.is_floating_point:
        return False
    return torch.finfo(dtype).eps > torch.finfo(than).eps


def steps_final_shape(qk: Node, steps: list[tuple[str, Any]]) -> tuple:
    """The score shape at the softmax, replaying the recorded reshapes from ``qk``."""
    shape = qk.output.shape
    for kind, payload in reversed(steps):
        if kind == "reshape":
            shape = payload[1]
    return shape


def _step_back(graph: Graph, node: Node, steps: list[tuple[str, Any]]) -> Value:
    """Record one op between q @ k^T and softmax; return the value closer to the matmul."""
    op = node.op
    if op == "cast":
        if not node.attrs.dtype.is_floating_point:
            raise NoMatch(f"scores cast to {node.attrs.dtype}")
        steps.append(("cast", node.attrs.dtype))
        return node.inputs[0]  # type: ignore[return-value]
    if op in ("mul", "div") and node.attrs.scalar is not None:
        c = node.attrs.scalar if op == "mul" else 1.0 / node.attrs.scalar
        inner = node.inputs[0]
        if op == "mul" and inner.producer is not None and inner.producer.op == "tanh":  # type: ignore[union-attr]
            cap = _softcap_inner(inner.producer, c)  # type: ignore[arg-type]
            if cap is not None:
                steps.append(("softcap", c))
                return cap
        steps.append(("scale", c))
        return inner  # type: ignore[return-value]
    if op in ("mul", "div"):
        raise NoMatch(
            f"scores {'multiplied' if op == 'mul' else 'divided'} by the tensor "
            f"%{node.inputs[1].name}: a scale that varies per element"  # type: ignore[union-attr]
        )
    if op in ("add", "sub") and node.attrs.scalar is not None:
        if any(kind == "softcap" for kind, _ in steps):
            raise NoMatch("a constant added inside soft-capping (tanh does not ignore a shift)")
        return node.inputs[0]  # type: ignore[return-value]  # softmax ignores a constant shift
    if op == "add":
        a, b = node.inputs[0], node.inputs[1]
        a_chain, b_chain = reaches_matmul(a), reaches_matmul(b)  # type: ignore[arg-type]
        if a_chain == b_chain:
            raise NoMatch(f"cannot tell scores from mask in %{node.output.name}")
        chain, term = (a, b) if a_chain else (b, a)
        if node.attrs.alpha != 1.0:
            raise NoMatch("add with alpha on the scores")
        steps.append(("add", (term, node.output.shape)))
        return chain  # type: ignore[return-value]
    if op == "masked_fill":
        steps.append(("fill", (node.inputs[1], True, node.attrs.value, node.output.shape)))
        return node.inputs[0]  # type: ignore[return-value]
    if op == "where":
        cond, a, b = node.inputs
        for chain, fill, masked_when in ((a, b, False), (b, a, True)):
            value = _fill_value(graph, fill, chain)  # type: ignore[arg-type]
            if value is not None and reaches_matmul(chain):  # type: ignore[arg-type]
                steps.append(("fill", (cond, masked_when, value, node.output.shape)))
                return chain  # type: ignore[return-value]
        raise NoMatch("where() on the scores without a constant fill")
    if op == "aten" and node.attrs.target in (
        "aten.where.ScalarOther",
        "aten.where.ScalarSelf",
        "aten.masked_fill.Tensor",
    ):
        args, _ = aten_call_args(node)
        if node.attrs.target == "aten.masked_fill.Tensor":
            value = constant_scalar(graph, args[2])
            if value is None:
                raise NoMatch("masked_fill with a non-constant fill")
            steps.append(("fill", (args[1], True, value, node.output.shape)))
            return args[0]
        other = node.attrs.target == "aten.where.ScalarOther"
        chain, fill = (args[1], args[2]) if other else (args[2], args[1])
        steps.append(("fill", (args[0], not other, float(fill), node.output.shape)))
        return chain
    if op == "reshape":
        source = node.inputs[0]
        if source.shape[-2:] != node.output.shape[-2:]:  # type: ignore[union-attr]
            raise NoMatch("a reshape between q @ k^T and softmax moves the query/key axes")
        steps.append(("reshape", (source.shape, node.output.shape)))  # type: ignore[union-attr]
        return source  # type: ignore[return-value]
    name = node.attrs.target if op == "aten" else op
    raise NoMatch(f"{name} between q @ k^T and softmax is not part of attention")


def _fill_value(graph: Graph, fill: Value, chain: Value) -> float | None:
    """The number a ``where`` fill holds everywhere, else None: a one-element constant, or a
    ``full`` / ``full_like`` / ``new_full`` tensor of the scores' dtype that broadcasts to them
    (``torch.where(keep, scores, scores.new_full(scores.shape, -1e9))``)."""
    value = constant_scalar(graph, fill)
    node = fill.producer
    if value is not None or node is None or node.op != "aten":
        return value
    position = _FILL_POSITION.get(node.attrs.target)
    if position is None or fill.dtype != chain.dtype:
        return None
    if fill.tensor_type.rank > chain.tensor_type.rank or any(
        f != 1 and f != c for f, c in zip(reversed(fill.shape), reversed(chain.shape))
    ):
        return None  # a fill wider than the scores would widen the result
    args, _ = aten_call_args(node)
    number = args[position] if len(args) > position else None
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return None
    return float(torch.tensor(number, dtype=fill.dtype))  # the number as the tensor holds it


def _softcap_inner(tanh: Node, cap: float) -> Value | None:
    inner = tanh.inputs[0]
    producer = inner.producer  # type: ignore[union-attr]
    if producer is None or producer.attrs.__class__ is not ScalarOperandAttrs:
        return None
    if producer.op == "div" and producer.attrs.scalar is not None:
        divisor = producer.attrs.scalar
    elif producer.op == "mul" and producer.attrs.scalar:
        divisor = 1.0 / producer.attrs.scalar
    else:
        return None
    if not math.isclose(divisor, cap, rel_tol=1e-6):
        return None
    return producer.inputs[0]


def _canonical_form(graph: Graph, m: AttentionMatch, steps: list[tuple[str, Any]]) -> None:
    """Fold the steps (from q @ k^T outward) into scale, softcap, additive terms and fills."""
    for kind, payload in steps:
        if kind == "scale":
            c = payload
            if m.softcap is not None:
                raise NoMatch("a scale after soft-capping")
            if m.additive or m.fills:
                if c <= 0:
                    raise NoMatch("a non-positive scale after the mask")
                m.additive = [(ScaledTerm(term, c), shape) for term, shape in m.additive]  # type: ignore[misc]
            m.scale *= c
        elif kind == "softcap":
            if m.softcap is not None or m.additive or m.fills:
                raise NoMatch("soft-capping after a mask or bias")
            m.softcap = payload
        elif kind == "add":
            m.additive.append(payload)
            m.add_after_fill = m.add_after_fill or bool(m.fills)
        elif kind == "fill":
            mask, masked_when, value, shape = payload
            if value > MASK_FILL_LIMIT:
                raise NoMatch(
                    f"a fill value {value} that does not mask (must be <= {MASK_FILL_LIMIT})"
                )
            m.fills.append((mask, masked_when, value, shape))  # type: ignore[arg-type]
    if not math.isfinite(m.scale) or m.scale == 0:
        raise NoMatch(f"scale {m.scale} is not usable")


class ScaledTerm:
    """An additive term multiplied by the scales that follow it (materialised on rewrite)."""

    def __init__(self, term: Any, factor: float):
        self.term, self.factor = term, factor
