"""The ``kv_append`` op: a key/value cache grown by the new positions of one decoding step.

Entry point: the op registration (imported by :mod:`attnopt.ir`). ``kv_append(past, new)`` is
``torch.cat([past, new], dim=2)`` over ``[batch, kv_heads, seq, head_dim]`` tensors: the
reference semantics, and what transformers' dynamic cache computes. The runtime's kernel
(``K.kv_append``) writes ``new`` in place into the preallocated static cache ``past`` is a prefix
view of, and returns the longer view, so a decoding step never copies the cache; anything else it
is given it concatenates (see :mod:`attnopt.runtime.kv_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnopt.ir.ops import OpDef, register_op

__all__ = ["KVAppendAttrs"]


@dataclass(frozen=True)
class KVAppendAttrs:
    """Attributes of ``kv_append``.

    Attributes:
        layer: the decoder layer whose cache this is (-1: unknown), for reports.
        kind: ``"key"`` or ``"value"``.
    """

    layer: int = -1
    kind: str = "key"


def _impl(inputs: list[Any], attrs: KVAppendAttrs) -> torch.Tensor:
    past, new = inputs
    return torch.cat([past, new], dim=2)


def _verify(node: Any) -> str | None:
    types = [getattr(v, "type", None) for v in node.inputs]
    shapes = [getattr(t, "shape", None) for t in types]
    if len(shapes) != 2 or any(s is None or len(s) != 4 for s in shapes):
        return "kv_append takes two [batch, kv_heads, seq, head_dim] tensors"
    past, new = shapes
    if past[0] != new[0] or past[1] != new[1] or past[3] != new[3]:
        return f"kv_append: past {list(past)} and new {list(new)} differ outside the seq dim"
    if node.attrs.kind not in ("key", "value"):
        return f"kv_append: kind must be 'key' or 'value', not {node.attrs.kind!r}"
    return None


register_op(
    OpDef(
        "kv_append",
        KVAppendAttrs,
        _impl,
        emit=lambda n, a: f"K.kv_append({n[0]}, {n[1]})",
        verify=_verify,
    )
)
