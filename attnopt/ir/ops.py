"""The op registry: every op declares attributes, shape inference, a torch reference and a cost.

Entry points: :class:`OpDef`, :func:`register_op`, :func:`get_op`, :func:`registered_ops`,
:class:`Cost`, :class:`NoAttrs`, :func:`attrs_fields`, and :func:`static_numel` /
:func:`static_nbytes` for cost rules.

Each op's reference implementation is the semantics: the runtime's generated program calls it (or
an equivalent emitted expression), kernels are tested against it, and shape inference runs it on
meta tensors unless the op gives its own rule. The built-in ops are declared in
:mod:`attnopt.ir.core_ops` (and the ``attention`` op in :mod:`attnopt.ir.attention`); importing
:mod:`attnopt.ir` registers them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

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
        symbolic = _is_symbolic_call(input_types, attrs)
        hints = tuple(sorted(graph.meta.get("symbol_hints", {}).items())) if symbolic else ()
        try:
            key = (self.name, tuple(input_types), attrs, hints)
            cached = _INFERRED.get(key)
        except TypeError:  # unhashable attributes: infer every time
            key, cached = None, None
        if cached is not None:
            return list(cached)
        if symbolic:
            types = self._infer_symbolic(input_types, attrs, graph)
        else:
            types = self._infer_meta(input_types, attrs)
        if key is not None:
            if len(_INFERRED) >= _INFERRED_LIMIT:
                _INFERRED.clear()
            _INFERRED[key] = tuple(types)
        return types

    def _infer_meta(self, input_types: list[Type | None], attrs: Any) -> list[Type]:
        """Output types of a call with static shapes: the reference runs on meta tensors."""
        metas = [_meta(t) for t in input_types]
        with torch.no_grad():
            result = self.impl(metas, attrs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        return [_type_of_result(r) for r in results]

    def _infer_symbolic(self, input_types: list[Type | None], attrs: Any, graph: Any) -> list[Type]:
        """Output types of a call with symbolic dims: the reference runs on fake tensors."""
        shapes = symbolic_context(graph)
        fakes = [
            shapes.fake(t.shape, t.dtype) if isinstance(t, TensorType) else _meta(t)
            for t in input_types
        ]
        concrete = substitute_symbols(attrs, shapes.symint)
        result = shapes.run(self.impl, fakes, concrete)
        results = result if isinstance(result, (tuple, list)) else (result,)
        types: list[Type] = []
        for r in results:
            if isinstance(r, torch.Tensor):
                types.append(TensorType(tuple(shapes.dim_of(d) for d in r.shape), r.dtype))
            else:
                types.append(_type_of_result(r))
        return types

    def cost_of(self, input_types: list[Type | None], output_types: list[Type], attrs: Any) -> Cost:
        """The node's cost; by default one flop per output element and every byte touched."""
        if self.cost is not None:
            return self.cost(input_types, output_types, attrs)
        moved = sum(static_nbytes(t) for t in [*input_types, *output_types])
        return Cost(flops=float(sum(static_numel(t) for t in output_types)), bytes=float(moved))


#: Inferred output types by (op, input types, attributes, symbol hints): an op's reference is a
#: pure function of these, and passes re-infer unchanged nodes many times.
_INFERRED: dict[tuple, tuple[Type, ...]] = {}
_INFERRED_LIMIT = 1 << 16


def _is_symbolic_call(input_types: Sequence[Type | None], attrs: Any) -> bool:
    if any(isinstance(t, TensorType) and not t.is_static for t in input_types):
        return True
    return has_symbols(attrs)


def has_symbols(attrs: Any) -> bool:
    """Whether an op's attributes hold a symbolic size (a str dim, or ``{"$s": ...}`` in an
    ``aten`` argument template)."""
    shape = getattr(attrs, "shape", None)
    if isinstance(shape, tuple) and any(isinstance(d, str) for d in shape):
        return True
    args = getattr(attrs, "args", None)
    return isinstance(args, str) and '"$s"' in args


def substitute_symbols(attrs: Any, size_of: Callable[[Any], Any]) -> Any:
    """The attributes with every symbolic size replaced by ``size_of(dim)`` (a SymInt while
    inferring shapes, an int at run time). Attributes without symbols are returned as they are."""
    if not has_symbols(attrs):
        return attrs
    shape = getattr(attrs, "shape", None)
    if isinstance(shape, tuple):
        return _SymbolicAttrs(attrs, shape=tuple(size_of(d) for d in shape))
    return _SymbolicAttrs(attrs, symbols=size_of)


class _SymbolicAttrs:
    """Attributes seen through a substitution of their symbolic sizes (for reference impls)."""

    def __init__(self, attrs: Any, **overrides: Any):
        self._attrs, self._overrides = attrs, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._attrs, name)


def symbolic_context(graph: Any) -> Any:
    """The graph's :class:`~attnopt.ir.symbolic.SymbolicShapes` (built once from its hints)."""
    from attnopt.ir.symbolic import SymbolicShapes

    if graph is None or not graph.meta.get("symbol_hints"):
        raise ValueError("a symbolic shape needs the graph's symbol hints (graph.meta)")
    hints = graph.meta["symbol_hints"]
    cached = graph.meta.get("_symbolic_context")
    if cached is None or cached.hints != hints:
        cached = SymbolicShapes(hints)
        graph.meta["_symbolic_context"] = cached
    return cached


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


def static_numel(type_: Type | None) -> int:
    """Elements of a static tensor type (0 for scalars, absent operands, symbolic shapes)."""
    return type_.numel() if isinstance(type_, TensorType) and type_.is_static else 0


def static_nbytes(type_: Type | None) -> int:
    """Bytes of a static tensor type (0 for scalars, absent operands, symbolic shapes)."""
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


def attrs_fields(attrs: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` pairs of an attribute dataclass, in declaration order."""
    return [(f.name, getattr(attrs, f.name)) for f in fields(attrs)]


__all__ = [
    "Cost",
    "NoAttrs",
    "OpDef",
    "attrs_fields",
    "get_op",
    "register_op",
    "registered_ops",
    "static_nbytes",
    "static_numel",
]
