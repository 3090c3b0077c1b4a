"""``static-kv-cache``: a decoding step grows its key/value caches in place.

Entry point: :class:`StaticKVCache`.

A decoder captured with transformers' dynamic cache computes each layer's cache for the step as
``cat([past, new], dim=-2)``, where ``past`` is a graph input: a copy of the whole cache per layer
per token. The pass rewrites each such ``cat`` into ``kv_append(past, new)``, the same value (the
op's reference is that ``cat``), which the runtime computes by writing ``new`` into the static
buffer ``past`` is a view of (see :mod:`attnopt.runtime.kv_cache`). It is exact. ``cat`` nodes whose
first operand is not a 4-D graph input, or that join along another dim, are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnopt.ir import Graph, aten_call_args
from attnopt.ir.kv_cache import KVAppendAttrs
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.helpers import emit_before

__all__ = ["StaticKVCache"]


@dataclass(frozen=True)
class StaticKVCache(Pass):
    """Rewrite ``cat([past_input, new], dim=2)`` of 4-D caches into in-place ``kv_append``."""

    name: ClassVar[str] = "static-kv-cache"
    exact: ClassVar[bool] = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite every cache concatenation of a graph input; see the module docstring."""
        inputs = {id(v) for v in graph.inputs}
        users = graph.users()
        rewrites = 0
        for node in list(graph.nodes):
            if node.op != "aten" or node.attrs.target != "aten.cat.default":
                continue
            args, kwargs = aten_call_args(node)
            parts = args[0] if args else None
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if not isinstance(parts, list) or len(parts) != 2 or kwargs.keys() - {"dim"}:
                continue
            past, new = parts
            shape = getattr(getattr(past, "type", None), "shape", None)
            if id(past) not in inputs or shape is None or len(shape) != 4 or dim not in (2, -2):
                continue
            kind = "key"
            for user in users.get(node.output, ()):
                if (
                    user.op == "attention"
                    and len(user.inputs) > 2
                    and user.inputs[2] is node.output
                ):
                    kind = "value"
            layer = node.meta.get("layer", -1)
            out = emit_before(
                graph,
                node,
                "kv_append",
                [past, new],
                KVAppendAttrs(layer=layer if isinstance(layer, int) else -1, kind=kind),
            )
            out.type = node.output.type
            graph.replace_all_uses(node.output, out)
            graph.erase(node)
            rewrites += 1
        notes = [f"{rewrites} cache concatenation(s) grow a static cache in place"]
        return PassResult(changed=bool(rewrites), rewrites=rewrites, notes=notes)
