"""The IR verifier: structural rules plus one rule per op, run after every pass in tests.

Entry point: :func:`verify` (raises :class:`IRVerifyError` naming the node and the rule).
"""

from __future__ import annotations

from attnopt.ir.graph import Graph
from attnopt.ir.ops import get_op
from attnopt.ir.types import TensorType


class IRVerifyError(ValueError):
    """The graph breaks an IR rule; the message names the node."""


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Check that ``graph`` is well formed.

    Rules: every input is defined before use; value names are unique; each op is registered and
    its attributes are of its schema; output counts match; ``param`` nodes name a known tensor
    (when tensors are attached); each op's own rule holds; and, with ``check_types``, the stored
    output types equal the types inferred from the inputs.

    Args:
        graph: the graph to check.
        check_types: also re-infer and compare output types.

    Raises:
        IRVerifyError: on the first broken rule.
    """
    defined: set[int] = {id(v) for v in graph.inputs}
    names: set[str] = {v.name for v in graph.inputs}
    if len(names) != len(graph.inputs):
        raise IRVerifyError("graph inputs have duplicate names")
    for index, node in enumerate(graph.nodes):
        where = f"node {index} ({node.op}, %{node.outputs[0].name if node.outputs else '-'})"
        try:
            opdef = get_op(node.op)
        except KeyError as err:
            raise IRVerifyError(f"{where}: {err}") from None
        if not isinstance(node.attrs, opdef.attrs):
            raise IRVerifyError(
                f"{where}: attributes are {type(node.attrs).__name__}, not {opdef.attrs.__name__}"
            )
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                raise IRVerifyError(f"{where}: input %{value.name} is not defined before use")
        if len(node.outputs) != opdef.output_count(node.attrs):
            raise IRVerifyError(
                f"{where}: has {len(node.outputs)} outputs, op declares "
                f"{opdef.output_count(node.attrs)}"
            )
        for value in node.outputs:
            if value.name in names:
                raise IRVerifyError(f"{where}: value %{value.name} is defined twice")
            if value.producer is not node:
                raise IRVerifyError(f"{where}: output %{value.name} does not point back to it")
            names.add(value.name)
            defined.add(id(value))
        if node.op == "param" and graph.tensors and node.attrs.name not in graph.tensors:
            raise IRVerifyError(f"{where}: no tensor named {node.attrs.name!r}")
        if opdef.verify is not None:
            problem = opdef.verify(node)
            if problem:
                raise IRVerifyError(f"{where}: {problem}")
        if check_types and (node.op != "param" or graph.tensors):
            _check_types(graph, node, where)
    for value in graph.outputs:
        if value is not None and id(value) not in defined:
            raise IRVerifyError(f"graph output %{value.name} is not defined")


def _check_types(graph: Graph, node, where: str) -> None:  # noqa: ANN001
    if any(
        isinstance(v.type, TensorType) and not v.type.is_static
        for v in node.inputs
        if v is not None
    ):
        return
    try:
        inferred = get_op(node.op).infer_types(node.inputs, node.attrs, graph)
    except Exception as err:  # noqa: BLE001 - any failure of the op on meta tensors is a finding
        if node.op == "aten":
            return  # data-dependent ATen ops cannot always run on meta tensors
        raise IRVerifyError(f"{where}: the op rejects its inputs: {err}") from None
    stored = [v.type for v in node.outputs]
    if inferred != stored:
        raise IRVerifyError(
            f"{where}: stored types {[str(t) for t in stored]} differ from inferred "
            f"{[str(t) for t in inferred]}"
        )
