"""Rewrite rules as data: patterns, captures, a fixpoint driver and match explanations.

Entry points: :data:`p` (the pattern builder), :class:`Rule`, :func:`match`,
:func:`apply_rules`, :func:`explain`, :class:`FailedMatch`.

A pattern mirrors the IR: ``p.softmax(p.var("x"), dim=-1)`` matches a ``softmax`` node over dim -1
and captures its input as ``x``. ``p.aten("aten.max.dim", ...)`` matches an opaque ATen node by
target. A rule's rewrite receives the graph, the matched node and the captures as keyword
arguments, and returns the replacement value (or None to decline). Example::

    rule = Rule(
        "exp-of-log-softmax",
        p.exp(p.log_softmax(p.var("x"), dim=p.var("dim"))),
        lambda graph, node, x, dim: graph_softmax(graph, node, x, dim),
    )
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from attnopt.ir import Graph, Node, Value

_ANY = object()


class FailedMatch:
    """Why a pattern did not match; the reason text is built only when asked for."""

    __slots__ = ("_reason",)

    def __init__(self, reason: str | Callable[[], str]):
        self._reason = reason

    @property
    def reason(self) -> str:
        """The explanation."""
        if callable(self._reason):
            self._reason = self._reason()
        return self._reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"FailedMatch({self.reason!r})"


class Pat:
    """Base of patterns."""

    def match(
        self, value: Value | None, graph: Graph, captures: dict[str, Any]
    ) -> FailedMatch | None:
        """Match ``value``, filling ``captures``; None on success, a FailedMatch otherwise."""
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pat):
    """Matches any value (or, with ``where``, values passing a predicate) and captures it."""

    name: str
    where: Callable[[Value], bool] | None = None

    def match(self, value, graph, captures):  # noqa: ANN001, ANN201, D102
        if value is None:
            return FailedMatch(f"{self.name}: input is absent")
        if self.where is not None and not self.where(value):
            return FailedMatch(lambda: f"{self.name}: %{value.name} fails its condition")
        if self.name in captures and captures[self.name] is not value:
            return FailedMatch(
                lambda: (
                    f"{self.name} must be the same value twice "
                    f"(%{captures[self.name].name} vs %{value.name})"
                )
            )
        captures[self.name] = value
        return None


@dataclass(frozen=True)
class AttrVar:
    """Captures an attribute value by name inside an op pattern (``dim=p.var("dim")``)."""

    name: str


@dataclass(frozen=True)
class Op(Pat):
    """Matches a node of ``op`` (and ATen ``target``) with matching inputs and attributes.

    ``single_use`` requires the node's output to have exactly one reader, so that rewriting it
    cannot change what other readers see.
    """

    op: str
    inputs: tuple[Pat, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    target: str | None = None
    single_use: bool = False
    capture: str | None = None
    commutative: bool = False

    def match(self, value, graph, captures):  # noqa: ANN001, ANN201, D102
        if value is None or value.producer is None:
            what = "absent" if value is None else f"graph input %{value.name}"
            return FailedMatch(f"expected a {self._label()} node, found {what}")
        node = value.producer
        if node.op != self.op or (self.target is not None and node.attrs.target != self.target):
            return FailedMatch(
                lambda: (
                    f"expected {self._label()}, found {node.op}"
                    + (f" {node.attrs.target}" if node.op == "aten" else "")
                    + f" producing %{value.name}"
                )
            )
        for key, want in self.attrs:
            have = getattr(node.attrs, key, _ANY)
            if isinstance(want, AttrVar):
                captures[want.name] = have
            elif callable(want):
                if not want(have):
                    return FailedMatch(f"{self.op}: attribute {key}={have!r} fails its condition")
            elif have != want:
                return FailedMatch(f"{self.op}: attribute {key}={have!r}, wanted {want!r}")
        if self.single_use and _reader_count(graph, value) != 1:
            return FailedMatch(
                lambda: (
                    f"%{value.name} ({self.op}) is read {_reader_count(graph, value)} times; "
                    "rewriting it would change another reader"
                )
            )
        if self.inputs:
            if len(node.inputs) < len(self.inputs):
                return FailedMatch(f"{self.op}: has {len(node.inputs)} inputs")
            orders = [list(node.inputs)]
            if self.commutative and len(node.inputs) == 2:
                orders.append(list(reversed(node.inputs)))
            failure: FailedMatch | None = None
            for order in orders:
                trial = dict(captures)
                failure = None
                for pat, inp in zip(self.inputs, order):
                    failure = pat.match(inp, graph, trial)
                    if failure is not None:
                        break
                if failure is None:
                    captures.update(trial)
                    break
            if failure is not None:
                return failure
        if self.capture:
            captures[self.capture] = node
        return None

    def _label(self) -> str:
        return self.target or self.op


def _reader_count(graph: Graph, value: Value) -> int:
    count = sum(1 for v in graph.outputs if v is value)
    for node in graph.nodes:
        count += sum(1 for v in node.inputs if v is value)
    return count


class _Builder:
    """``p.<op>(*inputs, **attrs)`` builds an :class:`Op` pattern; see the module docstring."""

    def var(self, name: str, where: Callable[[Value], bool] | None = None) -> Any:
        """A capture: a value pattern in input position, an attribute capture as a keyword."""
        return _VarOrAttr(name, where)

    def aten(
        self, target: str, *inputs: Pat, single_use: bool = False, capture: str | None = None
    ) -> Op:
        """An opaque ATen node by target (``"aten.max.dim"``)."""
        return Op("aten", tuple(_as_pat(i) for i in inputs), (), target, single_use, capture)

    def __getattr__(self, op: str) -> Callable[..., Op]:
        if op.startswith("_"):
            raise AttributeError(op)

        def build(
            *inputs: Pat,
            single_use: bool = False,
            capture: str | None = None,
            commutative: bool = False,
            **attrs: Any,
        ) -> Op:
            attr_items = tuple(
                (k, AttrVar(v.name) if isinstance(v, _VarOrAttr) else v) for k, v in attrs.items()
            )
            return Op(
                op,
                tuple(_as_pat(i) for i in inputs),
                attr_items,
                None,
                single_use,
                capture,
                commutative,
            )

        return build


class _VarOrAttr(Var):
    """A :class:`Var` that becomes an :class:`AttrVar` when used as an attribute."""


def _as_pat(item: Any) -> Pat:
    if isinstance(item, Pat):
        return item
    raise TypeError(f"pattern inputs must be patterns, not {type(item).__name__}")


p = _Builder()


@dataclass(frozen=True)
class Rule:
    """A rewrite rule: ``name``, ``pattern`` (matched at each node's output) and ``rewrite``.

    ``rewrite(graph, node, **captures)`` returns the replacement value for the node's output,
    or None to decline. New nodes must be inserted before ``node``.
    """

    name: str
    pattern: Op
    rewrite: Callable[..., Value | None]


def match(pattern: Pat, node_or_value: Node | Value, graph: Graph) -> dict[str, Any] | FailedMatch:
    """Match ``pattern`` at a node's (first) output or at a value.

    Args:
        pattern: the pattern.
        node_or_value: where to match.
        graph: the graph (for use counts).

    Returns:
        The captures, or a :class:`FailedMatch`.
    """
    value = node_or_value.outputs[0] if isinstance(node_or_value, Node) else node_or_value
    captures: dict[str, Any] = {}
    failure = pattern.match(value, graph, captures)
    return failure if failure is not None else captures


def explain(pattern: Pat, node: Node, graph: Graph) -> str:
    """Why ``pattern`` does (not) match at ``node``: "matched" or the reason."""
    result = match(pattern, node, graph)
    return "matched" if not isinstance(result, FailedMatch) else result.reason


@dataclass
class RuleStats:
    """How often each rule fired."""

    fired: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All rewrites."""
        return sum(self.fired.values())


def apply_rules(graph: Graph, rules: Iterable[Rule], *, max_iterations: int = 20) -> RuleStats:
    """Apply ``rules`` everywhere until nothing changes (or ``max_iterations`` sweeps).

    Args:
        graph: the graph, edited in place.
        rules: the rules, tried in order at each node.
        max_iterations: cap on full sweeps.

    Returns:
        How often each rule fired.
    """
    rules = list(rules)
    stats = RuleStats()
    for _ in range(max_iterations):
        changed = False
        for node in graph.walk():
            if not node.outputs:
                continue
            for rule in rules:
                if rule.pattern.op != node.op:
                    continue
                captures = match(rule.pattern, node, graph)
                if isinstance(captures, FailedMatch):
                    continue
                replacement = rule.rewrite(graph, node, **captures)
                if replacement is None:
                    continue
                if replacement is not node.outputs[0]:
                    graph.replace_all_uses(node.outputs[0], replacement)
                stats.fired[rule.name] = stats.fired.get(rule.name, 0) + 1
                changed = True
                break
        if changed:
            graph.dead_code_elimination()
        else:
            break
    return stats
