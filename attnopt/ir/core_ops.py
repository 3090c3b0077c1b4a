"""The catalogue of built-in ops: their attribute dataclasses and their registrations.

Entry points: the attribute dataclasses (:class:`ParamAttrs`, :class:`ScalarOperandAttrs`,
:class:`DimAttrs`, :class:`ReduceAttrs`, :class:`TransposeAttrs`, :class:`PermuteAttrs`,
:class:`ShapeAttrs`, :class:`CastAttrs`, :class:`FillAttrs`, :class:`AtenAttrs`). Importing this
module registers, in :mod:`attnopt.ir.ops`, the ops ``add sub mul div param linear matmul
softmax log_softmax exp tanh neg sigmoid sqrt rsqrt sum amax transpose permute reshape expand
unsqueeze contiguous cast masked_fill where aten``; :mod:`attnopt.ir` imports it, so they are
registered whenever the IR is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnopt.ir.aten_args import decode_template, resolve_target, template_source
from attnopt.ir.ops import Cost, NoAttrs, OpDef, register_op, static_nbytes, static_numel
from attnopt.ir.symbolic import dim_source
from attnopt.ir.types import TensorType, Type


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
    """``reshape`` / ``expand``: the target shape (-1 allowed once for reshape); a symbolic
    entry (a str dim such as ``"s1"``) is bound from the inputs' shapes at run time."""

    shape: tuple[int | str, ...] = ()


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


def _shape_source(shape: Sequence[int | str]) -> str:
    """Python source of a shape attribute: ints as they are, symbolic dims computed at run time."""
    return "[" + ", ".join(dim_source(d) for d in shape) + "]"


def _aten_impl(inputs: Sequence[Any], attrs: AtenAttrs) -> Any:
    # ``symbols`` is set when the attributes are seen through substitute_symbols.
    symbols = getattr(attrs, "symbols", None)
    args, kwargs = decode_template(json.loads(attrs.args), inputs, symbols)
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
    moved = sum(static_nbytes(t) for t in [*inputs, *outputs])
    return Cost(flops=2.0 * static_numel(out) * inner, bytes=float(moved))


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
        emit=lambda n, a: f"{n[0]}.reshape({_shape_source(a.shape)})",
    )
)
register_op(
    OpDef(
        "expand",
        ShapeAttrs,
        lambda inputs, attrs: inputs[0].expand(attrs.shape),
        emit=lambda n, a: f"{n[0]}.expand({_shape_source(a.shape)})",
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


__all__ = [
    "AtenAttrs",
    "CastAttrs",
    "DimAttrs",
    "FillAttrs",
    "ParamAttrs",
    "PermuteAttrs",
    "ReduceAttrs",
    "ScalarOperandAttrs",
    "ShapeAttrs",
    "TransposeAttrs",
]
