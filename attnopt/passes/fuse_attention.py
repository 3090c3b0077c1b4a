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

Readers that take only the shape, dtype or device of the scores or weights (``zeros_like``,
``new_full``, ``expand_as``...) do not block a site; once it is fused they are rewritten to stop
reading the values the ``attention`` op no longer computes (:func:`detach_shape_readers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.attention import AttentionAttrs
from attnopt.ir.core_ops import ShapeAttrs
from attnopt.ir.symbolic import SymbolRef
from attnopt.ir.types import TensorType
from attnopt.passes.attention_build import (
    additive_window,
    build_attention,
    causal_window,
    computed_from,
    derived_from_parameter,
    rewrite_match,
)
from attnopt.passes.attention_match import (
    ADDITIVE_MASK_LIMIT,
    AttentionMatch,
    NoMatch,
    match_attention,
)
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.canonical_views import VIEW_RULES
from attnopt.passes.helpers import (
    constant_tensor,
    emit_before,
    set_aten_call,
    view_chain_source,
)
from attnopt.passes.pattern import apply_rules


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
    q_len, kv_len = q.shape[-2], k.shape[-2]  # ints, or symbolic dims (str)
    scale = bound["scale"] if bound["scale"] is not None else q.shape[-1] ** -0.5
    masks, biases = [], []
    attn_mask = bound["attn_mask"]
    window: int | None = None  # set when the site is causal (kv_len: no window limit)
    if bound["is_causal"]:
        if attn_mask is not None:
            raise NoMatch("SDPA with both attn_mask and is_causal")
        if q_len == kv_len:
            window = kv_len
        elif not (isinstance(q_len, int) and isinstance(kv_len, int)):
            raise NoMatch("top-left causal SDPA over symbolic lengths that may differ")
        else:  # SDPA's is_causal is top-left aligned
            tri = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
            masks.append(graph.add_tensor("sdpa_causal_top_left", tri))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        if derived_from_parameter(graph, attn_mask):
            split = _masked_bias(graph, node, attn_mask)
            biases.append(attn_mask if split is None else split[0])
            attn_mask = None if split is None else split[1]
    if attn_mask is not None:
        constant = constant_tensor(graph, attn_mask)
        found = None
        if constant is not None:
            found = (
                causal_window(constant, q_len, kv_len)
                if constant.dtype == torch.bool
                else additive_window(constant, q_len, kv_len)
            )
        if found is not None:
            window = found
        else:
            masks.append(attn_mask)
    return build_attention(
        graph,
        node,
        q,
        k,
        v,
        masks=masks,
        biases=biases,
        scale=float(scale),
        causal=window is not None,
        softcap=None,
        window_left=window,
        source=node,
        replaces=node.outputs[0],
    )


def _masked_bias(graph: Graph, anchor: Node, value: Value) -> tuple[Value, Value] | None:
    """``(bias, additive mask)`` for an SDPA mask ``where(keep, bias, fill)`` with a fill at
    ``finfo.min`` scale (T5 with SDPA folds its padding into the position bias so), else None.

    The op adds ``bias`` and then the mask ``where(keep, 0, fill)``: a hidden score becomes the
    fill in both orders (``x + fill`` rounds to ``fill`` for any score below 1e30), so mask
    analysis can prove the padding the bias hid.
    """
    while value.producer is not None and value.producer.op in ("contiguous", "cast"):
        if value.producer.op == "cast" and value.producer.inputs[0].dtype != value.dtype:  # type: ignore[union-attr]
            return None
        value = value.producer.inputs[0]  # type: ignore[assignment]
    node = value.producer
    if node is None or node.op != "aten" or node.attrs.target != "aten.where.ScalarOther":
        return None
    args, kwargs = aten_call_args(node)
    keep, bias, fill = args[0], args[1], args[2]
    if kwargs or not isinstance(fill, (int, float)) or fill > ADDITIVE_MASK_LIMIT:
        return None
    if keep.dtype != torch.bool or derived_from_parameter(graph, keep):
        return None
    inputs = {id(v) for v in graph.inputs}
    if not computed_from(keep, lambda v: id(v) in inputs, budget=256):
        # A pattern of positions only (T5's causal decoder without a padding input) is a
        # constant per shape and symbolic otherwise: left in the bias, it reads the same in both
        # compiles (a symbolic compile must not prove less than the per-shape one).
        return None
    zero = graph.add_tensor("mask_zero", torch.zeros((), dtype=value.dtype))
    low = graph.add_tensor("mask_fill", torch.tensor(float(fill), dtype=value.dtype))
    return bias, emit_before(graph, anchor, "where", [keep, zero, low])


#: ``*_like`` factories and the ``new_*`` factory that makes the same tensor from a given size.
_NEW_FACTORY = {
    "aten.zeros_like.default": "aten.new_zeros.default",
    "aten.ones_like.default": "aten.new_ones.default",
    "aten.empty_like.default": "aten.new_empty.default",
    "aten.full_like.default": "aten.new_full.default",
}


def detach_shape_readers(graph: Graph, m: AttentionMatch) -> int:
    """Make the readers of a site's score or weight shapes stop reading those values.

    Run before the site is rewritten, so the analyses of its masks see the detached form. Each
    reader is changed in place (its output value stays, with every reference to it):
    ``mask.expand_as(scores)`` becomes an ``expand`` to the scores' (static or symbolic) shape;
    ``zeros_like(scores)``, ``scores.new_full(size, x)`` and the like become ``new_*`` factories
    with the shape and dtype explicit, of a graph input, which lends its device only (the device
    the compiled program runs on; not the projection of q, or a padding mask built this way
    would look derived from parameters, a bias).

    Args:
        graph: the graph.
        m: the match, with its ``shape_readers``.

    Returns:
        How many readers were changed.
    """
    tensors = [x for x in graph.inputs if isinstance(x.type, TensorType)]
    q = m.qk.inputs[0]
    assert q is not None
    device_source = tensors[0] if tensors else view_chain_source(q)[0]
    for node, value in m.shape_readers:
        target = node.attrs.target
        args, kwargs = aten_call_args(node)
        if target == "aten.expand_as.default":
            node.op, node.inputs = "expand", [args[0]]
            node.attrs = ShapeAttrs(shape=tuple(value.shape))
            continue
        if target in _NEW_FACTORY:  # x_like(value, *rest) -> new_x(source, size, *rest)
            target = _NEW_FACTORY[target]
            size = [d if isinstance(d, int) else SymbolRef(d) for d in value.shape]
            args = [device_source, size, *args[1:]]
            kwargs.pop("memory_format", None)  # the values do not depend on the layout
        else:
            args = [device_source, *args[1:]]
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = value.dtype
        set_aten_call(node, target, args, kwargs)
    return len(m.shape_readers)


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
        fused = detached = 0
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
                    readers = detach_shape_readers(graph, m)
                    rewrite_match(graph, m)
                    fused, detached = fused + 1, detached + readers
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
            f"fused {fused} sites"
            + (f", {repeats} with GQA repeats absorbed" if repeats else "")
            + (f", {detached} shape-only readers detached" if detached else "")
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
