"""The IR graph: :class:`Graph` of :class:`Node` s producing typed :class:`Value` s.

Entry points: :class:`Graph`, :class:`Node`, :class:`Value`.

A graph has inputs (the model's flattened tensor inputs), a node list in topological order,
tensors (parameters, buffers and constants referenced by ``param`` nodes by name) and outputs.
Nodes are edited through the methods here (insert, replace uses, erase); ``to_networkx`` is a
read-only view for analysis. Types are re-inferred with :meth:`Graph.infer_types` after a pass
changes shapes (token merging, head pruning), never frozen at capture.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from attnopt.ir.types import TensorType, Type


class Value:
    """An SSA value: a graph input or one output of a node."""

    __slots__ = ("name", "type", "producer", "index")

    def __init__(self, name: str, type: Type, producer: Node | None = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index

    @property
    def tensor_type(self) -> TensorType:
        """The value's type, which must be a tensor type."""
        if not isinstance(self.type, TensorType):
            raise TypeError(f"%{self.name} is a {self.type}, not a tensor")
        return self.type

    @property
    def shape(self) -> tuple:
        """Shorthand for ``tensor_type.shape``."""
        return self.tensor_type.shape

    @property
    def dtype(self) -> torch.dtype:
        """Shorthand for ``tensor_type.dtype``."""
        return self.tensor_type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation: ``outputs = op(inputs) {attrs}``. ``meta`` carries provenance, not semantics."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "meta")

    def __init__(self, op: str, inputs: Iterable[Value | None], attrs: Any, outputs: list[Value]):
        self.op = op
        self.inputs: list[Value | None] = list(inputs)
        self.attrs = attrs
        self.outputs = outputs
        self.meta: dict[str, Any] = {}
        for index, value in enumerate(outputs):
            value.producer = self
            value.index = index

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op} has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        from attnopt.ir.printer import format_node

        return format_node(self)


class Graph:
    """A typed dataflow graph; see the module docstring."""

    def __init__(self) -> None:
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value | None] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # --- naming -----------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        """A value name not used yet in this graph, derived from ``hint``."""
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "v"
        name = base
        while name in self._names:
            name = f"{base}_{next(self._counter)}"
        self._names.add(name)
        return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    # --- construction -----------------------------------------------------------------------
    def add_input(self, name: str, type: Type) -> Value:
        """Append a graph input."""
        value = Value(self._claim(name), type)
        self.inputs.append(value)
        return value

    def make_node(
        self,
        op: str,
        inputs: Iterable[Value | None],
        attrs: Any = None,
        *,
        types: list[Type] | None = None,
        names: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Node:
        """Create a node (not yet placed in the node list); types are inferred when not given.

        Args:
            op: registered op name.
            inputs: input values (None for an absent optional input).
            attrs: the op's attribute dataclass instance (defaults to the op's default attrs).
            types: output types; inferred from the op when None.
            names: output value name hints (used as given when still free); op name when None.
            meta: provenance to attach.

        Returns:
            The new node.
        """
        from attnopt.ir.ops import get_op

        opdef = get_op(op)
        if attrs is None:
            attrs = opdef.attrs()
        inputs = list(inputs)
        if types is None:
            types = opdef.infer_types(inputs, attrs, self)
        hints = names if names is not None else [op] * len(types)
        names = [self.fresh_name(hint) for hint in hints]
        node = Node(op, inputs, attrs, [Value(n, t) for n, t in zip(names, types)])
        if meta:
            node.meta.update(meta)
        return node

    def append(self, node: Node) -> Node:
        """Place ``node`` at the end of the node list."""
        self.nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        """Place ``node`` right before ``anchor``."""
        self.nodes.insert(self.nodes.index(anchor), node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        """Place ``node`` right after ``anchor``."""
        self.nodes.insert(self.nodes.index(anchor) + 1, node)
        return node

    def add_tensor(self, hint: str, tensor: torch.Tensor) -> Value:
        """Register a constant tensor and append a ``param`` node producing it.

        Args:
            hint: name hint for the tensor and the value.
            tensor: the tensor (kept by reference).

        Returns:
            The value of the new ``param`` node (placed first in the node list).
        """
        from attnopt.ir.core_ops import ParamAttrs

        name = hint
        while name in self.tensors:
            name = f"{hint}_{next(self._counter)}"
        self.tensors[name] = tensor
        node = self.make_node("param", [], ParamAttrs(name=name), types=[TensorType.of(tensor)])
        self.nodes.insert(0, node)
        return node.output

    # --- editing ----------------------------------------------------------------------------
    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (graph outputs are not nodes)."""
        result: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value is not None:
                    result.setdefault(value, []).append(node)
        return result

    def replace_all_uses(self, old: Value, new: Value) -> int:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new``; returns the count."""
        count = 0
        for node in self.nodes:
            for i, value in enumerate(node.inputs):
                if value is old:
                    node.inputs[i] = new
                    count += 1
        for i, value in enumerate(self.outputs):
            if value is old:
                self.outputs[i] = new
                count += 1
        return count

    def erase(self, node: Node) -> None:
        """Remove ``node``; its outputs must be unused."""
        self.nodes.remove(node)
        for value in node.outputs:
            self._names.discard(value.name)

    def dead_code_elimination(self) -> int:
        """Remove nodes whose outputs nobody reads; returns how many were removed."""
        live: set[int] = {id(v) for v in self.outputs if v is not None}
        keep: list[Node] = []
        for node in reversed(self.nodes):
            used = any(id(v) in live for v in node.outputs)
            if used or not _is_pure(node):
                keep.append(node)
                live.update(id(v) for v in node.inputs if v is not None)
        removed = len(self.nodes) - len(keep)
        keep.reverse()
        dropped = [n for n in self.nodes if all(n is not k for k in keep)] if removed else []
        self.nodes = keep
        for node in dropped:
            for value in node.outputs:
                self._names.discard(value.name)
        used_tensors = {n.attrs.name for n in self.nodes if n.op == "param"}
        for name in list(self.tensors):
            if name not in used_tensors:
                del self.tensors[name]
        return removed

    def infer_types(self) -> None:
        """Re-infer every node's output types from its inputs (after shapes changed)."""
        from attnopt.ir.ops import get_op

        for node in self.nodes:
            types = get_op(node.op).infer_types(node.inputs, node.attrs, self)
            for value, new_type in zip(node.outputs, types):
                value.type = new_type

    # --- queries ----------------------------------------------------------------------------
    def find(self, op: str) -> list[Node]:
        """All nodes of op ``op``, in order."""
        return [n for n in self.nodes if n.op == op]

    def walk(self) -> Iterator[Node]:
        """Iterate over a snapshot of the node list (safe while editing)."""
        yield from list(self.nodes)

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op (aten opaque nodes counted by their target)."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            key = node.attrs.target if node.op == "aten" else node.op
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_networkx(self):  # noqa: ANN201 - networkx is imported lazily
        """A read-only ``networkx.DiGraph`` view: one vertex per node and input, edges = dataflow.

        Returns:
            A frozen DiGraph whose vertices are value/node names with ``op`` attributes.
        """
        import networkx as nx

        view = nx.DiGraph()
        for value in self.inputs:
            view.add_node(f"%{value.name}", op="input", type=str(value.type))
        for index, node in enumerate(self.nodes):
            key = f"#{index}:{node.op}"
            view.add_node(key, op=node.op, outputs=[v.name for v in node.outputs])
            for value in node.inputs:
                if value is None:
                    continue
                source = (
                    f"%{value.name}"
                    if value.producer is None
                    else f"#{self.nodes.index(value.producer)}:{value.producer.op}"
                )
                view.add_edge(source, key, value=value.name)
        return nx.freeze(view)

    def copy(self) -> Graph:
        """A structural copy sharing tensors (parse of the printed text, with tensors and meta)."""
        from attnopt.ir.parser import parse

        clone = parse(str(self))
        clone.tensors = dict(self.tensors)
        clone.meta = dict(self.meta)
        for old, new in zip(self.nodes, clone.nodes):
            new.meta = dict(old.meta)
        return clone

    # --- text and equality ------------------------------------------------------------------
    def __str__(self) -> str:
        from attnopt.ir.printer import format_graph

        return format_graph(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return str(self) == str(other)

    __hash__ = None  # type: ignore[assignment]


def _is_pure(node: Node) -> bool:
    from attnopt.ir.aten_args import is_inplace_target
    from attnopt.ir.ops import get_op

    if node.op == "aten":
        return not is_inplace_target(node.attrs.target)
    return get_op(node.op).pure
