"""Lowerings of ONNX ops into IR ops, one function per op family.

Entry point: :func:`lower_node`. Each lowering takes the importer, the ONNX node and its operands
(IR values, constant tensors, None for absent inputs) and returns the node's outputs. Lowerings
emit through :meth:`Importer.op` / :meth:`Importer.aten`, which evaluate the op at import when
every input is a constant. An op or attribute combination without a lowering runs as it is in
onnxruntime (``onnx_node``). Attention ops (ONNX ``Attention``, ``com.microsoft.Attention`` and
``MultiHeadAttention``) and onnxruntime's other transformer ops are in
:mod:`attnopt.frontend.onnx_transformer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attnopt.frontend.onnx_import import Importer, Operand
from attnopt.frontend.onnx_load import tensor_from_proto, torch_dtype
from attnopt.ir import Value
from attnopt.ir.core_ops import (
    CastAttrs,
    DimAttrs,
    PermuteAttrs,
    ReduceAttrs,
    ScalarOperandAttrs,
    ShapeAttrs,
)


class Unsupported(Exception):
    """This node's attributes or operands have no lowering: run it as an ``onnx_node``."""


def attributes(node: Any) -> dict[str, Any]:
    """The node's attributes as Python values (tensors as torch tensors)."""
    from onnx import helper

    result = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.type == attr.TENSOR:
            value = tensor_from_proto(attr.t)
        elif isinstance(value, bytes):
            value = value.decode()
        result[attr.name] = value
    return result


def shape_of(x: Operand) -> tuple[int, ...]:
    """The static shape of a value or constant."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, Value):
        return tuple(int(d) for d in x.shape)
    raise Unsupported("absent input")


def dtype_of(x: Operand) -> torch.dtype:
    """The dtype of a value or constant."""
    assert x is not None
    return x.dtype


def const(x: Operand, what: str) -> torch.Tensor:
    """``x`` when it is a constant, else :class:`Unsupported`."""
    if not isinstance(x, torch.Tensor):
        raise Unsupported(f"{what} is not a constant")
    return x


def ints(x: Operand, what: str) -> list[int]:
    """A constant int tensor as a list."""
    return [int(v) for v in const(x, what).reshape(-1).tolist()]


# --- elementwise ------------------------------------------------------------------------------
_COMMUTATIVE = {"add", "mul"}


def _binary(op: str) -> Callable:
    def lower(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
        a, b = ins
        if op in _COMMUTATIVE and isinstance(a, torch.Tensor) and isinstance(b, Value):
            a, b = b, a
        if op == "div" and not dtype_of(a).is_floating_point:
            return [im.aten("aten.div.Tensor_mode", [a, b], {"rounding_mode": "trunc"})]
        if isinstance(a, Value) and isinstance(b, torch.Tensor) and _is_scalar_for(b, a):
            return [im.op(op, [a], ScalarOperandAttrs(scalar=float(b.reshape(-1)[0])))]
        if (
            op == "sub"
            and isinstance(b, Value)
            and isinstance(a, torch.Tensor)
            and _is_scalar_for(a, b)
        ):
            return [im.aten("aten.rsub.Scalar", [b, float(a.reshape(-1)[0])])]
        return [im.op(op, [a, b], ScalarOperandAttrs())]

    return lower


def _is_scalar_for(c: torch.Tensor, x: Value) -> bool:
    """A one-element float constant that broadcasting with ``x`` leaves ``x``'s shape."""
    return (
        c.numel() == 1 and c.dim() <= len(x.shape) and c.dtype == x.dtype and c.is_floating_point()
    )


def _unary_core(op: str) -> Callable:
    return lambda im, node, ins: [im.op(op, [ins[0]])]


def _unary_aten(target: str, **kwargs: Any) -> Callable:
    return lambda im, node, ins: [im.aten(target, [ins[0]], kwargs or None)]


def _binary_aten(target: str) -> Callable:
    return lambda im, node, ins: [im.aten(target, [ins[0], ins[1]])]


def _pow(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, e = ins
    if not dtype_of(x).is_floating_point:
        raise Unsupported("Pow of an integer base (its result keeps the base's type)")
    if isinstance(e, torch.Tensor) and e.numel() == 1 and e.dim() <= len(shape_of(x)):
        exponent = e.reshape(-1)[0].item()
        return [im.aten("aten.pow.Tensor_Scalar", [x, exponent])]
    return [im.aten("aten.pow.Tensor_Tensor", [x, e])]


def _cast(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    dtype = torch_dtype(attributes(node)["to"], im.where())
    if dtype_of(ins[0]) == dtype:
        return [ins[0]]
    return [im.op("cast", [ins[0]], CastAttrs(dtype=dtype))]


def _cast_like(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    dtype = dtype_of(ins[1])
    return [
        ins[0] if dtype_of(ins[0]) == dtype else im.op("cast", [ins[0]], CastAttrs(dtype=dtype))
    ]


def _where(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    return [im.op("where", list(ins))]


def _variadic(target: str) -> Callable:
    def lower(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
        out = ins[0]
        for other in ins[1:]:
            out = im.aten(target, [out, other])
        return [out]

    return lower


def _clip(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, low, high = (list(ins) + [None, None])[:3]
    if not dtype_of(x).is_floating_point:
        raise Unsupported("Clip of integers")
    args = [
        x,
        None if low is None else float(const(low, "min")),
        None if high is None else float(const(high, "max")),
    ]
    return [im.aten("aten.clamp.default", args)]


def _gelu(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    approximate = attributes(node).get("approximate", "none")
    return [im.aten("aten.gelu.default", [ins[0]], {"approximate": approximate})]


# --- matmul -----------------------------------------------------------------------------------
def _matmul(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    """``MatMul`` by a constant matrix is a projection: ``linear``, with the bias of an ``Add``
    that is the product's only reader (the TorchScript exporter's form of ``nn.Linear``)."""
    x, weight = ins
    if not (isinstance(x, Value) and isinstance(weight, torch.Tensor) and weight.dim() == 2):
        return [im.op("matmul", [x, weight])]
    if not weight.is_floating_point() or weight.dtype != x.dtype or len(shape_of(x)) < 2:
        return [im.op("matmul", [x, weight])]
    add, bias = im.sole_reader(node.output[0]), None
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        found = im.env.get(other)
        if isinstance(found, torch.Tensor) and found.shape == (weight.shape[1],):
            bias = found if found.dtype == weight.dtype else None
    name = im.names.get(id(weight), "weight")
    transposed = im.mark_weight(weight.t().contiguous(), f"{name}.T")
    out = im.op("linear", [x, transposed, bias])
    if bias is not None:
        im.absorbed[add.output[0]] = out
    return [out]


def _gemm(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    a, b, c = (list(ins) + [None])[:3]
    attrs = attributes(node)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = im.op("transpose", [a], None)
    if not attrs.get("transB", 0) and isinstance(b, torch.Tensor):
        # A constant [K, N] operand (GPT-2's Conv1D): the [N, K] weight of a linear, once.
        b = im.mark_weight(b.t().contiguous(), f"{im.names.get(id(b), 'weight')}.T")
        attrs["transB"] = 1
    if attrs.get("transB", 0) and alpha == 1.0 and (c is None or beta == 1.0):
        if c is None or len(shape_of(c)) == 1 and shape_of(c)[0] == shape_of(b)[0]:
            return [im.op("linear", [a, b, c])]
    if attrs.get("transB", 0):
        b = im.op("transpose", [b], None)
    out = im.op("matmul", [a, b])
    if alpha != 1.0:
        out = im.op("mul", [out], ScalarOperandAttrs(scalar=float(alpha)))
    if c is not None:
        if beta != 1.0:
            c = im.op("mul", [c], ScalarOperandAttrs(scalar=float(beta)))
        out = im.op("add", [out, c], ScalarOperandAttrs())
    return [out]


# --- softmax and reductions -------------------------------------------------------------------
def _softmax(op: str) -> Callable:
    def lower(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
        return [im.op(op, [ins[0]], DimAttrs(dim=int(attributes(node).get("axis", -1))))]

    return lower


def _reduce_axes(im: Importer, node: Any, ins: list[Operand]) -> tuple[list[int], bool] | None:
    attrs = attributes(node)
    keepdims = bool(attrs.get("keepdims", 1))
    axes = attrs.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = ints(ins[1], "axes")
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(len(shape_of(ins[0]))))
    return [int(a) for a in axes], keepdims


def _reduce(kind: str) -> Callable:
    def lower(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
        found = _reduce_axes(im, node, ins)
        if found is None:
            return [ins[0]]
        axes, keepdims = found
        x = ins[0]
        if kind == "sum" and dtype_of(x).is_floating_point:
            return [im.op("sum", [x], ReduceAttrs(dims=tuple(axes), keepdim=keepdims))]
        if kind == "sum":
            return [im.aten("aten.sum.dim_IntList", [x, axes, keepdims], {"dtype": dtype_of(x)})]
        if kind == "max":
            return [im.op("amax", [x], ReduceAttrs(dims=tuple(axes), keepdim=keepdims))]
        if kind == "min":
            return [im.aten("aten.amin.default", [x, axes, keepdims])]
        if kind == "mean" and dtype_of(x).is_floating_point:
            return [im.aten("aten.mean.dim", [x, axes, keepdims])]
        raise Unsupported(f"Reduce {kind} of {dtype_of(x)}")

    return lower


def _layer_norm(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, scale, bias = (list(ins) + [None])[:3]
    attrs = attributes(node)
    if any(node.output[1:]):
        raise Unsupported("LayerNormalization's mean/inv_std outputs are used")
    shape = shape_of(x)
    axis = int(attrs.get("axis", -1)) % len(shape)
    normalized = list(shape[axis:])
    for param in (scale, bias):
        if param is not None and list(shape_of(param)) != normalized:
            raise Unsupported("scale/bias broadcast over the normalized shape")
    eps = float(attrs.get("epsilon", 1e-5))
    return [im.aten("aten.layer_norm.default", [x, normalized, scale, bias, eps])]


# --- shapes -----------------------------------------------------------------------------------
def _reshape(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, target = ins
    dims = ints(target, "the target shape")
    shape = shape_of(x)
    allowzero = attributes(node).get("allowzero", 0)
    resolved = tuple(shape[i] if d == 0 and not allowzero else d for i, d in enumerate(dims))
    return [im.op("reshape", [x], ShapeAttrs(shape=resolved))]


def _flatten(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    shape = shape_of(ins[0])
    axis = int(attributes(node).get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    outer = math.prod(shape[:axis])
    return [im.op("reshape", [ins[0]], ShapeAttrs(shape=(outer, math.prod(shape[axis:]))))]


def _transpose(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    rank = len(shape_of(ins[0]))
    perm = attributes(node).get("perm") or list(reversed(range(rank)))
    return [im.op("permute", [ins[0]], PermuteAttrs(dims=tuple(int(p) for p in perm)))]


def _axes(im: Importer, node: Any, ins: list[Operand]) -> list[int] | None:
    axes = attributes(node).get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = ints(ins[1], "axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    axes = _axes(im, node, ins) or []
    rank = len(shape_of(ins[0])) + len(axes)
    out = ins[0]
    for axis in sorted(a % rank for a in axes):
        out = im.op("unsqueeze", [out], DimAttrs(dim=axis))
    return [out]


def _squeeze(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    shape = shape_of(ins[0])
    axes = _axes(im, node, ins)
    axes = (
        [i for i, d in enumerate(shape) if d == 1]
        if axes is None
        else [a % len(shape) for a in axes]
    )
    return [im.aten("aten.squeeze.dims", [ins[0], sorted(axes)])]


def _concat(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    parts = [x for x in ins if x is not None]
    return [im.aten("aten.cat.default", [parts, int(attributes(node)["axis"])])]


def _split(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    attrs = attributes(node)
    x = ins[0]
    axis = int(attrs.get("axis", 0))
    length = shape_of(x)[axis]
    sizes = attrs.get("split")
    if sizes is None and len(ins) > 1 and ins[1] is not None:
        sizes = ints(ins[1], "split")
    if sizes is None:
        count = int(attrs.get("num_outputs", len(node.output)))
        chunk = -(-length // count)
        sizes = [min(chunk, length - i * chunk) for i in range(count)]
        if min(sizes) <= 0:
            raise Unsupported("uneven Split into more outputs than chunks")
    out = im.aten(
        "aten.split_with_sizes.default", [x, [int(s) for s in sizes], axis], outputs=len(sizes)
    )
    return out if isinstance(out, list) else [out]


def _gather(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, index = ins
    axis = int(attributes(node).get("axis", 0)) % len(shape_of(x))
    if isinstance(index, torch.Tensor) and index.dim() == 0:
        return [im.aten("aten.select.int", [x, axis, int(index)])]
    if dtype_of(index) not in (torch.int64, torch.int32):
        raise Unsupported("index dtype")
    return [im.aten("aten.index.Tensor", [x, [None] * axis + [index]])]


def _gather_elements(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, index = ins
    axis = int(attributes(node).get("axis", 0)) % len(shape_of(x))
    if not isinstance(index, torch.Tensor) or bool((index < 0).any()):
        raise Unsupported("GatherElements with indices that may be negative")
    return [im.aten("aten.gather.default", [x, axis, index.to(torch.int64)])]


def _gather_nd(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, index = ins
    if attributes(node).get("batch_dims", 0) or dtype_of(index) != torch.int64:
        raise Unsupported("GatherND with batch_dims or int32 indices")
    columns = [im.aten("aten.select.int", [index, -1, i]) for i in range(shape_of(index)[-1])]
    return [im.aten("aten.index.Tensor", [x, columns])]


def _slice(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x = ins[0]
    starts, ends = ints(ins[1], "starts"), ints(ins[2], "ends")
    rank = len(shape_of(x))
    axes = ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise Unsupported("negative slice step")
        size = shape_of(x)[axis % rank]
        start, end = max(min(start, size), -size), max(min(end, size), -size - 1)
        out = im.aten("aten.slice.Tensor", [out, axis % rank, start, end, step])
    return [out]


def _shape(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    attrs = attributes(node)
    shape = list(shape_of(ins[0]))
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return [torch.tensor(shape[start:end], dtype=torch.int64)]


def _size(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    return [torch.tensor(math.prod(shape_of(ins[0])), dtype=torch.int64)]


def _expand(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, target = ins
    shape = tuple(torch.broadcast_shapes(shape_of(x), tuple(ints(target, "the target shape"))))
    if shape == shape_of(x):
        return [x]
    return [im.op("expand", [x], ShapeAttrs(shape=shape))]


def _constant(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    attrs = attributes(node)
    if "value" in attrs:
        return [attrs["value"]]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):  # fmt: skip
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    raise Unsupported("a Constant of another kind")


def _constant_of_shape(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    fill = attributes(node).get("value", torch.zeros(1, dtype=torch.float32))
    shape = ints(ins[0], "the shape")
    return [torch.full(shape, fill.reshape(-1)[0].item(), dtype=fill.dtype)]


def _range(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    start, limit, delta = (const(x, "Range bound") for x in ins)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _trilu(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    k = int(const(ins[1], "k")) if len(ins) > 1 and ins[1] is not None else 0
    upper = attributes(node).get("upper", 1)
    return [im.aten("aten.triu.default" if upper else "aten.tril.default", [ins[0], k])]


def _identity(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    return [ins[0]]


def _dropout(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    if len(ins) > 2 and ins[2] is not None and bool(const(ins[2], "training_mode")):
        raise Unsupported("Dropout in training mode")
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported("Dropout's mask output is used")
    return [ins[0]]


def _conv(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    x, weight, bias = (list(ins) + [None])[:3]
    attrs = attributes(node)
    spatial = len(shape_of(weight)) - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Unsupported("auto_pad")
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    if pads[:spatial] != pads[spatial:]:
        raise Unsupported("asymmetric pads")
    args = [
        x, weight, bias, list(attrs.get("strides", [1] * spatial)), pads[:spatial],
        list(attrs.get("dilations", [1] * spatial)), False, [0] * spatial, int(attrs.get("group", 1)),
    ]  # fmt: skip
    return [im.aten("aten.convolution.default", args)]


def _einsum(im: Importer, node: Any, ins: list[Operand]) -> list[Operand]:
    return [im.aten("aten.einsum.default", [attributes(node)["equation"], list(ins)])]


def _lowerings() -> dict[tuple[str, str], Callable]:
    from attnopt.frontend.onnx_transformer import LOWERINGS as TRANSFORMER

    table: dict[str, Callable] = {
        "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
        "Pow": _pow, "MatMul": _matmul, "Gemm": _gemm,
        "Sqrt": _unary_core("sqrt"), "Tanh": _unary_core("tanh"), "Exp": _unary_core("exp"),
        "Neg": _unary_core("neg"), "Sigmoid": _unary_core("sigmoid"),
        "Erf": _unary_aten("aten.erf.default"), "Relu": _unary_aten("aten.relu.default"),
        "Abs": _unary_aten("aten.abs.default"), "Log": _unary_aten("aten.log.default"),
        "Reciprocal": _unary_aten("aten.reciprocal.default"), "Not": _unary_aten("aten.logical_not.default"),
        "IsNaN": _unary_aten("aten.isnan.default"), "Floor": _unary_aten("aten.floor.default"),
        "Ceil": _unary_aten("aten.ceil.default"), "Sin": _unary_aten("aten.sin.default"),
        "Cos": _unary_aten("aten.cos.default"),
        "Equal": _binary_aten("aten.eq.Tensor"), "Less": _binary_aten("aten.lt.Tensor"),
        "LessOrEqual": _binary_aten("aten.le.Tensor"), "Greater": _binary_aten("aten.gt.Tensor"),
        "GreaterOrEqual": _binary_aten("aten.ge.Tensor"), "And": _binary_aten("aten.logical_and.default"),
        "Or": _binary_aten("aten.logical_or.default"), "Xor": _binary_aten("aten.logical_xor.default"),
        "Max": _variadic("aten.maximum.default"), "Min": _variadic("aten.minimum.default"),
        "Where": _where, "Cast": _cast, "CastLike": _cast_like, "Clip": _clip, "Gelu": _gelu,
        "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
        "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
        "ReduceMin": _reduce("min"), "LayerNormalization": _layer_norm,
        "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
        "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat, "Split": _split,
        "Gather": _gather, "GatherElements": _gather_elements,
        "GatherND": _gather_nd, "Slice": _slice, "Shape": _shape,
        "Size": _size, "Expand": _expand, "Constant": _constant,
        "ConstantOfShape": _constant_of_shape, "Range": _range, "Trilu": _trilu,
        "Identity": _identity, "Dropout": _dropout, "Conv": _conv, "Einsum": _einsum,
    }  # fmt: skip
    lowerings = {("", name): fn for name, fn in table.items()}
    lowerings.update(TRANSFORMER)
    return lowerings


_TABLE: dict[tuple[str, str], Callable] = {}


def lower_node(im: Importer, node: Any, inputs: list[Operand]) -> list[Operand]:
    """Lower one ONNX node; an op or form without a lowering runs as an ``onnx_node``.

    Args:
        im: the importer.
        node: the ``onnx.NodeProto``.
        inputs: its operands (IR values, constant tensors, None for absent inputs).

    Returns:
        Its outputs, in the node's output order (None for outputs nothing reads).
    """
    if not _TABLE:
        _TABLE.update(_lowerings())
    if node.output and node.output[0] in im.absorbed:  # computed by the lowering of a producer
        return [im.absorbed.pop(node.output[0])]
    domain = "" if node.domain == "ai.onnx" else node.domain
    lowering = _TABLE.get((domain, node.op_type))
    if lowering is not None:
        try:
            return list(lowering(im, node, inputs))
        except Unsupported:
            pass
    return im.opaque(inputs)
