"""Symbolic dimensions: named sizes (``s0``, ``s1``, ``s0*s1``) that a graph keeps until run time.

Entry points: :func:`canonical_dim`, :func:`dim_symbols`,
:func:`evaluate_dim`, :func:`dim_source`, :class:`SymbolicShapes` (shape inference over symbolic
dims), :class:`SymbolRef` (a symbolic size inside an op's arguments), :func:`bind_symbols`.

A dim of a :class:`~attnopt.ir.types.TensorType` is an int or a str: a polynomial (or ``Min`` /
``Max`` / ``floor`` expression) over symbol names, as torch.export names them. Its canonical text
is sympy's, so two dims are the same size exactly when their texts are equal. Symbols are bound at
run time from the graph inputs' shapes (a plain symbol in an input's type binds to that dim).

Shape inference over symbolic dims uses torch's own machinery: each symbol becomes a ``SymInt`` of
a private ``ShapeEnv`` (hinted with an example value, so data-independent guards follow the
example's path), the op's reference runs on fake tensors, and the output sizes are read back as
expressions over the same names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch

__all__ = [
    "SymbolRef",
    "SymbolicShapes",
    "bind_symbols",
    "canonical_dim",
    "dim_expr",
    "dim_source",
    "dim_symbols",
    "evaluate_dim",
]

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FUNCTIONS = {"Min": sympy.Min, "Max": sympy.Max, "floor": sympy.floor}
#: Function names in torch's size expressions that are not symbols.
_NOT_SYMBOLS = {*_FUNCTIONS, "FloorDiv"}


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> sympy.Expr:
    names = {name for name in _SYMBOL.findall(expr) if name not in _NOT_SYMBOLS}
    local = {name: sympy.Symbol(name, integer=True, positive=True) for name in names}
    local.update(_FUNCTIONS)
    return sympy.sympify(expr, locals=local)


def canonical_dim(dim: int | str | sympy.Expr) -> int | str:
    """The canonical form of a dim: an int when it is constant, else sympy's text of it.

    Args:
        dim: an int, an expression text or a sympy expression.

    Returns:
        An int, or the canonical expression text (``"s0*s1"``).
    """
    if isinstance(dim, bool):
        raise TypeError("a dim cannot be a bool")
    if isinstance(dim, int):
        return dim
    expr = _parse(dim) if isinstance(dim, str) else sympy.sympify(dim)
    if expr.is_Integer:
        return int(expr)
    if not expr.free_symbols:
        raise ValueError(f"dim {dim!r} is not an integer")
    return str(expr)


def dim_expr(dim: int | str) -> sympy.Expr:
    """A dim as a sympy expression (symbols are positive integers), for comparing dims."""
    return sympy.Integer(dim) if isinstance(dim, int) else _parse(dim)


def dim_symbols(dim: int | str) -> frozenset[str]:
    """The symbol names a dim depends on (empty for an int)."""
    if isinstance(dim, int):
        return frozenset()
    return frozenset(str(s) for s in _parse(dim).free_symbols)


def evaluate_dim(dim: int | str, env: Mapping[str, int]) -> int:
    """The value of a dim for bound symbols.

    Args:
        dim: an int or an expression text.
        env: symbol name -> value.

    Returns:
        The int value.

    Raises:
        KeyError: a symbol of ``dim`` is not bound.
    """
    if isinstance(dim, int):
        return dim
    expr = _parse(dim)
    values = {s: env[str(s)] for s in expr.free_symbols}
    return int(expr.subs(values))


def dim_source(dim: int | str, prefix: str = "sym_") -> str:
    """Python source computing a dim from variables named ``prefix + symbol`` (codegen).

    Args:
        dim: an int or an expression text.
        prefix: prefix of the variables holding the bound symbols.

    Returns:
        A Python expression.
    """
    if isinstance(dim, int):
        return str(dim)
    expr = _parse(dim)
    renamed = expr.subs({s: sympy.Symbol(prefix + str(s), integer=True) for s in expr.free_symbols})
    return sympy.pycode(renamed, fully_qualified_modules=False).replace("math.", "")


@dataclass(frozen=True)
class SymbolRef:
    """A symbolic size used as an op argument (an ``aten`` template leaf, ``{"$s": expr}``)."""

    expr: str


def bind_symbols(types: Sequence[Any], tensors: Sequence[Any]) -> dict[str, int]:
    """Bind the symbols of graph input types to the sizes of the tensors passed for them.

    Args:
        types: the graph inputs' types (TensorType or other).
        tensors: the run-time values, in the same order.

    Returns:
        Symbol name -> value.

    Raises:
        ValueError: a rank, a static size or a derived size does not fit, or a symbol appears
            only inside expressions (it cannot be bound from the inputs).
    """
    env: dict[str, int] = {}
    derived: list[tuple[int, int, str, int]] = []
    for position, (type_, tensor) in enumerate(zip(types, tensors)):
        shape = getattr(type_, "shape", None)
        if shape is None or not isinstance(tensor, torch.Tensor):
            continue
        if tensor.dim() != len(shape):
            raise ValueError(f"input {position} has rank {tensor.dim()}, the graph {len(shape)}")
        for axis, (dim, size) in enumerate(zip(shape, tensor.shape)):
            if isinstance(dim, int):
                if dim != size:
                    raise ValueError(f"input {position} dim {axis} is {size}, the graph {dim}")
            elif _SYMBOL.fullmatch(dim):
                if env.setdefault(dim, int(size)) != size:
                    raise ValueError(
                        f"input {position} dim {axis} is {size}, but {dim} is {env[dim]} "
                        "from an earlier input"
                    )
            else:
                derived.append((position, axis, dim, int(size)))
    for position, axis, dim, size in derived:
        try:
            value = evaluate_dim(dim, env)
        except KeyError:
            raise ValueError(f"input {position} dim {axis} ({dim}) cannot be bound") from None
        if value != size:
            raise ValueError(f"input {position} dim {axis} is {size}, but {dim} = {value}")
    return env


class SymbolicShapes:
    """Shape inference over symbolic dims: ops run on fake tensors whose sizes are ``SymInt``.

    Args:
        hints: symbol name -> an example value (guards taken during inference follow it).
    """

    def __init__(self, hints: Mapping[str, int]):
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        self.hints = dict(hints)
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self._to_env: dict[str, sympy.Expr] = {}
        self._from_env: dict[sympy.Symbol, sympy.Symbol] = {}
        for name, hint in sorted(self.hints.items()):
            symbol = self.shape_env.create_symbol(
                int(hint),
                ConstantSource(f"attnopt_{name}"),
                dynamic_dim=DimDynamic.DYNAMIC,
                do_not_specialize_zero_one=True,
            )
            self._to_env[name] = symbol
            self._from_env[symbol] = sympy.Symbol(name, integer=True, positive=True)

    def symint(self, dim: int | str) -> Any:
        """A SymInt (or int) of this context for a dim."""
        if isinstance(dim, int):
            return dim
        expr = _parse(dim)
        missing = {str(s) for s in expr.free_symbols} - set(self._to_env)
        if missing:
            raise ValueError(f"symbols {sorted(missing)} have no example value")
        inner = expr.subs({s: self._to_env[str(s)] for s in expr.free_symbols})
        hint = evaluate_dim(dim, self.hints)
        return self.shape_env.create_symintnode(inner, hint=hint)

    def dim_of(self, size: Any) -> int | str:
        """The canonical dim of a size a fake op produced (an int or a SymInt)."""
        if isinstance(size, int):
            return size
        expr = size.node.expr
        expr = self.shape_env.replace(expr) if hasattr(self.shape_env, "replace") else expr
        return canonical_dim(expr.subs(self._from_env))

    def fake(self, shape: Sequence[int | str], dtype: torch.dtype) -> torch.Tensor:
        """A fake tensor of this shape (symbolic dims as SymInts)."""
        sizes = [self.symint(d) for d in shape]
        with self.mode:
            return torch.empty(sizes, dtype=dtype, device="meta")

    def run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` under this context's fake mode (sizes reasoned about as capture
        did: without specialising on 0 and 1)."""
        from torch.fx.experimental import _config

        with self.mode, torch.no_grad(), _config.patch(backed_size_oblivious=True):
            return fn(*args)
