"""Mask analysis: prove what an attention mask is from the subgraph that builds it.

Entry points: :func:`analyse_masks`, :class:`MaskAnalysis`.

A mask (bool, True = may attend, or additive float) reaches an attention site as a graph value.
Models build it in many ways: a constant causal triangle, ``arange`` comparisons (transformers'
mask functions, with or without ``vmap``), an ``index`` of the user's ``attention_mask`` by batch
and key positions, ``where(keep, 0, min)`` or ``(1 - mask) * min`` to make it additive,
``tril``/``triu`` of ones, conjunctions of all of these. The analysis splits the mask into
conjuncts (through ``&``, ``~(a | b)``, additive sums, also summed over merged batch and heads as
``nn.MultiheadAttention`` does, ``masked_fill`` and ``where`` with a very negative fill; zeros
made by ``zeros``/``zeros_like`` are no mask), interprets each one symbolically as a function of
the score indices ``(b, h, q, k)`` and classifies it:

* **always true** (``q >= 0``, a constant of ones): dropped;
* **causal** (``k <= q + (Sk - Sq)``, bottom-right aligned) and a **causal window**
  (``k >= q - w``): the ``causal`` attribute and the exact ``sliding_window`` variant;
* **key mask** (depends on the batch and key index only): the ``[B, 1, 1, Sk]`` mask every
  kernel skips keys with; it is **key padding** when it reads, for each sequence, which of its
  own tokens are real (``attention_mask[b, k]``, ``ids[b, k] != pad``, ``k < lengths[b]``, from
  integer or bool graph inputs at the same batch row), the condition padding removal needs; a key
  mask from activations, from another row (``mask.flip(0)``, ``lengths[order]``) or of fixed
  positions is not padding;
* **documents** (``seg[b, q] == seg[b, k]`` for one ``[B, S]`` integer tensor): segment ids,
  an operand of the op (kernels skip the blocks between documents);
* anything else: a **remainder** that stays a mask. A mask whose structure cannot be proven is
  never guessed at.

Every index the analysis reasons about comes from ``arange`` (or a constant equal to one), so the
proofs hold for symbolic lengths too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from attnopt.ir import Graph, Node, Value, aten_call_args
from attnopt.ir.attention_reference import visible_keys_mask
from attnopt.ir.symbolic import SymbolRef, dim_expr
from attnopt.ir.types import Dim
from attnopt.passes.helpers import constant_tensor

__all__ = ["MaskAnalysis", "analyse_masks", "causal_window", "is_mask_fill"]


# ----------------------------------------------------------------------------------------------
# Symbolic expressions over the local dims of a tensor
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Truth:
    value: bool


@dataclass(frozen=True)
class _Lin:
    """``sum(coeff * index(dim)) + const`` (integer)."""

    coeffs: tuple[tuple[int, int], ...]  # (local dim, coefficient), sorted, no zeros
    const: Any  # sympy integer expression

    def plus(self, other: _Lin, sign: int = 1) -> _Lin:
        merged: dict[int, int] = dict(self.coeffs)
        for dim, c in other.coeffs:
            merged[dim] = merged.get(dim, 0) + sign * c
        return _Lin(
            tuple(sorted((d, c) for d, c in merged.items() if c)),
            sympy.expand(self.const + sign * other.const),
        )

    def scaled(self, factor: int) -> _Lin:
        return _Lin(
            tuple((d, c * factor) for d, c in self.coeffs), sympy.expand(self.const * factor)
        )


@dataclass(frozen=True)
class _Cmp:
    """``lin <= 0`` (``op="le"``), ``lin == 0`` (``"eq"``) or ``lin != 0`` (``"ne"``)."""

    op: str
    lin: _Lin


@dataclass(frozen=True)
class _Data:
    """Elements of a graph tensor ``value`` at local dims ``dims`` (one per dim of ``value``;
    None for a size-1 dim). ``truthy``: read as ``value != 0``."""

    value: Value
    dims: tuple[int | None, ...]
    truthy: bool = False


@dataclass(frozen=True)
class _Same:
    """``a == b`` (or ``!=`` when ``negated``) for two data reads."""

    a: _Data
    b: _Data
    negated: bool = False


@dataclass(frozen=True)
class _Order:
    """``lhs <op> rhs`` (``op`` in le, lt, eq, ne) where a side reads data: ``k < lengths[b]``,
    ``ids[b, k] != pad``. Nothing is proven about it beyond the dims it depends on and the values
    it reads (what key padding needs)."""

    op: str
    lhs: Any  # _Lin or _Data
    rhs: Any


@dataclass(frozen=True)
class _Bool:
    """``and`` / ``or`` of terms, or ``not`` of one."""

    op: str
    terms: tuple[Any, ...]


def _shift(expr: Any, remap: Any) -> Any:
    """``expr`` with every local dim ``d`` renamed ``remap(d)``."""
    if isinstance(expr, _Lin):
        return _Lin(tuple(sorted((remap(d), c) for d, c in expr.coeffs)), expr.const)
    if isinstance(expr, _Cmp):
        return _Cmp(expr.op, _shift(expr.lin, remap))
    if isinstance(expr, _Data):
        return _Data(
            expr.value, tuple(None if d is None else remap(d) for d in expr.dims), expr.truthy
        )
    if isinstance(expr, _Same):
        return _Same(_shift(expr.a, remap), _shift(expr.b, remap), expr.negated)
    if isinstance(expr, _Order):
        return _Order(expr.op, _shift(expr.lhs, remap), _shift(expr.rhs, remap))
    if isinstance(expr, _Bool):
        return _Bool(expr.op, tuple(_shift(t, remap) for t in expr.terms))
    return expr


def _dims_of(expr: Any) -> set[int]:
    if isinstance(expr, _Lin):
        return {d for d, _ in expr.coeffs}
    if isinstance(expr, _Cmp):
        return _dims_of(expr.lin)
    if isinstance(expr, _Data):
        return {d for d in expr.dims if d is not None}
    if isinstance(expr, _Same):
        return _dims_of(expr.a) | _dims_of(expr.b)
    if isinstance(expr, _Order):
        return _dims_of(expr.lhs) | _dims_of(expr.rhs)
    if isinstance(expr, _Bool):
        return set().union(*(_dims_of(t) for t in expr.terms)) if expr.terms else set()
    return set()


_CMP_TARGETS = {
    "le": "le",
    "lt": "lt",
    "ge": "ge",
    "gt": "gt",
    "eq": "eq",
    "ne": "ne",
}
_AND = {"aten.__and__.Tensor", "aten.logical_and.default", "aten.bitwise_and.Tensor"}
_OR = {"aten.__or__.Tensor", "aten.logical_or.default", "aten.bitwise_or.Tensor"}
_NOT = {"aten.logical_not.default", "aten.bitwise_not.default"}


def _identity_dims(value: Value) -> tuple[int | None, ...]:
    return tuple(None if s == 1 else i for i, s in enumerate(value.shape))


class _Interpreter:
    """Bottom-up symbolic meaning of integer and bool values (memoised per graph)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.memo: dict[int, Any] = {}

    def expr(self, value: Value) -> Any:
        key = id(value)
        if key not in self.memo:
            try:
                self.memo[key] = self._expr(value)
            except (TypeError, ValueError, IndexError, KeyError, AttributeError):
                self.memo[key] = _Data(value, _identity_dims(value))
        return self.memo[key]

    def additive_keep(self, value: Value) -> Any:
        """The keep rule of an additive mask that is 0 where kept and a mask fill elsewhere
        (``masked_fill(0, cond, fill)``, ``where(cond, 0, fill)``, seen through casts and views),
        as a bool expression over ``value``'s dims; None when it is not of that form."""
        node = value.producer
        if node is None or not value.dtype.is_floating_point:
            return None
        source = node.inputs[0] if node.inputs else None
        if node.op in ("contiguous", "cast", "unsqueeze", "expand", "reshape"):
            if source is None or not source.dtype.is_floating_point:
                return None
            inner = self.additive_keep(source)
            if inner is None:
                return None
            if node.op == "unsqueeze":
                dim = node.attrs.dim % value.tensor_type.rank
                return _shift(inner, lambda d: d + 1 if d >= dim else d)
            if node.op == "expand":
                return self._broadcast(source, value, inner)
            if node.op == "reshape":
                return self._reshape(source, value, inner)
            return inner
        fill = _fill_form(self.graph, node)
        if fill is None or not is_mask_fill(fill[2], value.dtype):
            return None
        cond, masked_when, _ = fill
        if cond.tensor_type.rank > value.tensor_type.rank:
            return None
        keep = self._as_bool(self._operand(cond, value), cond)
        return _negate(keep) if masked_when else keep

    def _opaque(self, value: Value) -> _Data:
        return _Data(value, _identity_dims(value), value.dtype == torch.bool)

    def _expr(self, value: Value) -> Any:
        node = value.producer
        if node is None or value.dtype.is_floating_point or value.dtype.is_complex:
            return self._opaque(value)
        constant = constant_tensor(self.graph, value)
        if constant is not None:
            return self._constant(value, constant)
        op = node.op
        if op == "unsqueeze":
            inner = self.expr(node.inputs[0])  # type: ignore[arg-type]
            rank = node.output.tensor_type.rank
            dim = node.attrs.dim % rank
            return _shift(inner, lambda d: d + 1 if d >= dim else d)
        if op in ("expand", "reshape"):
            view = self._broadcast if op == "expand" else self._reshape
            inner = self.expr(node.inputs[0])  # type: ignore[arg-type]
            found = view(node.inputs[0], value, inner)  # type: ignore[arg-type]
            return self._opaque(value) if found is None else found
        if op == "cast":
            inner = self.expr(node.inputs[0])  # type: ignore[arg-type]
            if value.dtype == torch.bool:
                return self._as_bool(inner, node.inputs[0])  # type: ignore[arg-type]
            source = node.inputs[0]
            if source is not None and source.dtype == torch.bool:
                return self._opaque(value)  # a bool as 0/1 integers: not reasoned about
            return inner
        if op in ("add", "sub") and node.attrs.scalar is not None:
            inner = self.expr(node.inputs[0])  # type: ignore[arg-type]
            if isinstance(inner, _Lin) and float(node.attrs.scalar).is_integer():
                step = int(node.attrs.scalar * node.attrs.alpha)
                return inner.plus(_Lin((), sympy.Integer(step)), 1 if op == "add" else -1)
            return self._opaque(value)
        if op in ("add", "sub"):
            return self._binary_lin(node, value, 1 if op == "add" else -1)
        if op == "aten":
            return self._aten(node, value)
        return self._opaque(value)

    # -- helpers -------------------------------------------------------------------------------
    def _as_bool(self, expr: Any, source: Value | None) -> Any:
        if isinstance(expr, _Data):
            return _Data(expr.value, expr.dims, True)
        if isinstance(expr, _Lin):
            return _Cmp("ne", expr)
        if isinstance(expr, (_Cmp, _Bool, _Same, _Order, _Truth)):
            return expr
        return self._opaque(source) if source is not None else expr

    def _constant(self, value: Value, tensor: torch.Tensor) -> Any:
        if tensor.numel() == 0:
            return self._opaque(value)
        flat = tensor.reshape(-1)
        if bool((flat == flat[0]).all()):
            first = flat[0].item()
            if tensor.dtype == torch.bool:
                return _Truth(bool(first))
            if isinstance(first, int):
                return _Lin((), sympy.Integer(first))
        if tensor.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            # an arange along one dim (what canonicalize folds a static arange into)
            varying = [i for i, s in enumerate(tensor.shape) if s != 1]
            if len(varying) == 1:
                axis = varying[0]
                line = tensor.reshape(-1).to(torch.int64)
                start = int(line[0])
                if torch.equal(line, torch.arange(start, start + line.numel())):
                    return _Lin(((axis, 1),), sympy.Integer(start))
        return _Data(value, _identity_dims(value), tensor.dtype == torch.bool)

    def _broadcast(self, source: Value, value: Value, inner: Any) -> Any:
        """``inner`` (the meaning of ``source``) seen through an expand to ``value`` (None: an
        expanded size-1 dim it depends on)."""
        extra = value.tensor_type.rank - source.tensor_type.rank
        for i, size in enumerate(source.shape):
            if size == 1 and value.shape[i + extra] != 1 and (i in _dims_of(inner)):
                return None
        return _shift(inner, lambda d: d + extra)

    def _reshape(self, source: Value, value: Value, inner: Any) -> Any:
        """``inner`` seen through a reshape that adds or drops size-1 dims (views such as
        ``[B, S] -> [B, 1, 1, S]``); None for any other reshape."""
        old = [(i, s) for i, s in enumerate(source.shape) if s != 1]
        new = [(i, s) for i, s in enumerate(value.shape) if s != 1]
        if [s for _, s in old] != [s for _, s in new]:
            return None
        mapping = {i: j for (i, _), (j, _) in zip(old, new)}
        if not _dims_of(inner) <= set(mapping):
            return None
        return _shift(inner, lambda d: mapping[d])

    def _aligned(self, a: Value, b: Value, out: Value) -> tuple[Any, Any]:
        rank = out.tensor_type.rank
        ea = _shift(self.expr(a), lambda d, s=rank - a.tensor_type.rank: d + s)
        eb = _shift(self.expr(b), lambda d, s=rank - b.tensor_type.rank: d + s)
        return ea, eb

    def _operand(self, obj: Any, out: Value) -> Any:
        if isinstance(obj, Value):
            rank = out.tensor_type.rank
            return _shift(self.expr(obj), lambda d, s=rank - obj.tensor_type.rank: d + s)
        if isinstance(obj, bool):
            return _Truth(obj)
        if isinstance(obj, int):
            return _Lin((), sympy.Integer(obj))
        if isinstance(obj, SymbolRef):
            return _Lin((), dim_expr(obj.expr))
        return None

    def _binary_lin(self, node: Node, value: Value, sign: int) -> Any:
        a, b = node.inputs[0], node.inputs[1]
        if a is None or b is None:
            return self._opaque(value)
        ea, eb = self._aligned(a, b, value)
        if isinstance(ea, _Lin) and isinstance(eb, _Lin) and node.attrs.alpha == 1.0:
            return ea.plus(eb, sign)
        return self._opaque(value)

    def _aten(self, node: Node, value: Value) -> Any:
        target = node.attrs.target
        args, kwargs = aten_call_args(node)
        name = target.split(".")[1]
        if target in ("aten.arange.default", "aten.arange.start", "aten.arange.start_step"):
            start = args[0] if len(args) > 1 else 0
            step = args[2] if len(args) > 2 else kwargs.get("step", 1)
            if step != 1 or not isinstance(start, int):
                return self._opaque(value)
            return _Lin(((0, 1),), sympy.Integer(start))
        if target in ("aten.add.Tensor", "aten.sub.Tensor"):
            ea, eb = self._operand(args[0], value), self._operand(args[1], value)
            alpha = kwargs.get("alpha", 1)
            if isinstance(ea, _Lin) and isinstance(eb, _Lin) and isinstance(alpha, int):
                return ea.plus(eb.scaled(alpha), 1 if name == "add" else -1)
            return self._opaque(value)
        if target in ("aten.new_ones.default", "aten.ones.default", "aten.ones_like.default"):
            if value.dtype == torch.bool:
                return _Truth(True)
            return _Lin((), sympy.Integer(1))
        if target in ("aten.new_zeros.default", "aten.zeros.default", "aten.zeros_like.default"):
            if value.dtype == torch.bool:
                return _Truth(False)
            return _Lin((), sympy.Integer(0))
        if target in ("aten.full.default", "aten.new_full.default", "aten.full_like.default"):
            fill = args[1] if target != "aten.new_full.default" else args[2]
            if value.dtype == torch.bool and isinstance(fill, (bool, int)):
                return _Truth(bool(fill))
            if isinstance(fill, int) and not isinstance(fill, bool):
                return _Lin((), sympy.Integer(fill))
            return self._opaque(value)
        if name in _CMP_TARGETS and target.split(".")[-1] in ("Tensor", "Scalar"):
            return self._compare(name, args, value)
        if target in _AND | _OR:
            terms = (self._operand(args[0], value), self._operand(args[1], value))
            if any(t is None for t in terms):
                return self._opaque(value)
            terms = tuple(self._as_bool(t, None) for t in terms)
            return _Bool("and" if target in _AND else "or", terms)
        if target in _NOT:
            inner = self._operand(args[0], value)
            return _Bool("not", (self._as_bool(inner, None),)) if inner is not None else None
        if target in ("aten.tril.default", "aten.triu.default"):
            inner = self._operand(args[0], value)
            diagonal = args[1] if len(args) > 1 else kwargs.get("diagonal", 0)
            rank = value.tensor_type.rank
            if not isinstance(diagonal, int) or rank < 2:
                return self._opaque(value)
            # tril keeps k - q <= diagonal; triu keeps k - q >= diagonal
            lin = _Lin(tuple(sorted(((rank - 1, 1), (rank - 2, -1)))), sympy.Integer(-diagonal))
            keep = _Cmp("le", lin) if name == "tril" else _Cmp("le", _negate_lin(lin, 0))
            if isinstance(inner, _Truth) and inner.value and value.dtype == torch.bool:
                return keep
            return _Bool("and", (self._as_bool(inner, None), keep))
        if target == "aten.index.Tensor":
            return self._index(args, value)
        if target in ("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf"):
            cond = self._operand(args[0], value)
            a, b = self._operand(args[1], value), self._operand(args[2], value)
            if value.dtype == torch.bool and cond is not None and a is not None and b is not None:
                cond = self._as_bool(cond, None)
                a, b = self._as_bool(a, None), self._as_bool(b, None)
                if isinstance(a, _Truth) and isinstance(b, _Truth):
                    return (
                        cond
                        if a.value and not b.value
                        else (_Bool("not", (cond,)) if b.value and not a.value else a)
                    )
                return _Bool(
                    "or", (_Bool("and", (cond, a)), _Bool("and", (_Bool("not", (cond,)), b)))
                )
            return self._opaque(value)
        if target in ("aten.clone.default", "aten.contiguous.default", "aten.alias.default"):
            return self._operand(args[0], value)
        if target in ("aten._to_copy.default", "aten.to.dtype"):
            inner = self._operand(args[0], value)
            source = args[0] if isinstance(args[0], Value) else None
            if value.dtype == torch.bool:
                return self._as_bool(inner, source)
            if source is not None and source.dtype == torch.bool:
                return self._opaque(value)
            return inner
        return self._opaque(value)

    def _compare(self, name: str, args: list[Any], value: Value) -> Any:
        a, b = self._operand(args[0], value), self._operand(args[1], value)
        if isinstance(a, _Lin) and isinstance(b, _Lin):
            diff = a.plus(b, -1)  # a - b
            if name == "le":
                return _Cmp("le", diff)
            if name == "lt":
                return _Cmp("le", diff.plus(_Lin((), sympy.Integer(1))))
            if name == "ge":
                return _Cmp("le", diff.scaled(-1))
            if name == "gt":
                return _Cmp("le", diff.scaled(-1).plus(_Lin((), sympy.Integer(1))))
            return _Cmp(name, diff)
        if name in ("eq", "ne") and isinstance(a, _Data) and isinstance(b, _Data):
            if not (a.truthy or b.truthy):
                return _Same(a, b, negated=name == "ne")
        if name in ("eq", "ne") and isinstance(a, _Data) and isinstance(b, _Lin):
            if not b.coeffs and b.const == 0 and not a.truthy:
                truthy = _Data(a.value, a.dims, True)
                return truthy if name == "ne" else _Bool("not", (truthy,))
        sides = (a, b)
        if all(isinstance(x, (_Lin, _Data)) and not getattr(x, "truthy", False) for x in sides):
            if name in ("ge", "gt"):  # a >= b is b <= a
                return _Order("le" if name == "ge" else "lt", b, a)
            return _Order(name, a, b)
        return self._opaque(value)

    def _index(self, args: list[Any], value: Value) -> Any:
        """``source[i0, i1, ...]`` with every index an ``arange`` along one output dim."""
        source, indices = args[0], args[1]
        if not isinstance(source, Value) or not isinstance(indices, (list, tuple)):
            return self._opaque(value)
        if len(indices) != source.tensor_type.rank or any(i is None for i in indices):
            return self._opaque(value)
        rank = value.tensor_type.rank
        dims: list[int | None] = []
        for index in indices:
            if not isinstance(index, Value):
                return self._opaque(value)
            if rank != index.tensor_type.rank:
                return self._opaque(value)
            lin = self.expr(index)
            if not isinstance(lin, _Lin) or len(lin.coeffs) != 1 or lin.const != 0:
                return self._opaque(value)
            ((dim, coeff),) = lin.coeffs
            if coeff != 1:
                return self._opaque(value)
            dims.append(dim)
        for i, size in enumerate(source.shape):
            if size == 1:
                dims[i] = None
        inner = self.expr(source)
        if isinstance(inner, _Data) and inner.value is source:
            return _Data(source, tuple(dims), source.dtype == torch.bool)
        # the source is itself a function of its indices: read it at the gathered ones
        if any(dims[d] is None for d in _dims_of(inner)):
            return self._opaque(value)
        return _shift(inner, lambda d: dims[d])


def _negate_lin(lin: _Lin, _unused: int) -> _Lin:
    """``lin >= 0`` written as ``-lin <= 0``: the lin of the ``<= 0`` form."""
    return lin.scaled(-1)


# ----------------------------------------------------------------------------------------------
# Conjuncts
# ----------------------------------------------------------------------------------------------
def is_mask_fill(value: float, dtype: torch.dtype) -> bool:
    """Whether an additive ``value`` masks a score exactly (its exponent underflows to zero)."""
    if math.isinf(value):
        return value < 0
    limit = torch.finfo(dtype).min / 2 if dtype.is_floating_point else -1.0e30
    return (
        value <= min(limit, -1.0e4)
        if dtype in (torch.float16, torch.bfloat16)
        else (value <= limit)
    )


def _zero_valued(graph: Graph, value: Value) -> bool:
    """Whether ``value`` is all zeros: a constant, or made by zeros/zeros_like/new_zeros/full(0)
    (symbolic shapes keep these as ops)."""
    tensor = constant_tensor(graph, value)
    if tensor is not None:
        return tensor.numel() > 0 and bool((tensor == 0).all())
    node = value.producer
    if node is None or node.op != "aten":
        return False
    target = node.attrs.target
    if target in ("aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default"):
        return True
    if target in ("aten.full.default", "aten.full_like.default", "aten.new_full.default"):
        args = aten_call_args(node)[0]
        fill = args[2] if target == "aten.new_full.default" else args[1]
        return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0
    return False


def _scalar_of(graph: Graph, obj: Any) -> float | None:
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    if isinstance(obj, Value):
        tensor = constant_tensor(graph, obj)
        if tensor is not None and tensor.numel() == 1 and tensor.dtype != torch.bool:
            return float(tensor.reshape(()).item())
    return None


def _zero_operand(graph: Graph, obj: Any) -> bool:
    if isinstance(obj, Value):
        return _zero_valued(graph, obj)
    return _scalar_of(graph, obj) == 0.0


def _fill_form(graph: Graph, node: Node) -> tuple[Value, bool, float] | None:
    """``(cond, masked_when, fill)`` of a node that is ``fill`` where ``cond == masked_when`` and
    exactly 0 elsewhere: ``where(cond, 0, fill)``, ``where(cond, fill, 0)``,
    ``masked_fill(zeros, cond, fill)``. None for anything else."""
    if node.op == "where" or (
        node.op == "aten"
        and node.attrs.target
        in ("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf")
    ):
        if node.op == "where":
            cond, a, b = node.inputs[0], node.inputs[1], node.inputs[2]
        else:
            cond, a, b = aten_call_args(node)[0][:3]
        if not isinstance(cond, Value) or cond.dtype != torch.bool:
            return None
        va, vb = _scalar_of(graph, a), _scalar_of(graph, b)
        if vb is not None and _zero_operand(graph, a):
            return cond, False, vb
        if va is not None and _zero_operand(graph, b):
            return cond, True, va
        return None
    operands = _masked_fill_operands(node)
    if operands is not None:
        base, cond, fill = operands
        fill_value = _scalar_of(graph, fill)
        if (
            isinstance(base, Value)
            and isinstance(cond, Value)
            and cond.dtype == torch.bool
            and fill_value is not None
            and _zero_valued(graph, base)
        ):
            return cond, True, fill_value
    return None


def _masked_fill_operands(node: Node) -> tuple[Any, Any, Any] | None:
    """``(base, cond, fill)`` of a core or ATen ``masked_fill``, else None."""
    if node.op == "masked_fill":
        return node.inputs[0], node.inputs[1], node.attrs.value
    if node.op == "aten" and node.attrs.target == "aten.masked_fill.Scalar":
        base, cond, fill = aten_call_args(node)[0][:3]
        return base, cond, fill
    return None


@dataclass
class _Conjunct:
    value: Value  # bool (keep where True, or False when negated) or additive float
    negated: bool = False
    additive: bool = False  # a float term that is only known to add to the scores


def _copy_with_shape(value: Value, shape: tuple) -> Value | None:
    """A value of ``shape`` that ``value`` is a reshape (or contiguous copy) of, through a chain of
    them: reshapes keep the row-major order, so it holds the same elements."""
    current = value
    while current.producer is not None and current.producer.op in ("reshape", "contiguous"):
        source = current.producer.inputs[0]
        if source is None:
            return None
        current = source
        if tuple(current.shape) == tuple(shape):
            return current
    return None


def _leading_unsqueeze(node: Node) -> bool:
    return (
        node.op == "unsqueeze"
        and node.inputs[0] is not None
        and node.attrs.dim % node.output.tensor_type.rank == 0
    )


class _Splitter:
    """Top-down split of a mask into conjuncts that are graph values."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.finite = False  # an additive mask with a finite fill (finfo.min) became bool

    def split(self, value: Value, negated: bool = False) -> list[_Conjunct]:
        if value.dtype == torch.bool:
            return self._bool(value, negated)
        return self._additive(value)

    def _same_rank(self, inner: Value, outer: Value) -> bool:
        return inner.tensor_type.rank == outer.tensor_type.rank

    def _bool(self, value: Value, negated: bool) -> list[_Conjunct]:
        node = value.producer
        if node is not None and node.op == "expand" and node.inputs[0] is not None:
            return self._bool(node.inputs[0], negated)
        if node is not None and _leading_unsqueeze(node):
            return self._bool(node.inputs[0], negated)  # type: ignore[arg-type]
        if node is not None and node.op in ("reshape", "contiguous"):
            source = _copy_with_shape(value, value.shape)
            if source is not None:
                return self._bool(source, negated)
        if node is not None and node.op == "aten":
            target = node.attrs.target
            args, _ = aten_call_args(node)
            operands = [a for a in args[:2] if isinstance(a, Value)]
            if target in (_OR if negated else _AND) and len(operands) == 2:
                if all(o.dtype == torch.bool for o in operands):
                    return self._bool(operands[0], negated) + self._bool(operands[1], negated)
            if target in _NOT and operands and operands[0].dtype == torch.bool:
                if self._same_rank(operands[0], value):
                    return self._bool(operands[0], not negated)
        return [_Conjunct(value, negated)]

    def _additive(self, value: Value) -> list[_Conjunct]:
        """Conjuncts of an additive float mask (0 = keep, a mask fill = masked)."""
        node = value.producer
        whole = [_Conjunct(value, additive=True)]
        if node is None:
            return whole
        if _zero_valued(self.graph, value):
            return []
        dtype = value.dtype
        if node.op == "expand" and node.inputs[0] is not None:
            return self._additive(node.inputs[0])
        if _leading_unsqueeze(node):  # masks broadcast from the right: the same mask
            return self._additive(node.inputs[0])  # type: ignore[arg-type]
        if node.op in ("reshape", "contiguous"):
            source = _copy_with_shape(value, value.shape)
            if source is not None:
                return self._additive(source)
            return self._unmerged(node, value) or whole
        if (
            node.op == "cast"
            and node.inputs[0] is not None
            and node.inputs[0].dtype.is_floating_point
        ):
            inner = node.inputs[0]
            if torch.finfo(inner.dtype).bits <= torch.finfo(dtype).bits:
                return self._additive(inner)
            return whole
        if node.op == "add" and node.attrs.scalar is None and node.attrs.alpha == 1.0:
            a, b = node.inputs[0], node.inputs[1]
            if (
                a is not None
                and b is not None
                and a.dtype.is_floating_point
                and b.dtype.is_floating_point
            ):
                return self._additive(a) + self._additive(b)
        fill = _fill_form(self.graph, node)
        if fill is not None:
            cond, masked_when, fill_value = fill
            if not is_mask_fill(fill_value, dtype):
                return whole
            self.finite = self.finite or math.isfinite(fill_value)
            return self._bool(cond, masked_when)
        operands = _masked_fill_operands(node)
        if operands is not None:
            # masked_fill(base, cond, fill) over an additive base: base's conjuncts and not cond
            base, cond, fill_obj = operands
            fill_value = _scalar_of(self.graph, fill_obj)
            if (
                isinstance(base, Value)
                and isinstance(cond, Value)
                and cond.dtype == torch.bool
                and fill_value is not None
                and is_mask_fill(fill_value, dtype)
            ):
                self.finite = self.finite or math.isfinite(fill_value)
                return self._additive(base) + self._bool(cond, True)
            return whole
        if (
            node.op == "mul"
            and node.attrs.scalar is not None
            and is_mask_fill(float(node.attrs.scalar), dtype)
        ):
            # (1 - keep) * min, keep a 0/1 cast of a bool
            inner = node.inputs[0]
            sub = inner.producer if inner is not None else None
            if sub is not None and sub.op == "aten" and sub.attrs.target == "aten.rsub.Scalar":
                src = aten_call_args(sub)[0]
                if _scalar_of(self.graph, src[1]) == 1.0 and isinstance(src[0], Value):
                    cast = src[0].producer
                    if (
                        cast is not None
                        and cast.op == "cast"
                        and cast.inputs[0] is not None
                        and cast.inputs[0].dtype == torch.bool
                    ):
                        self.finite = True
                        return self._bool(cast.inputs[0], False)
            return whole
        return whole

    def _unmerged(self, node: Node, value: Value) -> list[_Conjunct] | None:
        """Conjuncts of ``reshape(a + b)`` that splits the leading dim ``M = d1 * d2`` (masks
        summed over merged batch and heads, as ``nn.MultiheadAttention`` does): a term of size 1
        (or absent) there broadcasts the same way after the split; a term of size ``M`` must be a
        reshape of a value laid out ``[d1, d2, ...]``. None when a term is neither."""
        source = node.inputs[0]
        if source is None or source.producer is None:
            return None
        shape, merged = tuple(value.shape), tuple(source.shape)
        if len(shape) != len(merged) + 1 or shape[2:] != merged[1:]:
            return None
        if sympy.simplify(dim_expr(merged[0]) - dim_expr(shape[0]) * dim_expr(shape[1])) != 0:
            return None
        add = source.producer
        if add.op != "add" or add.attrs.scalar is not None or add.attrs.alpha != 1.0:
            return None
        conjuncts: list[_Conjunct] = []
        for term in add.inputs:
            if term is None or not term.dtype.is_floating_point:
                return None
            rank = term.tensor_type.rank
            if rank < len(merged) or term.shape[0] == 1:
                conjuncts += self._additive(term)
                continue
            if term.shape[0] != merged[0]:
                return None
            split = _copy_with_shape(term, (shape[0], shape[1], *term.shape[1:]))
            if split is None:
                return None
            conjuncts += self._additive(split)
        return conjuncts


def causal_window(keep: torch.Tensor, q_len: Dim, kv_len: Dim) -> int | None:
    """The window of a bool visibility tensor that is exactly a bottom-right causal pattern.

    Args:
        keep: bool visibility broadcastable to ``[..., q_len, kv_len]`` (True = visible).
        q_len: number of queries.
        kv_len: number of keys.

    Returns:
        ``window_left`` such that query ``i`` sees keys ``[i + off - window_left, i + off]``
        (``off = kv_len - q_len``): ``kv_len - 1`` or more is the plain causal pattern. None when
        ``keep`` is not such a pattern (or some query would see no key).
    """
    if not (isinstance(q_len, int) and isinstance(kv_len, int)):
        return None  # a constant has static lengths: it cannot be a pattern over symbolic ones
    if keep.dtype != torch.bool or keep.dim() < 2 or keep.shape[-1] != kv_len:
        return None
    if kv_len < q_len or keep.shape[-2] != q_len:
        return None
    width = int(keep.reshape(-1, q_len, kv_len)[0, -1].sum())
    if width == 0:
        return None
    window = width - 1
    expected = visible_keys_mask(
        q_len, kv_len, window_left=window, window_right=0, device=keep.device
    )
    return window if bool((keep == expected).all()) else None


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------
@dataclass
class MaskAnalysis:
    """What the masks at one site were proven to be.

    Attributes:
        causal: a conjunct is the bottom-right aligned causal rule.
        window_left: with ``causal``: keys further back than this are hidden (None: no window).
        key_masks: conjuncts that depend on the batch and key index only (``[B, 1, 1, Sk]`` after
            broadcasting), as graph values (bool keep or additive); negated ones are listed in
            ``key_negated``.
        key_padding: every key mask reads which tokens of its own sequence are real, from integer
            or bool graph inputs at the same batch row (padding), not from activations,
            parameters, other rows or fixed positions.
        segments: a ``[B, S]`` integer value whose equality across query and key is a conjunct
            (documents), or None.
        remainder: conjuncts nothing was proven about; they stay a mask.
        kinds: names of what was found, for reports: ``causal``, ``sliding_window``,
            ``key_padding``, ``key_mask``, ``documents``, ``mask``.
        changed: the split or the classification differs from the masks as given.
        finite_fill: an additive mask with a finite fill (``finfo.min``) was read as bool: a
            row whose every key it hides is eager's uniform average over all keys, which the
            caller must keep (a bool mask gives such rows zeros).
    """

    causal: bool = False
    window_left: int | None = None
    key_masks: list[_Conjunct] = field(default_factory=list)
    key_padding: bool = False
    segments: Value | None = None
    remainder: list[_Conjunct] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    changed: bool = False
    finite_fill: bool = False


def _additive_keep_tensor(tensor: torch.Tensor, value: Value) -> torch.Tensor | None:
    """Where a constant additive mask keeps scores: it must be 0 there and a mask fill elsewhere."""
    if not tensor.is_floating_point():
        return None
    if not all(v == 0 or is_mask_fill(v, value.dtype) for v in tensor.unique().tolist()):
        return None
    return tensor == 0


def _lin_of(cmp: _Cmp, q_dim: int, k_dim: int) -> tuple[int, int, Any] | None:
    """``(q coeff, k coeff, const)`` of a ``<= 0`` comparison over the query/key dims only."""
    coeffs = dict(cmp.lin.coeffs)
    if not set(coeffs) <= {q_dim, k_dim}:
        return None
    return coeffs.get(q_dim, 0), coeffs.get(k_dim, 0), cmp.lin.const


def _is_zero(expr: Any) -> bool:
    return sympy.simplify(expr) == 0


def _nonpositive(expr: Any) -> bool:
    """True only when ``expr <= 0`` is proven (dims are positive integers)."""
    value = sympy.simplify(expr)
    if value.is_number:
        return bool(value <= 0)
    return bool(value.is_nonpositive)


class _Classifier:
    def __init__(self, graph: Graph, rank: int, q_len: Dim, kv_len: Dim) -> None:
        self.graph = graph
        self.interp = _Interpreter(graph)
        self.rank = rank
        self.q_len, self.kv_len = q_len, kv_len

    def axes(self, conj: _Conjunct, expr: Any) -> set[str]:
        names = {4: "bhqk", 3: "xqk", 2: "qk"}.get(self.rank, "")
        r = conj.value.tensor_type.rank
        out = set()
        for d in _dims_of(expr):
            position = self.rank - r + d
            out.add(names[position] if 0 <= position < len(names) else "?")
        return out

    def run(self, masks: list[Value]) -> MaskAnalysis:
        result = MaskAnalysis()
        splitter = _Splitter(self.graph)
        conjuncts: list[_Conjunct] = []
        for mask in masks:
            parts = splitter.split(mask)
            if len(parts) != 1 or parts[0].value is not mask or parts[0].negated:
                result.changed = True
            conjuncts.extend(parts)
        result.finite_fill = splitter.finite
        uppers: list[Any] = []  # k - q <= u
        lowers: list[Any] = []  # q - k <= w
        for conj in conjuncts:
            kind = self.classify(conj, uppers, lowers, result)
            if kind == "drop":
                result.changed = True
        if uppers or lowers:
            self._causal(uppers, lowers, result)
        if result.key_masks:
            result.kinds.append("key_padding" if result.key_padding else "key_mask")
        if result.segments is not None:
            result.kinds.append("documents")
        if result.remainder:
            result.kinds.append("mask")
        return result

    def classify(
        self, conj: _Conjunct, uppers: list[Any], lowers: list[Any], result: MaskAnalysis
    ) -> str:
        constant = constant_tensor(self.graph, conj.value)
        if conj.additive:
            # 0 where kept and a mask fill elsewhere, seen through views: its keep rule (or, for a
            # constant, its keep tensor); anything else is only known by its axes
            expr = self.interp.additive_keep(conj.value)
            constant = None if constant is None else _additive_keep_tensor(constant, conj.value)
            if expr is None:
                expr = _Data(conj.value, _identity_dims(conj.value))
                if constant is None:
                    if self.axes(conj, expr) <= {"b", "k"} and self.rank == 4:
                        return self._key(conj, result, padding=False)
                    result.remainder.append(conj)
                    return "remainder"
        else:
            expr = self.interp.expr(conj.value)
            expr = self.interp._as_bool(expr, conj.value)
            if conj.negated:
                expr = _negate(expr)
        axes = self.axes(conj, expr)
        if isinstance(expr, _Truth):
            if expr.value:
                return "drop"
            result.remainder.append(conj)
            return "remainder"
        if constant is not None and constant.dtype == torch.bool and axes <= {"q", "k"}:
            keep = ~constant if conj.negated else constant
            window = causal_window(keep, self.q_len, self.kv_len)
            if window is not None:
                offset = int(self.kv_len) - int(self.q_len)  # static: causal_window checked
                const = sympy.Integer(offset)
                uppers.append((conj, const))
                if window < int(self.kv_len) - 1:
                    lowers.append((conj, sympy.Integer(window) - const))
                return "causal"
        q_dim = conj.value.tensor_type.rank - 2
        k_dim = conj.value.tensor_type.rank - 1
        if isinstance(expr, _Cmp) and expr.op == "le" and axes <= {"q", "k"}:
            found = _lin_of(expr, q_dim, k_dim)
            if found is not None:
                qc, kc, const = found
                if (qc, kc) == (-1, 1):  # k - q + c <= 0
                    uppers.append((conj, -const))
                    return "causal"
                if (qc, kc) == (1, -1):  # q - k + c <= 0: k >= q + c
                    lowers.append((conj, -const))
                    return "window"
                if (qc, kc) == (0, -1) and _nonpositive(const):  # k >= c, c <= 0
                    return "drop"
                if (qc, kc) == (-1, 0) and _nonpositive(const):  # q >= c
                    return "drop"
        if axes <= {"b", "k"} and self.rank == 4:
            return self._key(conj, result, padding=self._reads_padding(conj, expr))
        if isinstance(expr, _Same) and not expr.negated and self.rank == 4:
            a, b = expr.a, expr.b
            if a.value is b.value and a.value.tensor_type.rank == 2:
                # the batch dim is absent from the axes when it is 1 (a static batch of one)
                names = self.axes(conj, a) - {"b"}, self.axes(conj, b) - {"b"}
                if (
                    {frozenset(names[0]), frozenset(names[1])} == {frozenset("q"), frozenset("k")}
                    and a.dims[0] == b.dims[0]
                    and result.segments is None
                ):
                    if a.value.shape[1] == self.q_len == self.kv_len:
                        result.segments = a.value
                        result.changed = True
                        return "documents"
        result.remainder.append(conj)
        return "remainder"

    def _reads_padding(self, conj: _Conjunct, expr: Any) -> bool:
        """Whether a key conjunct says which tokens of each sequence are real: built only from
        reads of graph inputs at the same batch row (``attention_mask[b, k]``,
        ``ids[b, k] != pad``, ``k < lengths[b]``) and constants. A mask gathered from another row
        (``mask.flip(0)``, ``lengths[order]``), computed from activations, or fixing key positions
        (``k < 8``) is a key mask, not padding."""
        names = {4: "bhqk", 3: "xqk", 2: "qk"}.get(self.rank, "")
        shift = self.rank - conj.value.tensor_type.rank

        def axis(dim: int | None) -> str | None:
            return None if dim is None else names[dim + shift]

        def aligned(data: _Data) -> bool:
            if data.value.producer is not None or data.value.dtype.is_floating_point:
                return False  # not an integer/bool graph input: computed, gathered, a parameter
            if len(data.dims) == 2:
                return axis(data.dims[0]) in (None, "b") and axis(data.dims[1]) == "k"
            return len(data.dims) == 1 and axis(data.dims[0]) == "b"

        def side(term: Any) -> bool:
            if isinstance(term, _Data):
                return aligned(term)
            return isinstance(term, _Lin) and {axis(d) for d, _ in term.coeffs} <= {"k"}

        def padding(term: Any) -> bool:
            if isinstance(term, _Truth):
                return True
            if isinstance(term, _Data):
                return term.truthy and len(term.dims) == 2 and aligned(term)
            if isinstance(term, _Order):
                reads = [t for t in (term.lhs, term.rhs) if isinstance(t, _Data)]
                return bool(reads) and side(term.lhs) and side(term.rhs)
            if isinstance(term, _Bool):
                return all(padding(t) for t in term.terms)
            return False

        return padding(expr)

    def _key(self, conj: _Conjunct, result: MaskAnalysis, padding: bool) -> str:
        result.key_padding = (result.key_padding or not result.key_masks) and padding
        result.key_masks.append(conj)
        return "key"

    def _causal(self, uppers: list[Any], lowers: list[Any], result: MaskAnalysis) -> None:
        offset = dim_expr(self.kv_len) - dim_expr(self.q_len)
        causal = [c for c, u in uppers if _is_zero(u - offset)]
        others = [c for c, u in uppers if not _is_zero(u - offset)]
        if not causal:
            result.remainder.extend(others + [c for c, _ in lowers])
            return
        window: int | None = None
        leftover = list(others)
        for conj, stored in lowers:
            # stored = -c of `k >= q + c`; the window rule is k >= q + offset - window_left
            candidate = sympy.simplify(offset + stored)
            if candidate.is_Integer and int(candidate) >= 0:
                window = int(candidate) if window is None else min(window, int(candidate))
            else:
                leftover.append(conj)
        result.causal = True
        result.window_left = window
        result.kinds.append("sliding_window" if window is not None else "causal")
        result.remainder.extend(leftover)
        result.changed = True


def _negate(expr: Any) -> Any:
    if isinstance(expr, _Truth):
        return _Truth(not expr.value)
    if isinstance(expr, _Cmp):
        if expr.op == "le":  # not (lin <= 0)  ->  -lin + 1 <= 0
            return _Cmp("le", expr.lin.scaled(-1).plus(_Lin((), sympy.Integer(1))))
        return _Cmp("ne" if expr.op == "eq" else "eq", expr.lin)
    if isinstance(expr, _Same):
        return _Same(expr.a, expr.b, not expr.negated)
    if isinstance(expr, _Bool) and expr.op == "not":
        return expr.terms[0]
    return _Bool("not", (expr,))


def analyse_masks(
    graph: Graph, masks: list[Value], q_len: Dim, kv_len: Dim, rank: int = 4
) -> MaskAnalysis:
    """Prove what the masks of one site are (see the module docstring).

    Args:
        graph: the graph.
        masks: bool (True = keep) or additive float masks in the canonical score layout (the
            rank of the scores, ``[..., Sq, Sk]``; all of the same rank).
        q_len: number of queries.
        kv_len: number of keys.
        rank: rank of the scores (masks of lower rank broadcast from the right).

    Returns:
        The analysis; ``changed`` is False when nothing was proven that changes the site.
    """
    if not masks:
        return MaskAnalysis()
    return _Classifier(graph, rank, q_len, kv_len).run(masks)
