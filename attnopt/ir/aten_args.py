"""Argument templates of the opaque ``aten`` op: how its ATen call is recorded as JSON text.

Entry points: :func:`encode_template` (capture: argument structure -> JSON data),
:func:`decode_template` (JSON data -> arguments with inputs in place), :func:`template_source`
(JSON data -> Python source for codegen), :func:`resolve_target`, :func:`aten_call_args` (an
``aten`` node's arguments, with its input Values in place), :func:`is_inplace_target`.

In a template ``{"$v": i}`` stands for input ``i``; non-JSON leaves (non-finite floats, dtypes,
devices, layouts, memory formats) are tagged objects such as ``{"$dtype": "float16"}``; a
symbolic size (a dim that depends on the input shapes) is ``{"$s": "s1"}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnopt.ir.symbolic import SymbolRef, canonical_dim, dim_source


def encode_template(obj: Any, tensor_index: Callable[[Any], int | None]) -> Any:
    """Turn an argument structure into JSON data; tensors become ``{"$v": index}``.

    Args:
        obj: positional/keyword argument structure (lists, tuples, dicts, scalars, dtypes...).
        tensor_index: maps a tensor-like leaf to its input index, or None if it is not one.

    Returns:
        JSON-serialisable data.
    """
    index = tensor_index(obj)
    if index is not None:
        return {"$v": index}
    if isinstance(obj, SymbolRef):
        return {"$s": canonical_dim(obj.expr)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if isinstance(obj, torch.layout):
        return {"$layout": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.memory_format):
        return {"$memory_format": str(obj).removeprefix("torch.")}
    if isinstance(obj, (list, tuple)):
        return [encode_template(x, tensor_index) for x in obj]
    if isinstance(obj, dict):
        return {str(k): encode_template(v, tensor_index) for k, v in obj.items()}
    raise TypeError(f"cannot record an argument of type {type(obj).__name__}: {obj!r}")


def decode_template(
    data: Any, inputs: Sequence[Any], symbols: Callable[[Any], Any] | None = None
) -> Any:
    """Inverse of :func:`encode_template`, substituting ``inputs`` for ``{"$v": i}``.

    Args:
        data: the JSON data.
        inputs: the values of the op's inputs.
        symbols: maps a symbolic size (``{"$s": expr}``) to its value; without it a symbolic
            size decodes to a :class:`~attnopt.ir.symbolic.SymbolRef` (what passes inspect).

    Returns:
        The argument structure.
    """
    if isinstance(data, list):
        return [decode_template(x, inputs, symbols) for x in data]
    if isinstance(data, dict):
        if "$v" in data:
            return inputs[data["$v"]]
        if "$s" in data:
            return SymbolRef(data["$s"]) if symbols is None else symbols(data["$s"])
        if "$float" in data:
            return float(data["$float"])
        if "$dtype" in data:
            return getattr(torch, data["$dtype"])
        if "$device" in data:
            return torch.device(data["$device"])
        if "$layout" in data:
            return getattr(torch, data["$layout"])
        if "$memory_format" in data:
            return getattr(torch, data["$memory_format"])
        return {k: decode_template(v, inputs, symbols) for k, v in data.items()}
    return data


def template_source(data: Any, names: Sequence[str]) -> str:
    """Python source text for a decoded template, with input names substituted."""
    if isinstance(data, list):
        return "[" + ", ".join(template_source(x, names) for x in data) + "]"
    if isinstance(data, dict):
        if "$v" in data:
            return names[data["$v"]]
        if "$s" in data:
            return dim_source(data["$s"])
        if "$float" in data:
            return f"float({data['$float']!r})"
        for key in ("$dtype", "$layout", "$memory_format"):
            if key in data:
                return f"torch.{data[key]}"
        if "$device" in data:
            return f"torch.device({data['$device']!r})"
        raise ValueError(f"not a template leaf: {data}")
    return repr(data)


def resolve_target(target: str) -> Any:
    """The ``torch.ops`` overload named by ``target`` (``"aten.add.Tensor"``)."""
    obj: Any = torch.ops
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def aten_call_args(node: Any) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments of an ``aten`` node, with its input Values in place.

    Args:
        node: a node whose op is ``aten``.

    Returns:
        ``(args, kwargs)``.
    """
    args, kwargs = decode_template(json.loads(node.attrs.args), node.inputs)
    return args, kwargs


def is_inplace_target(target: str) -> bool:
    """Whether an ATen overload name (``"aten.add_.Tensor"``) mutates its input."""
    name = target.split(".")[1]
    return name.endswith("_") and not name.startswith("__")


__all__ = [
    "aten_call_args",
    "decode_template",
    "encode_template",
    "is_inplace_target",
    "resolve_target",
    "template_source",
]
