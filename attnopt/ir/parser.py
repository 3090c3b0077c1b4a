"""Parse IR text (as printed by :mod:`attnopt.ir.printer`) back into a :class:`Graph`.

Entry point: :func:`parse`. ``parse(str(g)) == g`` for every graph. Tensors referenced by
``param`` nodes are not part of the text: the parsed graph's ``tensors`` is empty unless given.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields
from typing import Any

import torch

from attnopt.ir.graph import Graph
from attnopt.ir.ops import get_op
from attnopt.ir.types import ScalarType, TensorType, Type, dtype_from_name, is_dtype_name

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<value>%[A-Za-z0-9_.]+)
      | (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf)(?![A-Za-z0-9_]))
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[()\[\]{},:=])
    )""",
    re.VERBOSE,
)


class IRParseError(ValueError):
    """IR text that does not parse; the message names the line."""


class _Tokens:
    def __init__(self, text: str, line_no: int):
        self.items: list[tuple[str, str]] = []
        self.line_no = line_no
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise IRParseError(f"line {line_no}: cannot read {text[pos:]!r}")
            kind = match.lastgroup or ""
            self.items.append((kind, match.group(kind)))
            pos = match.end()
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise IRParseError(f"line {self.line_no}: unexpected end, wanted {expected or 'more'}")
        if expected is not None and token[1] != expected and token[0] != expected:
            raise IRParseError(f"line {self.line_no}: expected {expected!r}, found {token[1]!r}")
        self.pos += 1
        return token

    def at(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token[1] == text

    def done(self) -> bool:
        return self.pos >= len(self.items)


def _parse_type(tokens: _Tokens) -> Type:
    _, name = tokens.take("name")
    if name in ("int", "float", "bool"):
        return ScalarType(name)
    dtype = dtype_from_name(name)
    tokens.take("[")
    dims: list[int | str] = []
    while not tokens.at("]"):
        kind, text = tokens.take()
        if kind == "number":
            dims.append(int(text))
        elif kind == "string":
            dims.append(json.loads(text))
        else:
            dims.append(text)
        if tokens.at(","):
            tokens.take(",")
    tokens.take("]")
    return TensorType(tuple(dims), dtype)


def _parse_value_decl(tokens: _Tokens) -> tuple[str, Type]:
    _, ref = tokens.take("value")
    tokens.take(":")
    return ref[1:], _parse_type(tokens)


def _parse_attr_value(tokens: _Tokens) -> Any:
    kind, text = tokens.take()
    if kind == "number":
        if text in ("inf", "-inf"):
            return float(text)
        return float(text) if any(c in text for c in ".eE") else int(text)
    if kind == "string":
        return json.loads(text)
    if text == "[":
        items = []
        while not tokens.at("]"):
            items.append(_parse_attr_value(tokens))
            if tokens.at(","):
                tokens.take(",")
        tokens.take("]")
        return tuple(items)
    if kind == "name":
        literals = {"true": True, "false": False, "none": None, "nan": float("nan")}
        if text in literals:
            return literals[text]
        if is_dtype_name(text):
            return dtype_from_name(text)
    raise IRParseError(f"line {tokens.line_no}: bad attribute value {text!r}")


def _coerce(value: Any, annotation: str) -> Any:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and "float" in annotation and not annotation.startswith("tuple"):
        return float(value)
    return value


def _build_attrs(op: str, raw: dict[str, Any], line_no: int) -> Any:
    attrs_type = get_op(op).attrs
    hints = typing.get_type_hints(attrs_type, localns={"torch": torch}) if raw else {}
    known = {f.name for f in fields(attrs_type)}
    unknown = set(raw) - known
    if unknown:
        raise IRParseError(f"line {line_no}: op {op} has no attribute {sorted(unknown)}")
    values = {k: _coerce(v, str(hints.get(k, ""))) for k, v in raw.items()}
    return attrs_type(**values)


def parse(text: str, tensors: dict[str, torch.Tensor] | None = None) -> Graph:
    """Parse IR text into a graph.

    Args:
        text: IR text as printed by ``str(graph)``.
        tensors: optional tensors for the ``param`` nodes, by name.

    Returns:
        The graph.

    Raises:
        IRParseError: on malformed text, naming the line.
    """
    graph = Graph()
    if tensors:
        graph.tensors.update(tensors)
    values: dict[str, Any] = {}
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines or not lines[0][1].strip().startswith("graph("):
        raise IRParseError("IR text must start with 'graph('")
    try:
        _parse_header(graph, values, lines[0][1], lines[0][0])
    except (ValueError, TypeError, KeyError) as err:
        raise _parse_error(err, lines[0][0]) from None
    seen = set(values)
    for line_no, line in lines[1:]:
        try:
            done = _parse_line(graph, values, seen, line, line_no)
        except (ValueError, TypeError, KeyError) as err:
            # malformed values (a float dim, an unknown dtype, bad JSON, attributes an op's
            # dataclass rejects) are parse errors of their line, like malformed syntax
            raise _parse_error(err, line_no) from None
        if done:
            break
    return graph


def _parse_error(err: Exception, line_no: int) -> IRParseError:
    if isinstance(err, IRParseError):
        return err
    return IRParseError(f"line {line_no}: {type(err).__name__}: {err}")


def _parse_header(graph: Graph, values: dict[str, Any], line: str, line_no: int) -> None:
    header = _Tokens(line, line_no)
    header.take("graph")
    header.take("(")
    while not header.at(")"):
        name, type_ = _parse_value_decl(header)
        values[name] = graph.add_input(name, type_)
        if header.at(","):
            header.take(",")
    header.take(")")
    header.take("{")


def _parse_line(
    graph: Graph, values: dict[str, Any], seen: set[str], line: str, line_no: int
) -> bool:
    """Parse one body line into ``graph``; True at the closing brace."""
    tokens = _Tokens(line, line_no)
    if tokens.at("}"):
        return True
    if tokens.at("return"):
        tokens.take("return")
        tokens.take("(")
        while not tokens.at(")"):
            kind, ref = tokens.take()
            graph.outputs.append(None if ref == "_" else _lookup(values, ref, line_no))
            if tokens.at(","):
                tokens.take(",")
        return False
    outs: list[tuple[str, Type]] = []
    if tokens.peek() and tokens.peek()[0] == "value":  # type: ignore[index]
        outs.append(_parse_value_decl(tokens))
        while tokens.at(","):
            tokens.take(",")
            outs.append(_parse_value_decl(tokens))
        tokens.take("=")
    for name, _ in outs:
        if name in seen:
            raise IRParseError(f"line {line_no}: %{name} is defined twice")
        seen.add(name)
    _, op = tokens.take("name")
    tokens.take("(")
    inputs = []
    while not tokens.at(")"):
        kind, ref = tokens.take()
        inputs.append(None if ref == "_" else _lookup(values, ref, line_no))
        if tokens.at(","):
            tokens.take(",")
    tokens.take(")")
    raw: dict[str, Any] = {}
    if tokens.at("{"):
        tokens.take("{")
        while not tokens.at("}"):
            _, key = tokens.take("name")
            tokens.take("=")
            raw[key] = _parse_attr_value(tokens)
            if tokens.at(","):
                tokens.take(",")
        tokens.take("}")
    if not tokens.done():
        raise IRParseError(f"line {line_no}: unexpected {tokens.peek()[1]!r}")  # type: ignore[index]
    attrs = _build_attrs(op, raw, line_no)
    node = graph.make_node(
        op, inputs, attrs, types=[t for _, t in outs], names=[n for n, _ in outs]
    )
    graph.append(node)
    for value in node.outputs:
        values[value.name] = value
    return False


def _lookup(values: dict[str, Any], ref: str, line_no: int) -> Any:
    if not ref.startswith("%") or ref[1:] not in values:
        raise IRParseError(f"line {line_no}: {ref} is used before it is defined")
    return values[ref[1:]]
