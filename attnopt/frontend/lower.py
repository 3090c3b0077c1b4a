"""Lower an ATen-level ``torch.fx`` graph (from torch.export) into the IR.

Entry point: :func:`lower_exported_program`.

Common ops become core IR ops with typed attributes; eval-mode dropout, aliases and metadata
asserts disappear; every other op becomes an opaque ``aten`` node that runs through its ATen
implementation, so an unfamiliar op never stops a capture.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from attnopt.errors import CaptureError
from attnopt.ir import Graph, ScalarType, TensorType, Value
from attnopt.ir.aten_args import encode_template
from attnopt.ir.core_ops import (
    AtenAttrs,
    CastAttrs,
    DimAttrs,
    FillAttrs,
    ParamAttrs,
    PermuteAttrs,
    ReduceAttrs,
    ScalarOperandAttrs,
    ShapeAttrs,
    TransposeAttrs,
)
from attnopt.ir.ops import NoAttrs
from attnopt.ir.symbolic import SymbolRef, canonical_dim

aten = torch.ops.aten

# Ops that compute nothing in an inference graph: their output is their first input.
_IDENTITY = {
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.detach_.default,
}
# Ops with no output that only check metadata at trace time.
_DROPPED = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}


def _type_of(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return TensorType.of(val)
    if isinstance(val, (bool, torch.SymBool)):
        return ScalarType("bool")
    if isinstance(val, (int, torch.SymInt)):
        return ScalarType("int")
    if isinstance(val, (float, torch.SymFloat)):
        return ScalarType("float")
    raise TypeError(f"unsupported value {type(val).__name__}")


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.") or None


class _Lowering:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.env: dict[torch.fx.Node, Any] = {}

    def value(self, arg: Any) -> Any:
        return self.env[arg] if isinstance(arg, torch.fx.Node) else arg

    def emit(self, op: str, inputs: list[Value | None], attrs: Any, fx_node: torch.fx.Node) -> Any:
        val = fx_node.meta.get("val")
        types = [_type_of(val)]
        node = self.graph.make_node(op, inputs, attrs, types=types, names=[fx_node.name])
        self._annotate(node, fx_node)
        self.graph.append(node)
        return node.output

    def _annotate(self, node: Any, fx_node: torch.fx.Node) -> None:
        path = _module_path(fx_node)
        if path:
            node.meta["module"] = path
        node.meta["source"] = fx_node.name

    def opaque(self, fx_node: torch.fx.Node) -> Any:
        inputs: list[Value] = []
        positions: dict[int, int] = {}

        def tensor_index(obj: Any) -> int | None:
            if isinstance(obj, torch.fx.Node):
                value = self.env[obj]
                if not isinstance(value, Value):
                    return None
                if id(value) not in positions:
                    positions[id(value)] = len(inputs)
                    inputs.append(value)
                return positions[id(value)]
            return None

        def resolve(obj: Any) -> Any:
            # Nodes lowered to Python values (symbolic sizes: SymbolRef) are substituted by value.
            if isinstance(obj, torch.fx.Node) and not isinstance(self.env[obj], Value):
                return self.env[obj]
            return obj

        args = torch.fx.node.map_aggregate(fx_node.args, resolve)
        kwargs = torch.fx.node.map_aggregate(fx_node.kwargs, resolve)
        target = fx_node.target
        name = f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
        try:
            template = json.dumps(encode_template([list(args), dict(kwargs)], tensor_index))
        except TypeError as err:
            raise CaptureError(
                f"op {name} (from {_module_path(fx_node) or 'the model'}) has an argument "
                f"attnopt cannot record: {err}"
            ) from None
        val = fx_node.meta.get("val")
        if val is None:
            results: list[Any] = []
        elif isinstance(val, (tuple, list)):
            results = list(val)
        else:
            results = [val]
        multi = isinstance(val, (tuple, list))
        types = [_type_of(v) for v in results]
        names = [fx_node.name] * len(types)
        attrs = AtenAttrs(target=name, args=template, outputs=len(types))
        node = self.graph.make_node("aten", inputs, attrs, types=types, names=names)
        node.meta["multi"] = multi
        self._annotate(node, fx_node)
        self.graph.append(node)
        if multi:
            return list(node.outputs)
        return node.outputs[0] if node.outputs else None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _binary(op: str) -> Callable[[_Lowering, torch.fx.Node], Any]:
    def lower(lw: _Lowering, n: torch.fx.Node) -> Any:
        a, b = lw.value(n.args[0]), lw.value(n.args[1])
        alpha = float(n.kwargs.get("alpha", 1))
        if n.kwargs.keys() - {"alpha"} or not isinstance(a, Value):
            return lw.opaque(n)
        if isinstance(b, Value):
            return lw.emit(op, [a, b], ScalarOperandAttrs(alpha=alpha), n)
        if _is_number(b) and alpha == 1.0:
            # Integer scalars stay ints in the result dtype rules: keep them opaque.
            if isinstance(b, int) and not a.dtype.is_floating_point:
                return lw.opaque(n)
            return lw.emit(op, [a], ScalarOperandAttrs(scalar=float(b)), n)
        return lw.opaque(n)

    return lower


def _lower_softmax(op: str) -> Callable[[_Lowering, torch.fx.Node], Any]:
    def lower(lw: _Lowering, n: torch.fx.Node) -> Any:
        x = lw.value(n.args[0])
        dim = int(n.args[1])
        if n.target in (aten._softmax.default, aten._log_softmax.default):
            dtype = torch.float32 if n.args[2] else None
        else:
            dtype = n.args[2] if len(n.args) > 2 else n.kwargs.get("dtype")
        if not isinstance(x, Value):
            return lw.opaque(n)
        if dtype is not None and dtype != x.dtype:
            # softmax(x, dtype=d) is softmax(x.to(d)): make the cast explicit.
            cast = lw.graph.make_node("cast", [x], CastAttrs(dtype=dtype), names=[f"{n.name}_in"])
            lw._annotate(cast, n)
            lw.graph.append(cast)
            x = cast.output
        return lw.emit(op, [x], DimAttrs(dim=dim), n)

    return lower


def _lower_cast(lw: _Lowering, n: torch.fx.Node) -> Any:
    x = lw.value(n.args[0])
    val = n.meta.get("val")
    if not isinstance(x, Value) or not isinstance(val, torch.Tensor):
        return lw.opaque(n)
    allowed = {"dtype", "layout", "device", "non_blocking", "copy", "memory_format"}
    if n.kwargs.keys() - allowed or n.kwargs.get("copy") or n.kwargs.get("memory_format"):
        return lw.opaque(n)
    source = n.args[0].meta.get("val")
    if not isinstance(source, torch.Tensor) or source.device != val.device:
        return lw.opaque(n)
    if val.layout != torch.strided:
        return lw.opaque(n)
    return lw.emit("cast", [x], CastAttrs(dtype=val.dtype), n)


def _type_as(lw: _Lowering, n: torch.fx.Node) -> Any:
    x, other = lw.value(n.args[0]), lw.value(n.args[1])
    if not isinstance(x, Value) or not isinstance(other, Value):
        return lw.opaque(n)
    return lw.emit("cast", [x], CastAttrs(dtype=other.dtype), n)


def _lower_simple(op: str, make_attrs: Callable[[torch.fx.Node], Any], arity: int = 1):
    def lower(lw: _Lowering, n: torch.fx.Node) -> Any:
        inputs = [lw.value(a) for a in n.args[:arity]]
        if not all(isinstance(v, Value) or v is None for v in inputs):
            return lw.opaque(n)
        try:
            attrs = make_attrs(n)
        except (TypeError, ValueError):
            return lw.opaque(n)
        if attrs is None:
            return lw.opaque(n)
        return lw.emit(op, inputs, attrs, n)

    return lower


def _ints(x: Any) -> tuple[int, ...]:
    if not all(isinstance(v, int) for v in x):
        raise TypeError("symbolic size")
    return tuple(int(v) for v in x)


def _sizes(x: Any) -> tuple[int | str, ...]:
    """A shape argument: ints, and symbolic sizes (fx nodes or SymInts) as expression texts."""
    sizes: list[int | str] = []
    for item in x:
        if isinstance(item, torch.fx.Node):
            item = item.meta.get("val")
        if isinstance(item, bool):
            raise TypeError("a bool is not a size")
        if isinstance(item, int):
            sizes.append(int(item))
        elif isinstance(item, torch.SymInt):
            sizes.append(canonical_dim(item.node.expr))
        else:
            raise TypeError(f"size {item!r} is neither an int nor a symbolic int")
    return tuple(sizes)


def _clone(lw: _Lowering, n: torch.fx.Node) -> Any:
    # In a functional graph a copy is only needed for its layout: contiguous() when asked for.
    x = lw.value(n.args[0])
    memory_format = n.kwargs.get("memory_format")
    if not isinstance(x, Value):
        return lw.opaque(n)
    if memory_format in (None, torch.preserve_format):
        return x
    if memory_format == torch.contiguous_format:
        return lw.emit("contiguous", [x], NoAttrs(), n)
    return lw.opaque(n)


def _linear(lw: _Lowering, n: torch.fx.Node) -> Any:
    args = [lw.value(a) for a in n.args]
    while len(args) < 3:
        args.append(None)
    return lw.emit("linear", args[:3], NoAttrs(), n)


def _dropout(lw: _Lowering, n: torch.fx.Node) -> Any:
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    if not train or p == 0:
        return lw.value(n.args[0])
    return lw.opaque(n)


def _sum(n: torch.fx.Node) -> ReduceAttrs | None:
    if n.kwargs.get("dtype") is not None or len(n.args) > 3 or len(n.args) < 2:
        return None
    keepdim = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
    if n.args[1] is None:
        return None
    return ReduceAttrs(dims=_ints(n.args[1]), keepdim=keepdim)


def _masked_fill(n: torch.fx.Node) -> FillAttrs | None:
    value = n.args[2]
    return FillAttrs(value=float(value)) if _is_number(value) else None


_LOWERINGS: dict[Any, Callable[[_Lowering, torch.fx.Node], Any]] = {
    aten.linear.default: _linear,
    aten.matmul.default: _lower_simple("matmul", lambda n: NoAttrs(), 2),
    aten.bmm.default: _lower_simple("matmul", lambda n: NoAttrs(), 2),
    aten.mm.default: _lower_simple("matmul", lambda n: NoAttrs(), 2),
    aten.add.Tensor: _binary("add"),
    aten.sub.Tensor: _binary("sub"),
    aten.mul.Tensor: _binary("mul"),
    aten.div.Tensor: _binary("div"),
    aten.softmax.int: _lower_softmax("softmax"),
    aten._softmax.default: _lower_softmax("softmax"),
    aten.log_softmax.int: _lower_softmax("log_softmax"),
    aten._log_softmax.default: _lower_softmax("log_softmax"),
    aten.exp.default: _lower_simple("exp", lambda n: NoAttrs()),
    aten.tanh.default: _lower_simple("tanh", lambda n: NoAttrs()),
    aten.neg.default: _lower_simple("neg", lambda n: NoAttrs()),
    aten.sigmoid.default: _lower_simple("sigmoid", lambda n: NoAttrs()),
    aten.sqrt.default: _lower_simple("sqrt", lambda n: NoAttrs()),
    aten.rsqrt.default: _lower_simple("rsqrt", lambda n: NoAttrs()),
    aten.sum.dim_IntList: _lower_simple("sum", _sum),
    aten.amax.default: _lower_simple(
        "amax",
        lambda n: (
            ReduceAttrs(
                dims=_ints(n.args[1]) if len(n.args) > 1 else (),
                keepdim=bool(n.args[2]) if len(n.args) > 2 else False,
            )
            if len(n.args) > 1 and n.args[1]
            else None
        ),
    ),
    aten.transpose.int: _lower_simple(
        "transpose", lambda n: TransposeAttrs(dim0=int(n.args[1]), dim1=int(n.args[2]))
    ),
    aten.permute.default: _lower_simple("permute", lambda n: PermuteAttrs(dims=_ints(n.args[1]))),
    aten.view.default: _lower_simple("reshape", lambda n: ShapeAttrs(shape=_sizes(n.args[1]))),
    aten.reshape.default: _lower_simple("reshape", lambda n: ShapeAttrs(shape=_sizes(n.args[1]))),
    aten._unsafe_view.default: _lower_simple(
        "reshape", lambda n: ShapeAttrs(shape=_sizes(n.args[1]))
    ),
    aten.expand.default: _lower_simple(
        "expand",
        lambda n: (
            ShapeAttrs(shape=_sizes(n.args[1]))
            if not n.kwargs.get("implicit") and len(n.args) == 2
            else None
        ),
    ),
    aten.unsqueeze.default: _lower_simple("unsqueeze", lambda n: DimAttrs(dim=int(n.args[1]))),
    aten.contiguous.default: _lower_simple(
        "contiguous", lambda n: NoAttrs() if not n.kwargs.get("memory_format") else None
    ),
    aten.to.dtype: _lower_cast,
    aten.to.dtype_layout: _lower_cast,
    aten.to.device: _lower_cast,
    aten._to_copy.default: _lower_cast,
    aten.type_as.default: _type_as,
    aten.masked_fill.Scalar: _lower_simple("masked_fill", _masked_fill, 2),
    aten.where.self: _lower_simple("where", lambda n: NoAttrs(), 3),
    aten.dropout.default: _dropout,
    aten.clone.default: _clone,
}


def lower_exported_program(ep: ExportedProgram, *, model_name: str = "model") -> Graph:
    """Lower an exported program into an IR graph.

    Args:
        ep: the program from ``torch.export.export``.
        model_name: used in error messages.

    Returns:
        The graph: inputs are the user tensor inputs in flattened order; ``graph.tensors`` holds
        parameters, buffers and constants by their state-dict names.

    Raises:
        CaptureError: when the program has inputs or nodes attnopt cannot represent.
    """
    graph = Graph()
    lw = _Lowering(graph)
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    input_tensors = {**ep.state_dict, **ep.constants}
    graph.meta["user_inputs"] = []
    graph.meta["parameters"] = sorted(
        spec.target for spec in ep.graph_signature.input_specs if spec.kind == InputKind.PARAMETER
    )
    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            spec = specs[fx_node.name]
            if spec.kind == InputKind.USER_INPUT:
                val = fx_node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    lw.env[fx_node] = graph.add_input(fx_node.name, TensorType.of(val))
                    graph.meta["user_inputs"].append(fx_node.name)
                else:
                    lw.env[fx_node] = val
                continue
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                tensor = input_tensors[spec.target]
                if not isinstance(tensor, torch.Tensor):
                    raise CaptureError(f"{model_name}: constant {spec.target} is not a tensor")
                graph.tensors[spec.target] = tensor
                node = graph.make_node(
                    "param",
                    [],
                    ParamAttrs(name=spec.target),
                    types=[TensorType.of(tensor)],
                    names=[fx_node.name],
                )
                graph.append(node)
                lw.env[fx_node] = node.output
                continue
            raise CaptureError(
                f"{model_name}: input {fx_node.name} is a {spec.kind.name}, which attnopt does not "
                "support (try capturing the module without script objects or token inputs)"
            )
        if fx_node.op == "call_function":
            lw.env[fx_node] = _lower_call(lw, fx_node)
            continue
        if fx_node.op == "output":
            flat = torch.fx.node.map_aggregate(fx_node.args[0], lw.value)
            outputs = list(flat) if isinstance(flat, (list, tuple)) else [flat]
            for value in outputs:
                if value is not None and not isinstance(value, Value):
                    raise CaptureError(
                        f"{model_name}: an output is the constant {value!r}; attnopt returns "
                        "tensors only"
                    )
                graph.outputs.append(value)
            continue
        raise CaptureError(f"{model_name}: unexpected fx node {fx_node.op} {fx_node.target}")
    hints = symbol_hints(ep)
    if hints:
        graph.meta["symbol_hints"] = hints
    graph.dead_code_elimination()
    return graph


def symbol_hints(ep: ExportedProgram) -> dict[str, int]:
    """The example value of every symbolic size of the user inputs (symbol name -> int).

    Args:
        ep: an exported program (with dynamic shapes, or without: then empty).

    Returns:
        The hints, by symbol name.
    """
    hints: dict[str, int] = {}
    for fx_node in ep.graph.nodes:
        if fx_node.op != "placeholder":
            continue
        val = fx_node.meta.get("val")
        for size in getattr(val, "shape", ()):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                hints[str(size.node.expr)] = int(size.node.hint)
    return hints


def _lower_call(lw: _Lowering, fx_node: torch.fx.Node) -> Any:
    target = fx_node.target
    val = fx_node.meta.get("val")
    if isinstance(val, torch.SymInt):
        # A size computed from input shapes (sym_size, products of sizes): the graph carries it
        # as a symbolic dim where it is used, bound from the inputs at run time.
        return SymbolRef(str(canonical_dim(val.node.expr)))
    if isinstance(val, (torch.SymBool, torch.SymFloat)) and target not in _DROPPED:
        return None  # shape guards and their asserts: the symbols' ranges are checked on entry
    if target is operator.getitem:
        container = lw.value(fx_node.args[0])
        return container[fx_node.args[1]]
    if target in _DROPPED:
        return None
    if target in _IDENTITY:
        return lw.value(fx_node.args[0])
    if not isinstance(target, torch._ops.OpOverload):
        raise CaptureError(
            f"call to {getattr(target, '__name__', target)} (in "
            f"{_module_path(fx_node) or 'the model'}) is not an ATen op; attnopt captures ATen "
            "graphs from torch.export"
        )
    lowering = _LOWERINGS.get(target)
    if lowering is not None:
        return lowering(lw, fx_node)
    return lw.opaque(fx_node)
