"""Small graph-building helpers shared by passes.

Entry points: :func:`emit_before`, :func:`emit_at`, :func:`emit_aten_before`, :func:`constant_scalar`,
:func:`view_chain_source`.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from attnopt.ir import Graph, Node, Value
from attnopt.ir.aten_args import encode_template
from attnopt.ir.core_ops import AtenAttrs

#: Ops that only re-index their input (no arithmetic): walked through to find projections.
VIEW_OPS = ("reshape", "transpose", "permute", "contiguous", "unsqueeze", "expand")

#: Core ops that act elementwise (operands broadcast).
ELEMENTWISE_OPS = {"add", "sub", "mul", "div", "neg", "exp", "cast", "where", "masked_fill", "tanh",
                "sigmoid", "rsqrt", "sqrt", "contiguous"}  # fmt: skip

#: ATen ops that act elementwise on their tensor operands.
ATEN_POINTWISE = {
    "aten.gelu.default", "aten.silu.default", "aten.relu.default", "aten.tanh.default",
    "aten.sigmoid.default", "aten.erf.default", "aten.neg.default", "aten.abs.default",
    "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.mul.Tensor", "aten.add.Tensor",
    "aten.sub.Tensor", "aten.div.Tensor", "aten.rsqrt.default", "aten.sqrt.default",
    "aten.exp.default", "aten.clone.default", "aten.alias.default", "aten.contiguous.default",
    "aten._to_copy.default", "aten.to.dtype", "aten.clamp.default", "aten.clamp_min.default",
    "aten.where.self", "aten.gelu_tanh.default", "aten.softplus.default", "aten.mish.default",
    "aten.hardswish.default", "aten.leaky_relu.default", "aten.elu.default",
}  # fmt: skip

#: ATen ops over some dims: which positional argument holds the dim(s).
ATEN_DIM_ARG = {
    "aten.mean.dim": 1,
    "aten.sum.dim_IntList": 1,
    "aten.amax.default": 1,
    "aten.cat.default": 1,
    "aten.slice.Tensor": 1,
    "aten._softmax.default": 1,
    "aten.softmax.int": 1,
}


def emit_before(
    graph: Graph, anchor: Node, op: str, inputs: list[Value | None], attrs: Any = None, **meta: Any
) -> Value:
    """Create an ``op`` node right before ``anchor`` and return its (single) output.

    Args:
        graph: the graph.
        anchor: the node the new one must precede.
        op: op name.
        inputs: input values.
        attrs: attributes (op defaults when None).
        **meta: metadata to attach (``module`` is copied from the anchor when not given).

    Returns:
        The new node's output value.
    """
    node = graph.make_node(op, inputs, attrs)
    node.meta.update(meta)
    if "module" not in node.meta and "module" in anchor.meta:
        node.meta["module"] = anchor.meta["module"]
    graph.insert_before(anchor, node)
    return node.output


def emit_at(
    graph: Graph, anchor: Node | None, op: str, inputs: list[Value | None], attrs: Any = None
) -> Value:
    """:func:`emit_before` ``anchor``, or at the end of the graph when ``anchor`` is None.

    Args:
        graph: the graph.
        anchor: the node the new one must precede, or None.
        op: op name.
        inputs: input values.
        attrs: attributes (op defaults when None).

    Returns:
        The new node's output value.
    """
    if anchor is not None:
        return emit_before(graph, anchor, op, inputs, attrs)
    node = graph.make_node(op, inputs, attrs)
    graph.append(node)
    return node.output


def key_padding_keep(mask: Value | None) -> Value | None:
    """The bool keep mask behind a key padding mask: itself, or ``keep`` of
    ``where(keep, 0, fill)`` (the additive form that keeps eager's rows for a finite fill).

    Args:
        mask: an attention mask operand, or None.

    Returns:
        The bool mask of the same shape, or None (no mask, or not of these forms).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    node = mask.producer
    if node is not None and node.op == "where" and node.inputs[0] is not None:
        keep = node.inputs[0]
        if keep.dtype == torch.bool and tuple(keep.shape) == tuple(mask.shape):
            return keep
    return None


def _aten_template(args: list[Any], kwargs: dict | None) -> tuple[list[Value], str]:
    """The input Values and the JSON argument template of an ``aten`` call."""
    inputs: list[Value] = []

    def index(obj: Any) -> int | None:
        if isinstance(obj, Value):
            inputs.append(obj)
            return len(inputs) - 1
        return None

    return inputs, json.dumps(encode_template([list(args), dict(kwargs or {})], index))


def emit_aten_before(
    graph: Graph, anchor: Node, target: str, args: list[Any], kwargs: dict | None = None
) -> Value:
    """Create an opaque ATen node ``target(*args, **kwargs)`` before ``anchor``.

    Args:
        graph: the graph.
        anchor: the node the new one must precede.
        target: overload name such as ``"aten.logical_not.default"``.
        args: positional arguments; Values become inputs.
        kwargs: keyword arguments.

    Returns:
        The output value.
    """
    inputs, template = _aten_template(args, kwargs)
    return emit_before(graph, anchor, "aten", inputs, AtenAttrs(target=target, args=template))


def constant_tensor(graph: Graph, value: Value | None) -> torch.Tensor | None:
    """The tensor behind ``value`` when it is a ``param`` of a known constant (not a parameter)."""
    if value is None or value.producer is None or value.producer.op != "param":
        return None
    name = value.producer.attrs.name
    if name in graph.meta.get("parameters", ()):
        return None
    return graph.tensors.get(name)


def constant_scalar(graph: Graph, value: Value | None) -> float | None:
    """The Python number behind a one-element constant tensor, else None."""
    tensor = constant_tensor(graph, value)
    if tensor is None or tensor.numel() != 1 or tensor.dtype == torch.bool:
        return None
    return float(tensor.reshape(()).item())


def view_chain_source(value: Value) -> tuple[Value, list[Node]]:
    """Walk back through view-like ops; returns the first non-view value and the views passed."""
    chain: list[Node] = []
    while value.producer is not None and value.producer.op in VIEW_OPS:
        chain.append(value.producer)
        value = value.producer.inputs[0]  # type: ignore[assignment]
    return value, chain


def set_aten_call(node: Node, target: str, args: list[Any], kwargs: dict | None = None) -> None:
    """Make ``node`` the ATen call ``target(*args, **kwargs)`` in place: its output values, and
    so every reference to them, stay (the call must produce the same types).

    Args:
        node: the node to change.
        target: overload name such as ``"aten.new_zeros.default"``.
        args: positional arguments; Values become inputs.
        kwargs: keyword arguments.
    """
    inputs, template = _aten_template(args, kwargs)
    node.op, node.inputs = "aten", list(inputs)
    node.attrs = AtenAttrs(target=target, args=template, outputs=len(node.outputs))
