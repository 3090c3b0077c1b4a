"""The op registry: every op declares attributes, shape inference, a torch reference and a cost.

Entry points: :func:`register_op`, :func:`get_op`, :class:`OpDef`, the attribute dataclasses, and
:func:`aten_call_args` for reading an opaque ``aten`` node's arguments.

Each op's reference implementation is the semantics: the runtime's generated program calls it (or
an equivalent emitted expression), kernels are tested against it, and shape inference runs it on
meta tensors unless the op gives its own rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from attnopt.ir.types import ScalarType, TensorType, Type


@dataclass(frozen=True)
class NoAttrs:
    """Attributes of ops that have none."""


@dataclass(frozen=True)
class Cost:
    """Work of one node: floating point operations and bytes moved (reads + writes)."""

    flops: float
    bytes: float


@dataclass(frozen=True)
class OpDef:
    """Declaration of one op.

    Attributes:
        name: op name used in IR text.
        attrs: frozen dataclass type of the attributes.
        impl: reference implementation ``impl(inputs, attrs) -> Tensor | tuple``.
        num_outputs: fixed output count, or a function of the attrs.
        infer: optional shape rule ``infer(input_types, attrs) -> list[Type]``; meta run otherwise.
        cost: optional cost rule ``cost(input_types, output_types, attrs) -> Cost``.
        emit: optional Python expression builder ``emit(arg_names, attrs) -> str`` for codegen.
        pure: False for ops with side effects (never removed as dead code).
        verify: optional rule ``verify(node) -> str | None`` returning a problem.
    """

    name: str
    attrs: type
    impl: Callable[..., Any]
    num_outputs: int | Callable[[Any], int] = 1
    infer: Callable[[list[Type | None], Any], list[Type]] | None = None
    cost: Callable[[list[Type | None], list[Type], Any], Cost] | None = None
    emit: Callable[[list[str], Any], str] | None = None
    pure: bool = True
    verify: Callable[[Any], str | None] | None = None

    def output_count(self, attrs: Any) -> int:
        """Number of outputs for these attributes."""
        return self.num_outputs(attrs) if callable(self.num_outputs) else self.num_outputs

    def infer_types(self, inputs: Sequence[Any], attrs: Any, graph: Any = None) -> list[Type]:
        """Output types for these inputs, by the op's rule or a run on meta tensors."""
        input_types = [None if v is None else v.type for v in inputs]
        if self.infer is not None:
            return self.infer(input_types, attrs)
        if self.name == "param":
            return [TensorType.of(graph.tensors[attrs.name])]
        metas = [_meta(t) for t in input_types]
        with torch.no_grad():
            result = self.impl(metas, attrs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        return [_type_of_result(r) for r in results]

    def cost_of(self, input_types: list[Type | None], output_types: list[Type], attrs: Any) -> Cost:
        """The node's cost; by default one flop per output element and every byte touched."""
        if self.cost is not None:
            return self.cost(input_types, output_types, attrs)
        moved = sum(_nbytes(t) for t in [*input_types, *output_types])
        return Cost(flops=float(sum(_numel(t) for t in output_types)), bytes=float(moved))


def _meta(type_: Type | None) -> Any:
    if type_ is None:
        return None
    if isinstance(type_, ScalarType):
        return {"int": 1, "float": 1.0, "bool": True}[type_.kind]
    if not type_.is_static:
        raise ValueError(f"cannot infer through symbolic shape {type_}")
    return torch.empty(type_.shape, dtype=type_.dtype, device="meta")


def _type_of_result(result: Any) -> Type:
    if isinstance(result, torch.Tensor):
        return TensorType.of(result)
    if isinstance(result, bool):
        return ScalarType("bool")
    if isinstance(result, int):
        return ScalarType("int")
    if isinstance(result, float):
        return ScalarType("float")
    raise TypeError(f"op produced an unsupported value {type(result).__name__}")


def _numel(type_: Type | None) -> int:
    return type_.numel() if isinstance(type_, TensorType) and type_.is_static else 0


def _nbytes(type_: Type | None) -> int:
    return type_.nbytes() if isinstance(type_, TensorType) and type_.is_static else 0


_REGISTRY: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    """Add an op to the registry (a name can be registered once).

    Args:
        opdef: the declaration.

    Returns:
        The same declaration.
    """
    if opdef.name in _REGISTRY:
        raise ValueError(f"op {opdef.name!r} is already registered")
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    """The declaration of op ``name``.

    Args:
        name: a registered op name.

    Returns:
        Its :class:`OpDef`.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_ops() -> list[str]:
    """Names of all registered ops."""
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------------
# Attribute dataclasses
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamAttrs:
    """``param``: a named tensor of the graph (parameter, buffer or constant)."""

    name: str


@dataclass(frozen=True)
class ScalarOperandAttrs:
    """Binary arithmetic: ``scalar`` replaces the second operand when it is a Python number."""

    scalar: float | None = None
    alpha: float = 1.0


@dataclass(frozen=True)
class DimAttrs:
    """Ops over one dimension (softmax, log_softmax, unsqueeze)."""

    dim: int = -1


@dataclass(frozen=True)
class ReduceAttrs:
    """Reductions over dims."""

    dims: tuple[int, ...] = (-1,)
    keepdim: bool = False


@dataclass(frozen=True)
class TransposeAttrs:
    """``transpose``: swap two dims."""

    dim0: int = -2
    dim1: int = -1


@dataclass(frozen=True)
class PermuteAttrs:
    """``permute``: reorder dims."""

    dims: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShapeAttrs:
    """``reshape`` / ``expand``: the target shape (-1 allowed once for reshape)."""

    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class CastAttrs:
    """``cast``: convert to ``dtype``."""

    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class FillAttrs:
    """``masked_fill``: the fill value."""

    value: float = 0.0


@dataclass(frozen=True)
class AtenAttrs:
    """``aten``: an op attnopt does not model, run through its ATen implementation.

    ``target`` names the overload (``aten.slice.Tensor``); ``args`` is a JSON text of the
    positional and keyword arguments where ``{"$v": i}`` stands for input ``i``.
    """

    target: str
    args: str = "[[], {}]"
    outputs: int = 1


# ----------------------------------------------------------------------------------------------
# Argument templates for opaque aten nodes
# ----------------------------------------------------------------------------------------------
def encode_template(obj: Any, tensor_index: Callable[[Any], int | None]) -> Any:
    """Turn an argument structure into JSON data; tensors become ``{"$v": index}``.

    Args:
        obj: positional/keyword argument structure (lists, tuples, dicts, scalars, dtypes...).
        tensor_index: maps a tensor-like leaf to its input index, or None if it is not one.

    Returns:
        JSON-serialisable data.
    """
    index = tensor_index(obj)
    if index is not None:
        return {"$v": index}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if isinstance(obj, torch.layout):
        return {"$layout": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.memory_format):
        return {"$memory_format": str(obj).removeprefix("torch.")}
    if isinstance(obj, (list, tuple)):
        return [encode_template(x, tensor_index) for x in obj]
    if isinstance(obj, dict):
        return {str(k): encode_template(v, tensor_index) for k, v in obj.items()}
    raise TypeError(f"cannot record an argument of type {type(obj).__name__}: {obj!r}")


def decode_template(data: Any, inputs: Sequence[Any]) -> Any:
    """Inverse of :func:`encode_template`, substituting ``inputs`` for ``{"$v": i}``."""
    if isinstance(data, list):
        return [decode_template(x, inputs) for x in data]
    if isinstance(data, dict):
        if "$v" in data:
            return inputs[data["$v"]]
        if "$float" in data:
            return float(data["$float"])
        if "$dtype" in data:
            return getattr(torch, data["$dtype"])
        if "$device" in data:
            return torch.device(data["$device"])
        if "$layout" in data:
            return getattr(torch, data["$layout"])
        if "$memory_format" in data:
            return getattr(torch, data["$memory_format"])
        return {k: decode_template(v, inputs) for k, v in data.items()}
    return data


def template_source(data: Any, names: Sequence[str]) -> str:
    """Python source text for a decoded template, with input names substituted."""
    if isinstance(data, list):
        return "[" + ", ".join(template_source(x, names) for x in data) + "]"
    if isinstance(data, dict):
        if "$v" in data:
            return names[data["$v"]]
        if "$float" in data:
            return f"float({data['$float']!r})"
        for key in ("$dtype", "$layout", "$memory_format"):
            if key in data:
                return f"torch.{data[key]}"
        if "$device" in data:
            return f"torch.device({data['$device']!r})"
        raise ValueError(f"not a template leaf: {data}")
    return repr(data)


def resolve_target(target: str) -> Any:
    """The ``torch.ops`` overload named by ``target`` (``"aten.add.Tensor"``)."""
    obj: Any = torch.ops
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def aten_call_args(node: Any) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments of an ``aten`` node, with its input Values in place.

    Args:
        node: a node whose op is ``aten``.

    Returns:
        ``(args, kwargs)``.
    """
    args, kwargs = decode_template(json.loads(node.attrs.args), node.inputs)
    return args, kwargs


def is_inplace_target(target: str) -> bool:
    """Whether an ATen overload name (``"aten.add_.Tensor"``) mutates its input."""
    name = target.split(".")[1]
    return name.endswith("_") and not name.startswith("__")


def _aten_impl(inputs: Sequence[Any], attrs: AtenAttrs) -> Any:
    args, kwargs = decode_template(json.loads(attrs.args), inputs)
    return resolve_target(attrs.target)(*args, **kwargs)


def _aten_emit(names: list[str], attrs: AtenAttrs) -> str:
    args, kwargs = json.loads(attrs.args)
    parts = [template_source(a, names) for a in args]
    parts += [f"{k}={template_source(v, names)}" for k, v in kwargs.items()]
    return f"torch.ops.{attrs.target}({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------
# Core ops
# ----------------------------------------------------------------------------------------------
def _binary(fn: Callable[..., torch.Tensor], symbol: str) -> tuple[Callable, Callable]:
    def impl(inputs: Sequence[Any], attrs: ScalarOperandAttrs) -> torch.Tensor:
        other = inputs[1] if attrs.scalar is None else attrs.scalar
        if attrs.alpha != 1.0:
            return fn(inputs[0], other, alpha=attrs.alpha)
        return fn(inputs[0], other)

    def emit(names: list[str], attrs: ScalarOperandAttrs) -> str:
        other = names[1] if attrs.scalar is None else _float_source(attrs.scalar)
        if attrs.alpha != 1.0:
            alpha = _float_source(attrs.alpha)
            return f"torch.{fn.__name__}({names[0]}, {other}, alpha={alpha})"
        return f"{names[0]} {symbol} {other}"

    return impl, emit


def _matmul_cost(inputs: list[Type | None], outputs: list[Type], attrs: Any) -> Cost:
    a, out = inputs[0], outputs[0]
    assert isinstance(a, TensorType) and isinstance(out, TensorType)
    inner = int(a.shape[-1]) if a.is_static else 0
    moved = sum(_nbytes(t) for t in [*inputs, *outputs])
    return Cost(flops=2.0 * _numel(out) * inner, bytes=float(moved))


for _name, _fn, _sym in (
    ("add", torch.add, "+"),
    ("sub", torch.sub, "-"),
    ("mul", torch.mul, "*"),
    ("div", torch.div, "/"),
):
    _impl, _emit = _binary(_fn, _sym)
    register_op(OpDef(_name, ScalarOperandAttrs, _impl, emit=_emit))

register_op(
    OpDef(
        "param",
        ParamAttrs,
        lambda inputs, attrs: None,  # resolved by the runtime from graph.tensors
        cost=lambda i, o, a: Cost(0.0, 0.0),
    )
)
register_op(
    OpDef(
        "linear",
        NoAttrs,
        lambda inputs, attrs: F.linear(inputs[0], inputs[1], inputs[2]),
        emit=lambda n, a: f"K.linear({n[0]}, {n[1]}, {n[2]})",  # attnopt.runtime.dense
        cost=_matmul_cost,
    )
)
register_op(
    OpDef(
        "matmul",
        NoAttrs,
        lambda inputs, attrs: torch.matmul(inputs[0], inputs[1]),
        emit=lambda n, a: f"torch.matmul({n[0]}, {n[1]})",
        cost=_matmul_cost,
    )
)
register_op(
    OpDef(
        "softmax",
        DimAttrs,
        lambda inputs, attrs: torch.softmax(inputs[0], attrs.dim),
        emit=lambda n, a: f"torch.softmax({n[0]}, {a.dim})",
    )
)
register_op(
    OpDef(
        "log_softmax",
        DimAttrs,
        lambda inputs, attrs: torch.log_softmax(inputs[0], attrs.dim),
        emit=lambda n, a: f"torch.log_softmax({n[0]}, {a.dim})",
    )
)
for _name in ("exp", "tanh", "neg", "sigmoid", "sqrt", "rsqrt"):
    register_op(
        OpDef(
            _name,
            NoAttrs,
            (lambda fn: lambda inputs, attrs: fn(inputs[0]))(getattr(torch, _name)),
            emit=(lambda nm: lambda n, a: f"torch.{nm}({n[0]})")(_name),
        )
    )
register_op(
    OpDef(
        "sum",
        ReduceAttrs,
        lambda inputs, attrs: torch.sum(inputs[0], list(attrs.dims), keepdim=attrs.keepdim),
        emit=lambda n, a: f"torch.sum({n[0]}, {list(a.dims)}, keepdim={a.keepdim})",
    )
)
register_op(
    OpDef(
        "amax",
        ReduceAttrs,
        lambda inputs, attrs: torch.amax(inputs[0], list(attrs.dims), keepdim=attrs.keepdim),
        emit=lambda n, a: f"torch.amax({n[0]}, {list(a.dims)}, keepdim={a.keepdim})",
    )
)
register_op(
    OpDef(
        "transpose",
        TransposeAttrs,
        lambda inputs, attrs: inputs[0].transpose(attrs.dim0, attrs.dim1),
        emit=lambda n, a: f"{n[0]}.transpose({a.dim0}, {a.dim1})",
        cost=lambda i, o, a: Cost(0.0, 0.0),
    )
)
register_op(
    OpDef(
        "permute",
        PermuteAttrs,
        lambda inputs, attrs: inputs[0].permute(*attrs.dims),
        emit=lambda n, a: f"{n[0]}.permute({', '.join(map(str, a.dims))})",
        cost=lambda i, o, a: Cost(0.0, 0.0),
        verify=lambda node: (
            None
            if sorted(node.attrs.dims) == list(range(len(node.attrs.dims)))
            else f"permute dims {node.attrs.dims} are not a permutation"
        ),
    )
)
register_op(
    OpDef(
        "reshape",
        ShapeAttrs,
        lambda inputs, attrs: inputs[0].reshape(attrs.shape),
        emit=lambda n, a: f"{n[0]}.reshape({list(a.shape)})",
    )
)
register_op(
    OpDef(
        "expand",
        ShapeAttrs,
        lambda inputs, attrs: inputs[0].expand(attrs.shape),
        emit=lambda n, a: f"{n[0]}.expand({list(a.shape)})",
        cost=lambda i, o, a: Cost(0.0, 0.0),
    )
)
register_op(
    OpDef(
        "unsqueeze",
        DimAttrs,
        lambda inputs, attrs: inputs[0].unsqueeze(attrs.dim),
        emit=lambda n, a: f"{n[0]}.unsqueeze({a.dim})",
        cost=lambda i, o, a: Cost(0.0, 0.0),
    )
)
register_op(
    OpDef(
        "contiguous",
        NoAttrs,
        lambda inputs, attrs: inputs[0].contiguous(),
        emit=lambda n, a: f"{n[0]}.contiguous()",
    )
)
register_op(
    OpDef(
        "cast",
        CastAttrs,
        lambda inputs, attrs: inputs[0].to(attrs.dtype),
        emit=lambda n, a: f"{n[0]}.to({a.dtype})",
    )
)
register_op(
    OpDef(
        "masked_fill",
        FillAttrs,
        lambda inputs, attrs: inputs[0].masked_fill(inputs[1], attrs.value),
        emit=lambda n, a: f"{n[0]}.masked_fill({n[1]}, {_float_source(a.value)})",
    )
)
register_op(
    OpDef(
        "where",
        NoAttrs,
        lambda inputs, attrs: torch.where(inputs[0], inputs[1], inputs[2]),
        emit=lambda n, a: f"torch.where({n[0]}, {n[1]}, {n[2]})",
    )
)
register_op(
    OpDef(
        "aten",
        AtenAttrs,
        _aten_impl,
        num_outputs=lambda attrs: attrs.outputs,
        emit=_aten_emit,
    )
)


def _float_source(value: float) -> str:
    return repr(value) if math.isfinite(value) else f"float({repr(value)!r})"


def attrs_fields(attrs: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` pairs of an attribute dataclass, in declaration order."""
    return [(f.name, getattr(attrs, f.name)) for f in fields(attrs)]


__all__ = [
    "AtenAttrs",
    "CastAttrs",
    "Cost",
    "DimAttrs",
    "FillAttrs",
    "NoAttrs",
    "OpDef",
    "ParamAttrs",
    "PermuteAttrs",
    "ReduceAttrs",
    "ScalarOperandAttrs",
    "ShapeAttrs",
    "TransposeAttrs",
    "aten_call_args",
    "attrs_fields",
    "field",
    "get_op",
    "register_op",
    "registered_ops",
]
