"""attnopt's IR: a small typed graph.

Entry points: :class:`Graph`, :class:`Node`, :class:`Value`, :class:`TensorType`,
:func:`parse`, :func:`verify`, :func:`register_op`, :func:`get_op`; the ``attention`` op
(:class:`AttentionAttrs`, :class:`AttentionOperands`) is defined with the package, so every op
the IR text names is registered once ``attnopt.ir`` is imported.
``str(graph)`` prints the text form; ``parse(str(g)) == g``.
"""

from attnopt.ir.attention import AttentionAttrs, AttentionOperands
from attnopt.ir.graph import Graph, Node, Value
from attnopt.ir.ops import OpDef, aten_call_args, get_op, register_op, registered_ops
from attnopt.ir.parser import IRParseError, parse
from attnopt.ir.types import ScalarType, TensorType, dtype_from_name, dtype_name
from attnopt.ir.verify import IRVerifyError, verify

__all__ = [
    "AttentionAttrs",
    "AttentionOperands",
    "Graph",
    "IRParseError",
    "IRVerifyError",
    "Node",
    "OpDef",
    "ScalarType",
    "TensorType",
    "Value",
    "aten_call_args",
    "dtype_from_name",
    "dtype_name",
    "get_op",
    "parse",
    "register_op",
    "registered_ops",
    "verify",
]
