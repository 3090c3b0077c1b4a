"""attnopt's IR: a small typed graph.

Entry points: :class:`Graph`, :class:`Node`, :class:`Value`, :class:`TensorType`,
:func:`parse`, :func:`verify`, :func:`register_op`, :func:`get_op`. The built-in ops
(:mod:`attnopt.ir.core_ops`) and the ``attention`` op (:class:`AttentionAttrs`,
:class:`AttentionOperands`) are defined with the package, so every op the IR text names is
registered once ``attnopt.ir`` is imported.
``str(graph)`` prints the text form; ``parse(str(g)) == g``.
"""

from attnopt.ir import (
    core_ops,  # noqa: F401 - registers the built-in ops
    kv_cache,  # noqa: F401 - registers the decoding cache append
    token_reduce,  # noqa: F401 - registers token merging / pruning
    tokens,  # noqa: F401 - registers token packing (padding removal)
)
from attnopt.ir.aten_args import aten_call_args
from attnopt.ir.attention import AttentionAttrs, AttentionOperands
from attnopt.ir.graph import Graph, Node, Value
from attnopt.ir.ops import OpDef, get_op, register_op, registered_ops
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
