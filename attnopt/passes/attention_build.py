"""Turn a proven attention match (or an SDPA call) into one ``attention`` node.

Entry points: :func:`rewrite_match`, :func:`build_attention`, :func:`mask_implies_causal`.

``k`` is defined as the transpose of the right matmul operand, so no assumption about how the model
laid keys out is needed. Additive terms derived from trainable parameters become the bias input,
the others the mask input; constant masks that are exactly the causal pattern become the
``causal`` attribute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from attnopt.ir import Graph, Node, Value
from attnopt.ir.attention import AttentionAttrs
from attnopt.ir.attention_reference import mask_is_inert, visible_keys_mask
from attnopt.ir.core_ops import CastAttrs, DimAttrs, ScalarOperandAttrs, ShapeAttrs, TransposeAttrs
from attnopt.ir.types import Dim
from attnopt.passes.attention_match import (
    ADDITIVE_MASK_LIMIT,
    AttentionMatch,
    NoMatch,
    ScaledTerm,
)
from attnopt.passes.helpers import (
    constant_tensor,
    emit_aten_before,
    emit_before,
    view_chain_source,
)
from attnopt.passes.mask_analysis import MaskAnalysis, analyse_masks, causal_window


# ----------------------------------------------------------------------------------------------
# Rewrite
# ----------------------------------------------------------------------------------------------
def derived_from_parameter(graph: Graph, value: Value, budget: int = 64) -> bool:
    """Whether ``value`` is computed from a trainable parameter (a learned bias, not a mask)."""
    parameters = set(graph.meta.get("parameters", ()))
    return computed_from(
        value,
        lambda v: (
            v.producer is not None
            and v.producer.op == "param"
            and v.producer.attrs.name in parameters
        ),
        budget,
    )


def computed_from(value: Value, found: Callable[[Value], bool], budget: int = 64) -> bool:
    """Whether ``found`` holds for ``value`` or a value it is computed from, within ``budget``
    producers visited (graph inputs end a path without counting, ``param`` nodes end it)."""
    stack, seen = [value], set()
    while stack and budget > 0:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if found(current):
            return True
        node = current.producer
        if node is None:
            continue
        budget -= 1
        if node.op != "param":
            stack.extend(v for v in node.inputs if v is not None)
    return False


def _to_canonical(graph: Graph, anchor: Node, term: Value, at_shape: tuple, canon: tuple) -> Value:
    """Map a term added at ``at_shape`` (a reshape of the scores) onto the canonical layout."""
    if tuple(at_shape) == tuple(canon):
        return term
    expanded = emit_before(graph, anchor, "expand", [term], ShapeAttrs(shape=tuple(at_shape)))
    return emit_before(graph, anchor, "reshape", [expanded], ShapeAttrs(shape=tuple(canon)))


def _materialise(graph: Graph, anchor: Node, item: Any) -> Value:
    if isinstance(item, ScaledTerm):
        inner = _materialise(graph, anchor, item.term)
        return emit_before(graph, anchor, "mul", [inner], ScalarOperandAttrs(scalar=item.factor))
    return item


def _constant_keep(graph: Graph, mask: Value, masked_when: bool) -> torch.Tensor | None:
    tensor = constant_tensor(graph, mask)
    if tensor is None:
        return None
    keep = tensor.bool()
    return ~keep if masked_when else keep


def is_causal_pattern(keep: torch.Tensor, q_len: Dim, kv_len: Dim) -> bool:
    """Whether a bool visibility tensor is exactly the bottom-right causal pattern (no empty row)."""
    window = causal_window(keep, q_len, kv_len)
    return window is not None and isinstance(kv_len, int) and window >= kv_len - 1


def additive_window(tensor: torch.Tensor, q_len: Dim, kv_len: Dim) -> int | None:
    """:func:`causal_window` of an additive mask that is 0 where visible and a mask value elsewhere."""
    if not tensor.dtype.is_floating_point or tensor.dim() < 2 or tensor.shape[-1] != kv_len:
        return None
    keep = tensor == 0
    masked = tensor <= ADDITIVE_MASK_LIMIT
    if not bool((keep | masked).all()):
        return None
    return causal_window(keep, q_len, kv_len)


def _narrower(window: int | None, other: int) -> int:
    return other if window is None else min(window, other)


_AND_TARGETS = ("aten.__and__.Tensor", "aten.logical_and.default")


def mask_implies_causal(graph: Graph, mask: Value, q_len: Dim, kv_len: Dim) -> bool:
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
    return is_causal_pattern(combined, q_len, kv_len) if combined.dim() >= 2 else False


def _to_rank4(graph: Graph, anchor: Node, value: Value) -> Value:
    rank = value.tensor_type.rank
    while rank < 4:
        value = emit_before(graph, anchor, "unsqueeze", [value], DimAttrs(dim=0))
        rank += 1
    return value


def _broadcast_batch(graph: Graph, anchor: Node, value: Value, batch: Dim) -> Value:
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
    source: Node,
    replaces: Value,
    empty_rows: tuple[Value, Value] | None = None,
    window_left: int | None = None,
    nan_weights_zero: bool = False,
) -> Value:
    """Insert an ``attention`` node for rank-2..4 q/k/v in place of ``replaces``.

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
        source: the node the site was found at (softmax or SDPA call), for its module path.
        replaces: the value the attention computes; its readers read the new value.
        empty_rows: ``(empty, fill)``: rows where ``empty`` (bool, broadcastable to ``replaces``
            with a last axis of 1) is True take ``fill`` instead of the attention output.
        window_left: with ``causal``, keys further back than this are not visible (an exact
            sliding window found in a constant mask); None or ``>= kv_len - 1``: plain causal.
        nan_weights_zero: the model zeroes NaN weights before ``@ v`` (see
            :class:`attnopt.ir.AttentionAttrs`).

    Returns:
        The replacement value (same shape and dtype as ``replaces``).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]  # ints, or symbolic dims (str)
    meta = site_meta(graph, source, q, k)
    mask_causal = not causal and any(
        mask_implies_causal(graph, x, q_len, kv_len) for x in masks + biases
    )
    rank = q.tensor_type.rank
    analysis = analyse_masks(graph, masks, q_len, kv_len, rank=rank)
    segments: Value | None = None
    masks_override: list[Value] = []
    if analysis.changed and analysis.finite_fill and empty_rows is None:
        # Eager gives a row whose keys are all hidden by a finite fill the mean of v.
        if not (analysis.causal or analysis.remainder or analysis.segments is not None):
            # key masks alone: one [B, 1, 1, Sk] additive mask with the finite fill keeps that
            keep = _keep_of(graph, anchor, analysis)
            if keep is None:
                analysis = dataclasses.replace(analysis, changed=False)
            else:
                fill = graph.add_tensor("mask_fill", torch.tensor(torch.finfo(q.dtype).min))
                zero = graph.add_tensor("mask_zero", torch.zeros((), dtype=q.dtype))
                additive = emit_before(graph, anchor, "where", [keep, zero, fill])
                masks_override = [additive]
        else:
            empty_rows = _finite_fill_rows(graph, anchor, analysis, v, q_len, kv_len, rank)
            if empty_rows is None:
                analysis = dataclasses.replace(analysis, changed=False, kinds=["mask"])
    if analysis.changed:
        masks = masks_override or [
            _not(graph, anchor, c.value) if c.negated else c.value
            for c in analysis.key_masks + analysis.remainder
        ]
        if analysis.causal:
            if causal and window_left is not None and analysis.window_left is not None:
                window_left = min(window_left, analysis.window_left)
            elif not causal:
                window_left = analysis.window_left
            causal = True
        segments = analysis.segments
    kinds = list(analysis.kinds)
    if causal and not any(k in kinds for k in ("causal", "sliding_window")):
        kinds.insert(0, "sliding_window" if _is_window(window_left, kv_len) else "causal")
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
    q_heads, kv_heads = q4.shape[1], k4.shape[1]
    if not (isinstance(q_heads, int) and isinstance(kv_heads, int)):
        if q_heads != kv_heads:
            raise NoMatch("symbolic head counts that differ")
    elif q_heads % kv_heads:
        raise NoMatch("query heads are not a multiple of key/value heads")
    windowed = (
        causal
        and window_left is not None
        and (not isinstance(kv_len, int) or window_left < kv_len - 1)
    )
    if "sliding_window" in kinds and not windowed:
        kinds[kinds.index("sliding_window")] = "causal"
    if windowed and softcap is not None:
        # The sliding-window variant has no soft-capping: keep the window as a constant mask on
        # the dense op (Gemma-2's local layers without a padding mask).
        if not (isinstance(q_len, int) and isinstance(kv_len, int)):
            raise NoMatch("a soft-capped sliding window over symbolic lengths")
        keep = visible_keys_mask(q_len, kv_len, window_left=window_left, window_right=0)
        masks = [*masks, graph.add_tensor("window_keep", keep)]
        windowed = False
    # Additive key masks go last, alone in the op's mask slot when float terms meet: the op adds
    # (scores + bias) + mask, eager's order when the padding is added after a bias (a -1e9 fill
    # summed into the bias first rounds the bias away and a row it hides entirely changes).
    # Unchanged masks are in eager's order: the last one is added last.
    ranked = [_to_rank4(graph, anchor, x) for x in masks]
    if analysis.changed and not masks_override:
        lasts = ranked[: len(analysis.key_masks)]
    else:
        lasts = ranked[-1:]
    mask, additive = _combine_masks(graph, anchor, ranked, lasts)
    if mask is not None and _inert_constant(graph, mask):
        mask = None  # a constant that masks nothing (ViT/DeiT's all-zero mask): no mask at all
    bias = None
    for term in [*biases, *([additive] if additive is not None else [])]:
        term = _to_rank4(graph, anchor, term)
        bias = term if bias is None else emit_before(graph, anchor, "add", [bias, term])
    if mask is not None and "mask" not in kinds and not analysis.key_masks:
        kinds.append("mask")  # masks the analysis was not given (SDPA's top-left triangle)
    attrs = AttentionAttrs(
        scale=float(scale),
        causal=causal,
        softcap=softcap,
        mask_causal=mask_causal and not causal,
        mask_kind="+".join(kinds) or "none",
        nan_weights_zero=nan_weights_zero,
    )
    if windowed:
        attrs = dataclasses.replace(
            attrs, variant="sliding_window", window_left=int(window_left), window_right=0
        )
    operands: list[Value | None] = [q4, k4, v4, mask, bias]
    if segments is not None:
        operands += [None, None, segments]
    node = graph.make_node("attention", operands, attrs)
    node.meta.update(meta)
    graph.insert_before(anchor, node)
    out = node.output
    if out.dtype != replaces.dtype:
        out = emit_before(graph, anchor, "cast", [out], CastAttrs(dtype=replaces.dtype))
    if tuple(out.shape) != tuple(replaces.shape):
        out = emit_before(graph, anchor, "reshape", [out], ShapeAttrs(shape=tuple(replaces.shape)))
    if empty_rows is not None:
        out = emit_before(graph, anchor, "where", [empty_rows[0], empty_rows[1], out])
    graph.replace_all_uses(replaces, out)
    return out


def _is_window(window_left: int | None, kv_len: Dim) -> bool:
    return window_left is not None and (not isinstance(kv_len, int) or window_left < kv_len - 1)


def _keep_of(graph: Graph, anchor: Node, analysis: MaskAnalysis) -> Value | None:
    """The conjunction of the analysed bool key masks (rank 4), or None (none, or additive)."""
    if not analysis.key_masks or any(c.additive for c in analysis.key_masks):
        return None
    keep = None
    for conj in analysis.key_masks:
        term = _not(graph, anchor, conj.value) if conj.negated else conj.value
        term = _to_rank4(graph, anchor, term)
        keep = (
            term
            if keep is None
            else emit_aten_before(graph, anchor, "aten.logical_and.default", [keep, term])
        )
    return keep


def _finite_fill_rows(
    graph: Graph,
    anchor: Node,
    analysis: MaskAnalysis,
    v: Value,
    q_len: Dim,
    kv_len: Dim,
    rank: int,
) -> tuple[Value, Value] | None:
    """``(empty, mean of v)`` for the rows a finite-fill mask read as key masks (and causality)
    hides entirely: eager's softmax over equal scores there is the mean of v over all keys.
    None when the analysed parts are not key masks plus causality over equal lengths (then the
    mask is kept as it was)."""
    if rank != 4 or analysis.remainder or analysis.segments is not None:
        return None
    if analysis.window_left is not None or (analysis.causal and q_len != kv_len):
        return None
    keep = _keep_of(graph, anchor, analysis)
    if keep is None:
        return None
    if analysis.causal:  # query i sees keys 0..i: empty when no key up to i is kept
        seen = emit_aten_before(graph, anchor, "aten.cumsum.default", [keep, -1])
        none = emit_aten_before(graph, anchor, "aten.eq.Scalar", [seen, 0])
        empty = emit_before(graph, anchor, "transpose", [none], TransposeAttrs(dim0=-2, dim1=-1))
    else:
        seen = emit_aten_before(graph, anchor, "aten.any.dim", [keep, -1, True])
        empty = _not(graph, anchor, seen)
    return empty, _mean_of_v(graph, anchor, v)


def _mean_of_v(graph: Graph, anchor: Node, v: Value) -> Value:
    """The mean of v over the keys, per query head (eager's row when every key is masked by a
    finite fill)."""
    source, group = _kv_repeat_source(v)
    mean = emit_aten_before(graph, anchor, "aten.mean.dim", [source, [-2], True])
    if group > 1:  # GQA: the mean of the shared key/value heads, repeated per query head
        mean = emit_aten_before(graph, anchor, "aten.repeat_interleave.self_int", [mean, group, 1])
    return mean


def _kv_repeat_source(v: Value) -> tuple[Value, int]:
    """``(source, n)`` when ``v`` is ``source`` with each head repeated ``n`` times (GQA's
    ``expand`` + ``reshape``), else ``(v, 1)``: reading the source keeps head pruning able to
    slice the key/value heads."""
    node = v.producer
    expand = node.inputs[0].producer if node is not None and node.op == "reshape" else None
    unsq = expand.inputs[0].producer if expand is not None and expand.op == "expand" else None
    if unsq is None or unsq.op != "unsqueeze" or unsq.attrs.dim % 5 != 2:
        return v, 1
    source = unsq.inputs[0]
    if source is None or source.tensor_type.rank != 4 or v.tensor_type.rank != 4:
        return v, 1
    group = expand.output.shape[2]  # type: ignore[union-attr]
    if not isinstance(group, int) or v.shape[1] != source.shape[1] * group:
        return v, 1
    return source, group


def _inert_constant(graph: Graph, mask: Value) -> bool:
    """Whether ``mask`` is a compile-time constant that hides no key and shifts no score."""
    tensor = constant_tensor(graph, mask)
    return tensor is not None and mask_is_inert(tensor)


def _combine_masks(
    graph: Graph, anchor: Node, masks: list[Value], lasts: list[Value] | None = None
) -> tuple[Value | None, Value | None]:
    """One mask for the op, and an additive term for its bias when bool and float masks meet.

    The bool masks are and-ed and stay the op's mask; float masks are summed. With both, the
    float sum goes to the bias: the op adds the bias and then hides what the bool mask hides, as
    eager's ``masked_fill`` does (folding the bool mask into the float one as ``-inf`` would add
    it, and ``-inf`` added to a NaN score stays NaN where eager replaced it).

    With float masks only, those of ``lasts`` (eager adds them last) stay the op's mask and the
    other floats go to the bias: the op adds its bias first.
    """
    if not masks:
        return None, None
    if len(masks) == 1:
        return masks[0], None
    bools = [m for m in masks if m.dtype == torch.bool]
    floats = [m for m in masks if m.dtype != torch.bool]
    lasts = [m for m in lasts or [] if m.dtype != torch.bool]
    others = [m for m in floats if all(m is not x for x in lasts)]
    if not bools and lasts and others:
        return _sum(graph, anchor, lasts), _sum(graph, anchor, others)
    keep = None
    for m in bools:
        keep = (
            m
            if keep is None
            else emit_aten_before(graph, anchor, "aten.logical_and.default", [keep, m])
        )
    additive = _sum(graph, anchor, floats) if floats else None
    if additive is None or keep is None:
        return keep if additive is None else additive, None
    return keep, additive


def _sum(graph: Graph, anchor: Node, terms: list[Value]) -> Value:
    total = terms[0]
    for term in terms[1:]:
        total = emit_before(graph, anchor, "add", [total, term])
    return total


def _not(graph: Graph, anchor: Node, value: Value) -> Value:
    return emit_aten_before(graph, anchor, "aten.logical_not.default", [value])


def _fill(value: float) -> Any:
    from attnopt.ir.core_ops import FillAttrs

    return FillAttrs(value=value)


def site_meta(graph: Graph, softmax: Node, q: Value, k: Value) -> dict[str, Any]:
    """Site metadata: self or cross, the q/k projections around it, the module path."""
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
    q_len, kv_len = canon[-2], canon[-1]  # ints, or symbolic dims (str)
    masks: list[Value] = []
    biases: list[Value] = []
    window: int | None = None  # a constant causal(-window) pattern replaced by attributes
    fill_keeps: list[Value] = []  # every fill's visibility, canonical layout
    for item, shape in m.additive:
        raw = item
        while isinstance(raw, ScaledTerm):
            raw = raw.term
        constant = constant_tensor(graph, raw)
        found = (
            additive_window(constant, q_len, kv_len)
            if constant is not None and tuple(shape) == canon
            else None
        )
        if found is not None:
            window = _narrower(window, found)
            continue
        term = _to_canonical(graph, anchor, _materialise(graph, anchor, item), shape, canon)
        (biases if derived_from_parameter(graph, raw) else masks).append(term)
    for mask, masked_when, _value, shape in m.fills:  # type: ignore[misc]
        keep_const = _constant_keep(graph, mask, masked_when)
        if keep_const is not None and tuple(shape) == canon:
            found = causal_window(keep_const, q_len, kv_len)
            if found is not None:
                window = _narrower(window, found)
                fill_keeps.append(graph.add_tensor("fill_keep", keep_const))
                continue
        keep = _not(graph, anchor, mask) if masked_when else mask
        fill_keeps.append(_to_canonical(graph, anchor, keep, shape, canon))
        # A fill replaces the score whatever it was (inf and NaN too): a bool mask keeps that
        # (the op masked_fills it), adding the fill would not (inf + fill is inf). A finite
        # fill's weight underflows to zero as -inf's does (MASK_FILL_LIMIT); rows it masks
        # entirely are restored after the op (_uniform_rows).
        masks.append(fill_keeps[-1])
    k = emit_before(graph, anchor, "transpose", [kt], TransposeAttrs(dim0=-2, dim1=-1))
    return build_attention(
        graph,
        anchor,
        q,
        k,
        v,
        masks=masks,
        biases=biases,
        scale=m.scale,
        causal=window is not None,
        softcap=m.softcap,
        window_left=window,
        source=m.softmax,
        replaces=m.pv.output,
        empty_rows=_uniform_rows(graph, anchor, m, fill_keeps, canon),
        nan_weights_zero=m.nan_weights_zero,
    )


def _uniform_rows(
    graph: Graph, anchor: Node, m: AttentionMatch, keeps: list[Value], canon: tuple
) -> tuple[Value, Value] | None:
    """Eager semantics of finite fills on a row whose keys are all masked: every score is the fill
    value, so softmax is uniform and the row is the mean of v. The op's kernels give such rows
    zeros (or ignore the additive stand-in), so the rows are restored after the op: ``(empty,
    mean of v)``. Only for fills of one finite value with no additive term after them (then a
    masked score is exactly the fill); other fill mixes keep the op's semantics."""
    values = {value for _, _, value, _ in m.fills}  # type: ignore[misc]
    if not m.fills or len(values) != 1 or not math.isfinite(next(iter(values))):
        return None
    out = m.pv.output
    v = m.pv.inputs[1]
    if m.add_after_fill or v is None or len(out.shape) != len(canon):
        return None
    if tuple(out.shape[:-1]) != tuple(canon[:-1]):
        return None
    constants = [constant_tensor(graph, keep) for keep in keeps]
    if all(c is not None for c in constants):  # e.g. a causal fill alone: decide now
        visible_now = constants[0].bool()  # type: ignore[union-attr]
        for c in constants[1:]:
            visible_now = visible_now & c.bool()  # type: ignore[union-attr]
        empty_now = ~visible_now.any(-1, keepdim=True)
        if not bool(empty_now.any()):
            return None
        empty = graph.add_tensor("empty_rows", empty_now)
    else:
        visible = keeps[0]
        for keep in keeps[1:]:
            visible = emit_aten_before(graph, anchor, "aten.logical_and.default", [visible, keep])
        seen = emit_aten_before(graph, anchor, "aten.any.dim", [visible, -1, True])
        empty = _not(graph, anchor, seen)
    return empty, _mean_of_v(graph, anchor, v)
