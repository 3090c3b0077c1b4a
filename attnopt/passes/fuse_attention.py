"""``fuse-attention``: find every attention computation and make it one ``attention`` op.

Entry points: :class:`FuseAttention`, :func:`match_attention` (the detector, also used by
``attnopt inspect --explain``).

Detection starts at each ``softmax`` over the last axis and proves the computation around it:

* forward, the weights (through dtype casts) must have exactly one reader, ``matmul(weights, v)``;
  weights that are returned or reused refuse the match;
* backward, every value between ``q @ k^T`` and the softmax must have one reader, and each op on the
  way must be one whose effect the ``attention`` op reproduces exactly: a scalar scale (mul/div),
  tanh soft-capping, additive tensors (masks and biases), masked_fill / where with a very negative
  fill (masks), dtype casts, constant shifts (softmax ignores them) and reshapes that keep the last
  two axes.

``k`` is defined as the transpose of the right matmul operand, so no assumption about how the model
laid keys out is needed: whatever produced that operand, ``q @ k^T`` is the same product. Existing
``scaled_dot_product_attention`` calls become the same op. Constant masks that are exactly the causal
pattern turn into the ``causal`` attribute, and GQA key/value repetition is absorbed into
``num_kv_heads``. Every refusal is recorded with its reason (``ctx.explanations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.attention import AttentionAttrs
from attnopt.ir.ops import CastAttrs, DimAttrs, ScalarOperandAttrs, ShapeAttrs, TransposeAttrs
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.canonicalize import VIEW_RULES
from attnopt.passes.helpers import (
    constant_scalar,
    constant_tensor,
    emit_aten_before,
    emit_before,
    view_chain_source,
)
from attnopt.passes.pattern import apply_rules
from attnopt.runtime.reference import causal_mask

#: A fill at or below this value masks a key (its softmax weight underflows to exactly zero).
MASK_FILL_LIMIT = -1.0e4
#: An additive constant at or below this value is a mask entry, not a bias.
ADDITIVE_MASK_LIMIT = -1.0e30


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


def _readers(graph_users: dict[Value, list[Node]], graph: Graph, value: Value) -> int:
    return len(graph_users.get(value, [])) + sum(1 for v in graph.outputs if v is value)


def _is_float_const_like(graph: Graph, value: Value) -> float | None:
    return constant_scalar(graph, value)


def _reaches_matmul(value: Value, depth: int = 32) -> bool:
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
            return _reaches_matmul(a, depth - 1) or _reaches_matmul(b, depth - 1)  # type: ignore[arg-type]
        elif node.op == "where":
            a, b = node.inputs[1], node.inputs[2]
            return _reaches_matmul(a, depth - 1) or _reaches_matmul(b, depth - 1)  # type: ignore[arg-type]
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
    while True:
        readers = users.get(weights, [])
        if _readers(users, graph, weights) != 1:
            raise NoMatch(
                f"the attention weights %{weights.name} are used {_readers(users, graph, weights)} "
                "times (returned or reused); fusing would lose them"
            )
        reader = readers[0]
        if reader.op == "cast" and reader.attrs.dtype.is_floating_point:
            weights, out_cast = reader.output, reader.attrs.dtype
            continue
        break
    if reader.op != "matmul" or reader.inputs[0] is not weights:
        raise NoMatch(f"the softmax output feeds {reader.op}, not matmul(weights, v)")
    pv = reader
    # Backward: softmax input -> ... -> matmul(q, k^T).
    steps: list[tuple[str, Any]] = []
    value = scores
    while True:
        node = value.producer
        if node is None:
            raise NoMatch(f"the scores %{value.name} are a graph input, not q @ k^T")
        if node is not softmax and _readers(users, graph, value) != 1 and value is not scores:
            raise NoMatch(f"the scores %{value.name} are also used elsewhere")
        if value is scores and _readers(users, graph, value) != 1:
            raise NoMatch(f"the scores %{value.name} are also used elsewhere")
        if node.op == "matmul":
            qk = node
            break
        value = _step_back(graph, node, steps)
    if qk.inputs[0].tensor_type.rank != qk.inputs[1].tensor_type.rank:  # type: ignore[union-attr]
        raise NoMatch("q and k^T have different ranks")
    if qk.output.shape != steps_final_shape(qk, steps):
        raise NoMatch("reshapes between q @ k^T and softmax change the score layout")
    m = AttentionMatch(softmax=softmax, qk=qk, pv=pv, out_cast=out_cast)
    _canonical_form(graph, m, list(reversed(steps)))
    return m


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
        return node.inputs[0]  # type: ignore[return-value]  # softmax ignores a constant shift
    if op == "add":
        a, b = node.inputs[0], node.inputs[1]
        a_chain, b_chain = _reaches_matmul(a), _reaches_matmul(b)  # type: ignore[arg-type]
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
            value = constant_scalar(graph, fill)
            if value is not None and _reaches_matmul(chain):  # type: ignore[arg-type]
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
                m.additive = [(_Scaled(term, c), shape) for term, shape in m.additive]  # type: ignore[misc]
            m.scale *= c
        elif kind == "softcap":
            if m.softcap is not None or m.additive or m.fills:
                raise NoMatch("soft-capping after a mask or bias")
            m.softcap = payload
        elif kind == "add":
            m.additive.append(payload)
        elif kind == "fill":
            mask, masked_when, value, shape = payload
            if value > MASK_FILL_LIMIT:
                raise NoMatch(
                    f"a fill value {value} that does not mask (must be <= {MASK_FILL_LIMIT})"
                )
            m.fills.append((mask, masked_when, value, shape))  # type: ignore[arg-type]
    if not math.isfinite(m.scale) or m.scale == 0:
        raise NoMatch(f"scale {m.scale} is not usable")


class _Scaled:
    """An additive term multiplied by the scales that follow it (materialised on rewrite)."""

    def __init__(self, term: Any, factor: float):
        self.term, self.factor = term, factor


# ----------------------------------------------------------------------------------------------
# Rewrite
# ----------------------------------------------------------------------------------------------
def _derived_from_parameter(graph: Graph, value: Value, budget: int = 64) -> bool:
    parameters = set(graph.meta.get("parameters", ()))
    stack, seen = [value], set()
    while stack and budget > 0:
        current = stack.pop()
        if id(current) in seen or current.producer is None:
            continue
        seen.add(id(current))
        budget -= 1
        node = current.producer
        if node.op == "param":
            if node.attrs.name in parameters:
                return True
            continue
        stack.extend(v for v in node.inputs if v is not None)
    return False


def _to_canonical(graph: Graph, anchor: Node, term: Value, at_shape: tuple, canon: tuple) -> Value:
    """Map a term added at ``at_shape`` (a reshape of the scores) onto the canonical layout."""
    if tuple(at_shape) == tuple(canon):
        return term
    expanded = emit_before(graph, anchor, "expand", [term], ShapeAttrs(shape=tuple(at_shape)))
    return emit_before(graph, anchor, "reshape", [expanded], ShapeAttrs(shape=tuple(canon)))


def _materialise(graph: Graph, anchor: Node, item: Any) -> Value:
    if isinstance(item, _Scaled):
        inner = _materialise(graph, anchor, item.term)
        return emit_before(graph, anchor, "mul", [inner], ScalarOperandAttrs(scalar=item.factor))
    return item


def _constant_keep(graph: Graph, mask: Value, masked_when: bool) -> torch.Tensor | None:
    tensor = constant_tensor(graph, mask)
    if tensor is None:
        return None
    keep = tensor.bool()
    return ~keep if masked_when else keep


def _is_causal_pattern(keep: torch.Tensor, q_len: int, kv_len: int) -> bool:
    if keep.dim() < 2 or keep.shape[-2] not in (1, q_len) or keep.shape[-1] != kv_len:
        return False
    if kv_len < q_len:
        return False
    pattern = causal_mask(q_len, kv_len, keep.device)
    return bool((keep == pattern).all())


def _additive_is_causal(tensor: torch.Tensor, q_len: int, kv_len: int) -> bool:
    if not tensor.dtype.is_floating_point or tensor.dim() < 2 or tensor.shape[-1] != kv_len:
        return False
    keep = tensor == 0
    masked = tensor <= ADDITIVE_MASK_LIMIT
    if not bool((keep | masked).all()):
        return False
    return _is_causal_pattern(keep, q_len, kv_len)


_AND_TARGETS = ("aten.__and__.Tensor", "aten.logical_and.default")


def mask_implies_causal(graph: Graph, mask: Value, q_len: int, kv_len: int) -> bool:
    """Whether ``mask`` can only let a query see keys the causal rule allows.

    True when the mask is (a broadcast, cast or where-fill of) a conjunction one of whose constant
    operands, or all of them together, is the causal pattern. The mask itself stays in place: this
    only tells lossy passes the site is causal (a row whose every key the mask hides keeps eager's
    behaviour because the mask, not the causal flag, is applied).
    """
    constants: list[torch.Tensor] = []
    stack, seen = [mask], set()
    while stack:
        value = stack.pop()
        if id(value) in seen or value.producer is None:
            continue
        seen.add(id(value))
        node = value.producer
        if node.op in ("expand", "cast", "reshape"):
            stack.append(node.inputs[0])  # type: ignore[arg-type]
        elif node.op == "aten" and node.attrs.target in _AND_TARGETS:
            for operand in node.inputs:
                tensor = constant_tensor(graph, operand)
                if tensor is not None and tensor.dtype == torch.bool:
                    constants.append(tensor)
                elif operand is not None:
                    stack.append(operand)
        elif node.op == "aten" and node.attrs.target in (
            "aten.where.ScalarOther",
            "aten.where.self",
        ):
            stack.append(node.inputs[0])  # type: ignore[arg-type]
        elif node.op == "where":
            stack.append(node.inputs[0])  # type: ignore[arg-type]
    if not constants:
        return False
    combined = constants[0]
    for tensor in constants[1:]:
        combined = combined & tensor
    return _is_causal_pattern(combined, q_len, kv_len) if combined.dim() >= 2 else False


def _to_rank4(graph: Graph, anchor: Node, value: Value) -> Value:
    rank = value.tensor_type.rank
    while rank < 4:
        value = emit_before(graph, anchor, "unsqueeze", [value], DimAttrs(dim=0))
        rank += 1
    return value


def _broadcast_batch(graph: Graph, anchor: Node, value: Value, batch: int) -> Value:
    if value.shape[0] == batch:
        return value
    if value.shape[0] != 1:
        raise NoMatch("key/value batch does not broadcast to the query batch")
    return emit_before(
        graph, anchor, "expand", [value], ShapeAttrs(shape=(batch, *value.shape[1:]))
    )


def build_attention(
    graph: Graph,
    anchor: Node,
    q: Value,
    k: Value,
    v: Value,
    *,
    masks: list[Value],
    biases: list[Value],
    scale: float,
    causal: bool,
    softcap: float | None,
    out_shape: tuple,
    out_dtype: torch.dtype,
    meta: dict[str, Any],
) -> Value:
    """Insert an ``attention`` node for rank-2..4 q/k/v and return a value of ``out_shape``.

    Args:
        graph: the graph.
        anchor: insert before this node.
        q: ``[..., Sq, D]``.
        k: ``[..., Sk, D]``.
        v: ``[..., Sk, Dv]``.
        masks: additive float or bool (True = keep) masks in the canonical score layout.
        biases: additive biases in the canonical score layout.
        scale: score scale.
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping.
        out_shape: shape of the value the attention replaces.
        out_dtype: dtype of the value the attention replaces.
        meta: node metadata.

    Returns:
        The replacement value.
    """
    rank = q.tensor_type.rank
    if rank > 4 or rank < 2:
        raise NoMatch(f"rank-{rank} attention (only ranks 2 to 4 are laid out as [B, H, S, D])")
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or not q.dtype.is_floating_point:
        raise NoMatch(f"q, k, v dtypes differ or are not floating ({sorted(map(str, dtypes))})")
    q4, k4, v4 = (_to_rank4(graph, anchor, x) for x in (q, k, v))
    if k4.shape[0] != q4.shape[0] or v4.shape[0] != q4.shape[0]:
        k4 = _broadcast_batch(graph, anchor, k4, q4.shape[0])
        v4 = _broadcast_batch(graph, anchor, v4, q4.shape[0])
    if k4.shape[1] != v4.shape[1]:
        raise NoMatch("k and v have different head counts")
    if q4.shape[1] % k4.shape[1]:
        raise NoMatch("query heads are not a multiple of key/value heads")
    mask = _combine_masks(graph, anchor, [_to_rank4(graph, anchor, x) for x in masks], q.dtype)
    bias = None
    for term in biases:
        term = _to_rank4(graph, anchor, term)
        bias = term if bias is None else emit_before(graph, anchor, "add", [bias, term])
    attrs = AttentionAttrs(scale=float(scale), causal=causal, softcap=softcap)
    node = graph.make_node("attention", [q4, k4, v4, mask, bias], attrs)
    node.meta.update(meta)
    graph.insert_before(anchor, node)
    out = node.output
    if out.dtype != out_dtype:
        out = emit_before(graph, anchor, "cast", [out], CastAttrs(dtype=out_dtype))
    if tuple(out.shape) != tuple(out_shape):
        out = emit_before(graph, anchor, "reshape", [out], ShapeAttrs(shape=tuple(out_shape)))
    return out


def _combine_masks(
    graph: Graph, anchor: Node, masks: list[Value], dtype: torch.dtype
) -> Value | None:
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    bools = [m for m in masks if m.dtype == torch.bool]
    floats = [m for m in masks if m.dtype != torch.bool]
    keep = None
    for m in bools:
        keep = (
            m
            if keep is None
            else emit_aten_before(graph, anchor, "aten.logical_and.default", [keep, m])
        )
    additive = None
    for m in floats:
        additive = m if additive is None else emit_before(graph, anchor, "add", [additive, m])
    if additive is None:
        return keep
    if keep is None:
        return additive
    return emit_before(
        graph, anchor, "masked_fill", [additive, _not(graph, anchor, keep)], _fill(-math.inf)
    )


def _not(graph: Graph, anchor: Node, value: Value) -> Value:
    return emit_aten_before(graph, anchor, "aten.logical_not.default", [value])


def _fill(value: float) -> Any:
    from attnopt.ir.ops import FillAttrs

    return FillAttrs(value=value)


def _site_meta(graph: Graph, softmax: Node, q: Value, k: Value) -> dict[str, Any]:
    q_src, _ = view_chain_source(q)
    k_src, _ = view_chain_source(k)
    block: dict[str, Any] = {}
    kind = "self"
    if q_src.producer is not None and q_src.producer.op == "linear":
        block["q_proj"] = q_src.producer.inputs[1].name  # type: ignore[union-attr]
    if k_src.producer is not None and k_src.producer.op == "linear":
        block["k_proj"] = k_src.producer.inputs[1].name  # type: ignore[union-attr]
        if q_src.producer is not None and q_src.producer.op == "linear":
            if k_src.producer.inputs[0] is not q_src.producer.inputs[0]:
                kind = "cross"
    if q.shape[-2] != k.shape[-2]:
        kind = "cross"
    meta: dict[str, Any] = {"site": {"kind": kind, "block": block}}
    if "module" in softmax.meta:
        meta["module"] = softmax.meta["module"]
    return meta


def rewrite_match(graph: Graph, m: AttentionMatch) -> Value:
    """Replace a proven match by an ``attention`` node; returns the new output value."""
    q, kt = m.qk.inputs[0], m.qk.inputs[1]
    v = m.pv.inputs[1]
    assert q is not None and kt is not None and v is not None
    anchor = m.pv
    canon = tuple(m.qk.output.shape)
    q_len, kv_len = int(canon[-2]), int(canon[-1])
    masks: list[Value] = []
    biases: list[Value] = []
    causal = False
    for item, shape in m.additive:
        raw = item
        while isinstance(raw, _Scaled):
            raw = raw.term
        constant = constant_tensor(graph, raw)
        if (
            not causal
            and constant is not None
            and tuple(shape) == canon
            and _additive_is_causal(constant, q_len, kv_len)
        ):
            causal = True
            continue
        term = _to_canonical(graph, anchor, _materialise(graph, anchor, item), shape, canon)
        (biases if _derived_from_parameter(graph, raw) else masks).append(term)
    for mask, masked_when, value, shape in m.fills:  # type: ignore[misc]
        keep_const = _constant_keep(graph, mask, masked_when)
        if not causal and keep_const is not None and tuple(shape) == canon:
            if _is_causal_pattern(keep_const, q_len, kv_len):
                causal = True
                continue
        keep = _not(graph, anchor, mask) if masked_when else mask
        if math.isinf(value):
            masks.append(_to_canonical(graph, anchor, keep, shape, canon))
        else:
            masked = mask if masked_when else _not(graph, anchor, mask)
            dtype = m.softmax.inputs[0].dtype  # type: ignore[union-attr]
            fill_value = graph.add_tensor("mask_fill", torch.tensor(value, dtype=dtype))
            zero = graph.add_tensor("mask_zero", torch.zeros((), dtype=dtype))
            zero_or_fill = emit_before(graph, anchor, "where", [masked, fill_value, zero])
            masks.append(_to_canonical(graph, anchor, zero_or_fill, shape, canon))
    k = emit_before(graph, anchor, "transpose", [kt], TransposeAttrs(dim0=-2, dim1=-1))
    meta = _site_meta(graph, m.softmax, q, k)
    if not causal and any(mask_implies_causal(graph, x, q_len, kv_len) for x in masks + biases):
        meta["site"]["mask_causal"] = True
    out = build_attention(
        graph,
        anchor,
        q,
        k,
        v,
        masks=masks,
        biases=biases,
        scale=m.scale,
        causal=causal,
        softcap=m.softcap,
        out_shape=tuple(m.pv.output.shape),
        out_dtype=m.pv.output.dtype,
        meta=meta,
    )
    graph.replace_all_uses(m.pv.output, out)
    return out


def fuse_sdpa(graph: Graph, node: Node) -> Value:
    """Replace an ``aten.scaled_dot_product_attention`` call by an ``attention`` node."""
    args, kwargs = aten_call_args(node)
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    defaults = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    bound = dict(defaults)
    bound.update(dict(zip(names, args)))
    bound.update(kwargs)
    if bound["dropout_p"]:
        raise NoMatch(f"SDPA with dropout_p={bound['dropout_p']} (training mode)")
    q, k, v = bound["query"], bound["key"], bound["value"]
    q_len, kv_len = int(q.shape[-2]), int(k.shape[-2])
    scale = bound["scale"] if bound["scale"] is not None else q.shape[-1] ** -0.5
    masks, biases = [], []
    attn_mask = bound["attn_mask"]
    causal = False
    if bound["is_causal"]:
        if attn_mask is not None:
            raise NoMatch("SDPA with both attn_mask and is_causal")
        if q_len == kv_len:
            causal = True
        else:  # SDPA's is_causal is top-left aligned
            tri = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
            masks.append(graph.add_tensor("sdpa_causal_top_left", tri))
    if attn_mask is not None:
        constant = constant_tensor(graph, attn_mask)
        if (
            constant is not None
            and constant.dtype == torch.bool
            and _is_causal_pattern(constant, q_len, kv_len)
        ):
            causal = True
        elif constant is not None and _additive_is_causal(constant, q_len, kv_len):
            causal = True
        elif attn_mask.dtype != torch.bool and _derived_from_parameter(graph, attn_mask):
            biases.append(attn_mask)
        else:
            masks.append(attn_mask)
    meta = _site_meta(graph, node, q, k)
    if not causal and any(mask_implies_causal(graph, m, q_len, kv_len) for m in masks + biases):
        meta["site"]["mask_causal"] = True
    out = build_attention(
        graph,
        node,
        q,
        k,
        v,
        masks=masks,
        biases=biases,
        scale=float(scale),
        causal=causal,
        softcap=None,
        out_shape=tuple(node.outputs[0].shape),
        out_dtype=node.outputs[0].dtype,
        meta=meta,
    )
    graph.replace_all_uses(node.outputs[0], out)
    return out


def _repeat_source(value: Value) -> tuple[Value, int] | None:
    """``(k, n)`` when ``value`` is ``k`` with each head repeated ``n`` times consecutively."""
    node = value.producer
    if node is None:
        return None
    if node.op == "aten" and node.attrs.target == "aten.repeat_interleave.self_int":
        args, kwargs = aten_call_args(node)
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        if (
            isinstance(args[1], int)
            and dim is not None
            and dim % 4 == 1
            and not kwargs.get("output_size")
        ):
            return args[0], args[1]
        return None
    if node.op != "reshape":
        return None
    expand = node.inputs[0].producer  # type: ignore[union-attr]
    if expand is None or expand.op != "expand":
        return None
    unsq = expand.inputs[0].producer  # type: ignore[union-attr]
    if unsq is None or unsq.op != "unsqueeze" or unsq.attrs.dim % 5 != 2:
        return None
    source = unsq.inputs[0]
    assert source is not None
    if source.tensor_type.rank != 4:
        return None
    b, h, s, d = source.shape
    rep = expand.output.shape
    if len(rep) != 5 or (rep[0], rep[1], rep[3], rep[4]) != (b, h, s, d):
        return None
    if tuple(value.shape) != (b, h * rep[2], s, d):
        return None
    return source, int(rep[2])


def absorb_kv_repeat(graph: Graph) -> int:
    """Let attention read un-repeated GQA/MQA keys/values (``num_kv_heads`` < ``num_heads``)."""
    count = 0
    for node in graph.find("attention"):
        k_rep, v_rep = _repeat_source(node.inputs[1]), _repeat_source(node.inputs[2])  # type: ignore[arg-type]
        if k_rep is None or v_rep is None or k_rep[1] != v_rep[1]:
            continue
        node.inputs[1], node.inputs[2] = k_rep[0], v_rep[0]
        count += 1
    return count


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def strip_mask_broadcasts(graph: Graph) -> int:
    """Let attention read masks and biases before ``expand`` (they broadcast anyway)."""
    count = 0
    for node in graph.find("attention"):
        q, k = node.inputs[0], node.inputs[1]
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # type: ignore[union-attr]
        for position in (3, 4):
            value = node.inputs[position] if len(node.inputs) > position else None
            while (
                value is not None and value.producer is not None and value.producer.op == "expand"
            ):
                source = value.producer.inputs[0]
                if source is None or not _broadcasts_to(tuple(source.shape), target):
                    break
                value = source
            if len(node.inputs) > position and value is not node.inputs[position]:
                node.inputs[position] = value
                count += 1
    return count


@dataclass(frozen=True)
class FuseAttention(Pass):
    """Detect every attention site and fuse it into one ``attention`` op (exact).

    Options:
        sdpa: also take over existing ``scaled_dot_product_attention`` calls.
    """

    name: ClassVar[str] = "fuse-attention"
    exact: ClassVar[bool] = True
    sdpa: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Fuse every provable site; record the reason for every refusal."""
        fused = 0
        notes: list[str] = []
        for node in graph.walk():
            where = (
                f"{node.meta.get('module', 'model')} %{node.outputs[0].name}"
                if node.outputs
                else ""
            )
            try:
                if node.op == "softmax":
                    m = match_attention(graph, node, graph.users())
                    rewrite_match(graph, m)
                    fused += 1
                elif (
                    self.sdpa
                    and node.op == "aten"
                    and node.attrs.target.startswith("aten.scaled_dot_product_attention")
                ):
                    fuse_sdpa(graph, node)
                    fused += 1
            except NoMatch as err:
                ctx.explanations.append((where, str(err)))
                notes.append(f"not fused: {where}: {err}")
        if fused:
            graph.dead_code_elimination()
        apply_rules(graph, VIEW_RULES)
        repeats = absorb_kv_repeat(graph)
        if strip_mask_broadcasts(graph) or repeats:
            graph.dead_code_elimination()
        _number_sites(graph)
        notes.append(
            f"fused {fused} sites" + (f", {repeats} with GQA repeats absorbed" if repeats else "")
        )
        return PassResult(changed=bool(fused), rewrites=fused, notes=notes)


def _number_sites(graph: Graph) -> None:
    index = 0
    for node in graph.nodes:
        if node.op == "attention":
            if node.attrs.site != index:
                node.attrs = _replace(node.attrs, site=index)
            index += 1


def _replace(attrs: AttentionAttrs, **changes: Any) -> AttentionAttrs:
    import dataclasses

    return dataclasses.replace(attrs, **changes)
