"""``canonicalize``: fold constants and normalise the forms attention is written in.

Entry points: :class:`Canonicalize`, :func:`fold_constants`, :data:`RULES` (every rule, in the
order it is tried). The rules live by theme: :mod:`attnopt.passes.canonical_views` (views,
transposes, batched matmuls), :mod:`attnopt.passes.canonical_masks`,
:mod:`attnopt.passes.canonical_softmax` and :mod:`attnopt.passes.canonical_scores` (scale forms
and the path from scores to softmax).

After this pass attention detection needs one pattern: softmax written as exp/sum (with or without
max subtraction) or exp(log_softmax) becomes ``softmax``; ``baddbmm`` becomes matmul, mul and add;
two-operand ``einsum`` batched matmuls become ``matmul`` with explicit permutes; scales held in
constant tensors become scalar attributes; transposes of transposes and permutes of permutes
compose (an identity disappears). Subgraphs that depend on no input and no trainable parameter
(mask construction from shapes, aranges, ``sqrt(head_dim)``) are computed once at compile time.
Around a softmax, reshapes that only regroup batch axes move to ``q @ k^T`` and past ``P @ V``
(scores kept as ``[B H, S, S]``), ``scores - term`` becomes ``scores + (-term)`` and a per-head
or per-row factor on the scores moves into q.
Every rule is exact: it rewrites to the same computation, never an approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnopt.ir import Graph, Node, get_op
from attnopt.ir.aten_args import is_inplace_target
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.canonical_masks import MASK_RULES
from attnopt.passes.canonical_scores import SCALE_RULES, SCORE_RULES
from attnopt.passes.canonical_softmax import SOFTMAX_RULES
from attnopt.passes.canonical_views import MATMUL_RULES, VIEW_RULES
from attnopt.passes.pattern import apply_rules

#: Folded constants larger than this many elements stay computed at run time.
FOLD_LIMIT = 1 << 27
_NONDETERMINISTIC = re.compile(r"rand|bernoulli|normal|uniform|dropout|empty|multinomial|poisson")


def fold_constants(graph: Graph, limit: int = FOLD_LIMIT) -> int:
    """Compute, once, every pure node that depends on no graph input and no trainable parameter.

    Args:
        graph: the graph, edited in place.
        limit: largest folded result, in elements.

    Returns:
        How many values were replaced by constants.
    """
    parameters = set(graph.meta.get("parameters", ()))
    known: dict[int, Any] = {}
    folded_nodes: list[Node] = []
    for node in graph.nodes:
        if node.op == "param":
            if node.attrs.name not in parameters and node.attrs.name in graph.tensors:
                known[id(node.output)] = graph.tensors[node.attrs.name]
            continue
        if not _foldable(node):
            continue
        if not all(v is None or id(v) in known for v in node.inputs):
            continue
        if any(getattr(v.type, "is_static", True) is False for v in node.outputs):
            continue
        values = [None if v is None else known[id(v)] for v in node.inputs]
        try:
            with torch.no_grad():
                result = get_op(node.op).impl(values, node.attrs)
        except Exception:  # noqa: BLE001 - an op that cannot run now simply stays in the graph
            continue
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if not all(isinstance(r, torch.Tensor) and r.numel() <= limit for r in results):
            continue
        for value, tensor in zip(node.outputs, results):
            known[id(value)] = tensor
        folded_nodes.append(node)
    if not folded_nodes:
        return 0
    folded_ids = {id(n) for n in folded_nodes}
    readers_outside = set()
    for node in graph.nodes:
        if id(node) in folded_ids:
            continue
        for value in node.inputs:
            if value is not None:
                readers_outside.add(id(value))
    readers_outside |= {id(v) for v in graph.outputs if v is not None}
    count = 0
    for node in folded_nodes:
        for value in node.outputs:
            if id(value) not in readers_outside:
                continue
            tensor = known[id(value)]
            if tensor.dim() and tensor.stride() and 0 in tensor.stride():
                tensor = tensor.contiguous()
            new = graph.add_tensor(f"folded.{value.name}", tensor)
            graph.replace_all_uses(value, new)
            count += 1
    graph.dead_code_elimination()
    return count


def _foldable(node: Node) -> bool:
    if node.op == "aten":
        target = node.attrs.target
        return not is_inplace_target(target) and not _NONDETERMINISTIC.search(target)
    return node.op not in ("attention",) and get_op(node.op).pure


#: Every canonical-form rule, in the order they are tried at a node (the first that fires wins).
RULES = [
    *VIEW_RULES,
    *MASK_RULES,
    *SOFTMAX_RULES,
    *SCALE_RULES,
    *MATMUL_RULES,
    *SCORE_RULES,
]


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Fold constants and normalise attention's many written forms (exact)."""

    name: ClassVar[str] = "canonicalize"
    exact: ClassVar[bool] = True
    fold: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Fold constants, then apply the canonical-form rules to a fixpoint."""
        folded = fold_constants(graph) if self.fold else 0
        stats = apply_rules(graph, RULES)
        notes = [f"{name}: {count}" for name, count in sorted(stats.fired.items())]
        if folded:
            notes.append(f"folded {folded} constant values")
        return PassResult(changed=bool(folded or stats.total), rewrites=stats.total, notes=notes)
