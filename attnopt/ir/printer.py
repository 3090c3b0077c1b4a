"""IR text: one line per node, stable SSA names. :func:`format_graph` is ``str(graph)``.

Example::

    graph(%x: f32[2,8,64]) {
      %w: f32[64,64] = param() {name="proj.weight"}
      %y: f32[2,8,64] = linear(%x, %w, _)
      return (%y)
    }

Attribute values print as ints, floats (``inf``, ``nan``), ``true``/``false``, ``none``, JSON
strings, ``[...]`` tuples and dtype names (``f32``). :func:`attnopt.ir.parse` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields
from typing import Any

import torch

from attnopt.ir.ops import attrs_fields
from attnopt.ir.types import dtype_name


def format_attr_value(value: Any) -> str:
    """Text of one attribute value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_attr_value(v) for v in value) + "]"
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} has no text form")


def format_attrs(attrs: Any) -> str:
    """``{name=value, ...}`` for attributes that differ from their defaults, or ``""``."""
    defaults = {f.name: f.default for f in fields(attrs)}
    parts = []
    for name, value in attrs_fields(attrs):
        default = defaults[name]
        if default is not MISSING and type(default) is type(value) and default == value:
            continue
        parts.append(f"{name}={format_attr_value(value)}")
    return " {" + ", ".join(parts) + "}" if parts else ""


def format_node(node: Any) -> str:
    """One node as a line of IR text (without indentation)."""
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    lhs = f"{outs} = " if node.outputs else ""
    return f"{lhs}{node.op}({args}){format_attrs(node.attrs)}"


def format_graph(graph: Any) -> str:
    """The whole graph as IR text."""
    params = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph({params}) {{"]
    lines += [f"  {format_node(node)}" for node in graph.nodes]
    outs = ", ".join("_" if v is None else f"%{v.name}" for v in graph.outputs)
    lines.append(f"  return ({outs})")
    lines.append("}")
    return "\n".join(lines)


def op_summary(graph: Any) -> list[tuple[str, int, float, float]]:
    """Per-op rows ``(op, count, flops, bytes)``, most flops first (for ``attnopt inspect``)."""
    from attnopt.ir.ops import get_op

    rows: dict[str, list[float]] = {}
    for node in graph.nodes:
        key = node.attrs.target if node.op == "aten" else node.op
        cost = get_op(node.op).cost_of(
            [None if v is None else v.type for v in node.inputs],
            [v.type for v in node.outputs],
            node.attrs,
        )
        row = rows.setdefault(key, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += cost.flops
        row[2] += cost.bytes
    ordered = sorted(rows.items(), key=lambda kv: (-kv[1][1], kv[0]))
    return [(op, int(c), f, b) for op, (c, f, b) in ordered]
