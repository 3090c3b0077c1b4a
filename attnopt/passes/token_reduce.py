"""``token-merge`` and ``token-prune``: fewer tokens from chosen layers on (ToMe, EViT).

Entry points: :class:`TokenMerge`, :class:`TokenPrune`.

At each chosen self-attention site, between the attention block and the MLP (the first value
after the attention's residual add that both the MLP and the next residual read: ``x + attn``
in a pre-norm block, ``LayerNorm(x + attn)`` in a post-norm one), the pass inserts a reduction op
(``token_merge`` / ``token_prune`` of :mod:`attnopt.ir.token_reduce`). Every later token-wise op
(projections, MLPs, norms, activations, residual adds) is re-emitted on the reduced tokens, so it
really runs on fewer of them; later attention sites get the reduced queries, keys and values, a
key padding mask rebuilt from the token sizes (a padded token has size 0) and, with proportional
attention, ``log(size)`` as an additive bias. Values leave the reduced layout where something that
is not token-wise reads them (a pooler reading token 0, the model's outputs): ``token_unmerge``
gives each original position the vector of the token it ended up in, so outputs keep their
shapes and a mean over the original mask weights merged tokens by their size.

Refused, with the reason: causal sites (merging breaks causality), cross-attention, sites with a
mask other than key padding or with a bias, and models whose merge point cannot be found. An op
after the first reduction that is not token-wise reads the unmerged values (correct, but the
tokens it sees are full again): the notes say which.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attnopt.errors import PipelineError
from attnopt.ir import AttentionOperands, Graph, Node, Value, aten_call_args, verify
from attnopt.ir.core_ops import ShapeAttrs
from attnopt.ir.symbolic import dim_expr, evaluate_dim
from attnopt.ir.token_reduce import (
    SiteTapAttrs,
    TokenMergeAttrs,
    TokenPruneAttrs,
    UnmergeAttrs,
    merge_count,
    reduced_tokens,
)
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.helpers import (
    ATEN_DIM_ARG,
    ATEN_POINTWISE,
    ELEMENTWISE_OPS,
    emit_at,
    emit_aten_before,
    emit_before,
    key_padding_keep,
)
from attnopt.passes.select import Site, check_fraction, check_positive, decline, sites_for

__all__ = ["TokenMerge", "TokenPrune"]

_NORMS = {"aten.layer_norm.default", "aten.rms_norm.default"}
#: Mask kinds (mask analysis) a reduction can carry: a mask per key (and batch row) only.
_KEY_MASKS = {"key_padding", "key_mask"}
_RESIDUAL = {"add"}


@dataclass
class _Stage:
    """The token bookkeeping after one reduction."""

    size: Value  # [B, N'] float
    source: Value  # [B, S0] int64
    tokens: int | str  # N'
    hint: int
    masks: dict[int, Value] = field(default_factory=dict)
    bias: Value | None = None
    segments: Value | None = None  # [1, T'] rows of packed tokens (None: a padded batch)


@dataclass
class _Reduced:
    """A value on reduced tokens: its token axis and its batch axis (None: packed tokens)."""

    value: Value
    axis: int
    stage: _Stage
    batch: int | None = 0

    def moved(self, value: Value, where: Callable[[int], int | None]) -> _Reduced | None:
        """This entry for ``value``, whose axes are ``where(old axis)``; None when the token or
        the batch axis does not survive (folded with another dim, or reduced over)."""
        axis = where(self.axis)
        batch = None if self.batch is None else where(self.batch)
        if axis is None or (self.batch is not None and batch is None):
            return None
        return _Reduced(value, axis, self.stage, batch)


class _Reducer:
    """Re-emits token-wise ops on reduced tokens; unmerges where a reader is not token-wise."""

    def __init__(self, graph: Graph, proportional: bool) -> None:
        self.graph = graph
        self.proportional = proportional
        self.reduced: dict[int, _Reduced] = {}
        self.unmerged: dict[int, Value] = {}
        self.served: list[int] = []
        self.fallbacks: list[str] = []
        self._unmerged_kinds: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------------
    def unmerge(self, anchor: Node | None, value: Value) -> Value:
        """The original-layout value of a reduced one (emitted once, before ``anchor``)."""
        entry = self.reduced[id(value)]
        cached = self.unmerged.get(id(entry.value))
        if cached is None:
            cached = emit_at(
                self.graph,
                anchor,
                "token_unmerge",
                [entry.value, entry.stage.source],
                UnmergeAttrs(axis=entry.axis, batch=entry.batch),
            )
            self.unmerged[id(entry.value)] = cached
        return cached

    def note_unmerged(self, node: Node) -> None:
        """Say (once per op kind) that an op read unmerged tokens."""
        kind = node.attrs.target if node.op == "aten" else node.op
        if node.op not in ("attention", "unpack") and kind not in self._unmerged_kinds:
            self._unmerged_kinds.add(kind)
            self.fallbacks.append(
                f"{kind} reads unmerged tokens (not token-wise, or it mixes them with full-length values)"
            )

    def _common(self, node: Node) -> tuple[_Stage, list[_Reduced]] | None:
        entries = [
            self.reduced[id(v)] for v in node.inputs if v is not None and id(v) in self.reduced
        ]
        stages = {id(e.stage) for e in entries}
        if len(stages) != 1:
            return None
        return entries[0].stage, entries

    # -- one node ------------------------------------------------------------------------------
    def rewrite(self, node: Node) -> bool:
        """Emit the reduced version of ``node`` when it is token-wise over reduced inputs."""
        if len(node.outputs) != 1:
            return False
        common = self._common(node)
        if common is None:
            return False
        op = node.op
        if op in ELEMENTWISE_OPS or (op == "aten" and node.attrs.target in ATEN_POINTWISE):
            return self._elementwise(node)
        if op == "linear":
            return self._linear(node)
        if op in ("reshape", "expand"):
            return self._reshape(node)
        if op == "transpose":
            rank = node.output.tensor_type.rank
            order = list(range(rank))
            d0, d1 = node.attrs.dim0 % rank, node.attrs.dim1 % rank
            order[d0], order[d1] = order[d1], order[d0]
            return self._permuted(node, order)
        if op == "permute":
            rank = node.output.tensor_type.rank
            return self._permuted(node, [d % rank for d in node.attrs.dims])
        if op == "unsqueeze":
            dim = node.attrs.dim % node.output.tensor_type.rank
            return self._same(node, lambda a: a + (1 if dim <= a else 0))
        if op in ("softmax", "log_softmax"):
            entry = self.reduced[id(node.inputs[0])]
            if node.attrs.dim % node.output.tensor_type.rank == entry.axis:
                return False
            return self._same(node, _kept)
        if op == "aten" and node.attrs.target in _NORMS:
            return self._norm(node)
        if op == "aten" and node.attrs.target in ATEN_DIM_ARG:
            return self._dim_op(node)
        if op == "attention":
            return self._attention(node)
        return False

    def _same(self, node: Node, where: Callable[[int], int | None]) -> bool:
        """Re-emit ``node`` on its reduced inputs; an input axis ``a`` is the output's
        ``where(a)`` (checked before anything is emitted)."""
        entry = self.reduced[
            id(next(v for v in node.inputs if v is not None and id(v) in self.reduced))
        ]
        if entry.moved(node.output, where) is None:
            return False
        inputs = [
            self.reduced[id(v)].value if v is not None and id(v) in self.reduced else v
            for v in node.inputs
        ]
        new = emit_before(self.graph, node, node.op, inputs, node.attrs)
        self.reduced[id(node.output)] = entry.moved(new, where)  # type: ignore[assignment]
        return True

    def _elementwise(self, node: Node) -> bool:
        out_rank = node.output.tensor_type.rank
        placed = set()
        for value in node.inputs:
            if value is not None and id(value) in self.reduced:
                entry = self.reduced[id(value)]
                lead = out_rank - value.tensor_type.rank
                placed.add((entry.axis + lead, None if entry.batch is None else entry.batch + lead))
        if len(placed) != 1:
            return False
        axis, batch = placed.pop()
        first = next(v for v in node.inputs if v is not None and id(v) in self.reduced)
        lead = out_rank - first.tensor_type.rank
        for value in node.inputs:
            if value is None or id(value) in self.reduced or not hasattr(value.type, "shape"):
                continue
            position = axis - (out_rank - value.tensor_type.rank)
            if position >= 0 and value.shape[position] != 1:
                return False  # a per-position operand that was not reduced
        if node.op == "aten":
            args, kwargs = aten_call_args(node)
            new_args: list[Any] = []
            for arg in args:
                if isinstance(arg, (list, tuple)) and any(isinstance(a, Value) for a in arg):
                    return False
                if isinstance(arg, Value) and id(arg) in self.reduced:
                    arg = self.reduced[id(arg)].value
                new_args.append(arg)
            if any(isinstance(v, Value) for v in (kwargs or {}).values()):
                return False
            new = emit_aten_before(self.graph, node, node.attrs.target, new_args, kwargs)
            self.reduced[id(node.output)] = _Reduced(
                new, axis, self.reduced[id(first)].stage, batch
            )
            return True
        return self._same(node, lambda a: a + lead)

    def _linear(self, node: Node) -> bool:
        x = node.inputs[0]
        if x is None or id(x) not in self.reduced:
            return False
        if any(v is not None and id(v) in self.reduced for v in node.inputs[1:]):
            return False
        entry = self.reduced[id(x)]
        if entry.axis == x.tensor_type.rank - 1:
            return False
        return self._same(node, _kept)

    def _reshape(self, node: Node) -> bool:
        source = node.inputs[0]
        if source is None or id(source) not in self.reduced:
            return False
        entry = self.reduced[id(source)]
        before, after = tuple(source.shape), tuple(node.output.shape)
        tokens = before[entry.axis]
        position = _token_position(before, after, entry.axis)
        if position is None:
            return False
        shape = list(node.attrs.shape)
        if node.op == "expand" or shape[position] != -1:
            shape[position] = entry.value.shape[entry.axis]
        others = [d for i, d in enumerate(shape) if i != position and isinstance(d, str)]
        if isinstance(tokens, str) and any(
            dim_expr(tokens).free_symbols & dim_expr(d).free_symbols for d in others
        ):
            return False
        where = lambda a: position if a == entry.axis else _token_position(before, after, a)  # noqa: E731
        if entry.moved(node.output, where) is None:
            return False
        attrs = dataclasses.replace(node.attrs, shape=tuple(shape))
        new = emit_before(self.graph, node, node.op, [entry.value], attrs)
        self.reduced[id(node.output)] = entry.moved(new, where)  # type: ignore[assignment]
        return True

    def _permuted(self, node: Node, order: list[int]) -> bool:
        return self._same(node, order.index)

    def _norm(self, node: Node) -> bool:
        args, kwargs = aten_call_args(node)
        x, shape = args[0], args[1]
        if not isinstance(x, Value) or id(x) not in self.reduced:
            return False
        if any(isinstance(a, Value) and id(a) in self.reduced for a in args[2:]):
            return False
        entry = self.reduced[id(x)]
        if entry.axis >= x.tensor_type.rank - len(shape):
            return False
        if entry.batch is not None and entry.batch >= x.tensor_type.rank - len(shape):
            return False
        new = emit_aten_before(
            self.graph, node, node.attrs.target, [entry.value, *args[1:]], kwargs
        )
        self.reduced[id(node.output)] = entry.moved(new, _kept)  # type: ignore[assignment]
        return True

    def _dim_op(self, node: Node) -> bool:
        target = node.attrs.target
        args, kwargs = aten_call_args(node)
        position = ATEN_DIM_ARG[target]
        source = args[0]
        parts = list(source) if isinstance(source, (list, tuple)) else [source]
        if position >= len(args) or not all(
            isinstance(p, Value) and id(p) in self.reduced for p in parts
        ):
            return False
        entries = [self.reduced[id(p)] for p in parts]
        if len({(e.axis, e.batch, id(e.stage)) for e in entries}) != 1:
            return False
        rank = parts[0].tensor_type.rank
        dims = args[position]
        listed = {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        squeezed = target in (
            "aten.mean.dim",
            "aten.sum.dim_IntList",
            "aten.amax.default",
        ) and not ((len(args) > 2 and bool(args[2])) or bool((kwargs or {}).get("keepdim")))

        def where(a: int) -> int | None:
            if a in listed:
                return None  # reduced, normalised, concatenated or sliced along
            return a - sum(1 for d in listed if d < a) if squeezed else a

        if entries[0].moved(node.output, where) is None:
            return False
        if any(isinstance(a, Value) for a in args[1:]):
            return False
        new_args = list(args)
        new_args[0] = (
            [e.value for e in entries] if isinstance(source, (list, tuple)) else entries[0].value
        )
        new = emit_aten_before(self.graph, node, target, new_args, kwargs)
        self.reduced[id(node.output)] = entries[0].moved(new, where)  # type: ignore[assignment]
        return True

    def _attention(self, node: Node) -> bool:
        ops = AttentionOperands.of(node.inputs)
        mask, bias = ops.mask, ops.bias
        attrs = node.attrs
        entries = [self.reduced.get(id(x)) for x in (ops.q, ops.k, ops.v)]
        packed = entries[0] is not None and entries[0].batch is None
        reason = None
        if any(e is None or e.axis != 2 for e in entries):
            reason = "queries, keys and values are not all reduced"
        elif len({id(e.stage) for e in entries}) != 1:  # type: ignore[union-attr]
            reason = "queries and keys come from different reductions"
        elif bias is not None or ops.kv_counts is not None or ops.kv_indices is not None:
            reason = "a bias or block metadata"
        elif packed != (ops.segments is not None) or (packed and mask is not None):
            reason = "packed tokens without their segments, or with a mask"
        elif attrs.causal or attrs.mask_causal:
            reason = "causal (merging breaks causality)"
        elif mask is not None and attrs.mask_kind not in _KEY_MASKS:
            reason = f"a mask beyond key padding ({attrs.mask_kind})"
        elif attrs.variant not in ("dense", "linear"):
            reason = f"the {attrs.variant} variant needs token positions"
        if reason is not None:
            self.fallbacks.append(f"site {attrs.site}: runs on unmerged tokens ({reason})")
            return False
        stage = entries[0].stage  # type: ignore[union-attr]
        if packed:  # sizes are never 0 here: log(size) is a finite key mask, as the kernel takes
            sized = self._bias(node, stage) if self.proportional else None
            inputs = [e.value for e in entries] + [sized, None, None, None, stage.segments]  # type: ignore[union-attr]
            new = emit_before(self.graph, node, "attention", inputs, attrs)
            new.producer.meta.update(node.meta)  # type: ignore[union-attr]
            packing = next(iter(self.graph.find("token_index")), None)
            if packing is not None:
                tap = self.graph.make_node(
                    "site_tap",
                    [new, stage.source, packing.outputs[0], packing.inputs[0]],
                    SiteTapAttrs(site=attrs.site, batch=None),
                )
                self.graph.insert_before(node, tap)
            self.reduced[id(node.output)] = _Reduced(new, 2, stage, None)
            self.served.append(attrs.site)
            return True
        new_mask = None if mask is None else self._mask(node, mask, stage)
        if mask is not None and new_mask is None:
            self.fallbacks.append(f"site {attrs.site}: its padding mask cannot be rebuilt")
            return False
        new_bias = self._bias(node, stage) if self.proportional else None
        inputs = [e.value for e in entries] + [new_mask, new_bias]  # type: ignore[union-attr]
        new = emit_before(self.graph, node, "attention", inputs, attrs)
        new.producer.meta.update(node.meta)  # type: ignore[union-attr]
        tap = self.graph.make_node("site_tap", [new, stage.source], SiteTapAttrs(site=attrs.site))
        self.graph.insert_before(node, tap)
        self.reduced[id(node.output)] = _Reduced(new, 2, stage)
        self.served.append(attrs.site)
        return True

    def _mask(self, node: Node, mask: Value, stage: _Stage) -> Value | None:
        """The site's key padding mask over the reduced tokens (size 0: padding), in the mask's
        own form (bool, or ``where(keep, 0, fill)``)."""
        cached = stage.masks.get(id(mask))
        if cached is not None:
            return cached
        form = mask.producer
        if mask.dtype != torch.bool and (
            form is None
            or form.op != "where"
            or any(x is None or x.tensor_type.rank and set(x.shape) != {1} for x in form.inputs[1:])
        ):
            return None
        positive = emit_aten_before(self.graph, node, "aten.gt.Scalar", [stage.size, 0.0])
        batch = stage.size.shape[0]
        keep = emit_before(
            self.graph, node, "reshape", [positive], ShapeAttrs(shape=(batch, 1, 1, stage.tokens))
        )
        if mask.dtype != torch.bool:
            assert form is not None
            keep = emit_before(self.graph, node, "where", [keep, *form.inputs[1:]], form.attrs)
        stage.masks[id(mask)] = keep
        return keep

    def _bias(self, node: Node, stage: _Stage) -> Value:
        """``log(size)`` as a ``[B, 1, 1, N']`` additive bias (proportional attention; ``B = 1``
        for packed tokens)."""
        if stage.bias is None:
            logs = emit_aten_before(self.graph, node, "aten.log.default", [stage.size])
            batch = 1 if stage.segments is not None else stage.size.shape[0]
            stage.bias = emit_before(
                self.graph, node, "reshape", [logs], ShapeAttrs(shape=(batch, 1, 1, stage.tokens))
            )
        return stage.bias


def _kept(axis: int) -> int:
    """An op that keeps every axis where it is."""
    return axis


def _token_position(before: tuple, after: tuple, axis: int) -> int | None:
    """Where the token axis of ``before`` is in the reshape/expand ``after``: the dim of the
    same size whose leading dims hold as many elements (None: the tokens are split or folded)."""
    try:
        lead = dim_expr(1)
        for d in before[:axis]:
            lead *= dim_expr(d)
        tokens = dim_expr(before[axis])
        running = dim_expr(1)
        for position, d in enumerate(after):
            if (running - lead).expand() == 0 and (dim_expr(d) - tokens).expand() == 0:
                return position
            running *= dim_expr(d)
    except (TypeError, ValueError):
        return None
    return None


def _merge_point(site: Site, users: dict[Value, list[Node]]) -> Value | None:
    """The value between a site's attention block and its MLP: after the residual add, the first
    one read twice (by the MLP and by the next residual)."""
    value = site.node.output
    residual = False
    for _ in range(32):
        readers = [n for n in users.get(value, []) if n.op != "site_tap"]  # observers
        if residual and len(readers) >= 2:
            return value
        if len(readers) != 1 or len(readers[0].outputs) != 1:
            return None
        node = readers[0]
        if node.op in _RESIDUAL or (node.op == "aten" and node.attrs.target == "aten.add.Tensor"):
            residual = True
        value = node.output
    return None


def _site_refusal(site: Site) -> str | None:
    """Why a site cannot be the place of a reduction (None: it can)."""
    attrs = site.attrs
    if attrs.causal or attrs.mask_causal or "causal" in (attrs.mask_kind or ""):
        return "causal attention: merging or pruning tokens breaks causality"
    if site.q_len != site.kv_len or site.q.tensor_type.rank != 4:
        return "cross-attention (queries and keys differ)"
    if site.mask is not None and attrs.mask_kind not in _KEY_MASKS:
        return f"a mask beyond key padding ({attrs.mask_kind or 'unanalysed'})"
    if site.bias is not None:
        return "an attention bias (relative positions) would need reducing too"
    keep = key_padding_keep(site.mask)
    if site.mask is not None and (
        keep is None or keep.tensor_type.rank != 4 or tuple(keep.shape[1:3]) != (1, 1)
    ):
        return "the key padding mask is not a [B, 1, 1, S] mask"
    return None


class _TokenPass(Pass):
    """What token merging and pruning share: site choice, the merge points and the rewrite."""

    exact: ClassVar[bool] = False
    layers: tuple[int, ...] | None = None
    protect: int = 1

    def _reduction(
        self, graph: Graph, anchor: Node | None, site: Site, x: Value, q: Value, k: Value,
        size: Value | None, valid: Value | None, source: Value | None, n: int | str, hint: int,
        symbol: str, stages: int, segments: Value | None,
    ) -> tuple[Node, int | str, int]:  # fmt: skip
        """Insert the reduction op before ``anchor``: ``(node, tokens out, tokens at the
        example)``; ``stages`` is the number of reductions the pass makes; ``segments`` the rows
        of packed tokens (None: a padded batch)."""
        raise NotImplementedError

    def _record(self, site: Site, before: int, after: int) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Insert the reductions at the chosen sites and run everything after on fewer tokens."""
        notes: list[str] = []
        declined: list[tuple[int, str]] = []
        chosen = sites_for(graph, self, variant=None)
        if self.layers is not None:
            present = {
                site.layer
                for site in sites_for(graph, dataclasses.replace(self, layers=None), variant=None)
            }
            missing = sorted(set(self.layers) - present)
            if missing:
                raise PipelineError(
                    f"{self.name}: option layers={list(self.layers)} names layers {missing} the "
                    f"model does not have (its attention layers: {sorted(i for i in present if i is not None)})"
                )
        users = graph.users()
        points: dict[int, Site] = {}
        for site in chosen:
            reason = _site_refusal(site)
            point = None if reason else _merge_point(site, users)
            packed = AttentionOperands.of(site.node.inputs).segments is not None
            if reason is None and (point is None or point.tensor_type.rank != (2 if packed else 3)):
                reason = "no value between the attention block and its MLP was found"
            elif point is not None and point.shape[0 if packed else 1] != site.q_len:
                reason = "the block's output does not have the attention's tokens"
            if reason is not None:
                decline(notes, declined, site.index, f"tokens not reduced: {reason}")
                continue
            points[id(point)] = site
        if not points:
            return PassResult(changed=False, notes=notes, declined=declined)
        snapshot = graph.copy()
        try:
            return self._rewrite(graph, ctx, points, notes, declined, snapshot)
        except PipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - any inconsistency: leave the model as it was
            _restore(graph, snapshot)
            reason = (
                f"the rewrite failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            )
            for site in points.values():
                decline(notes, declined, site.index, f"tokens not reduced: {reason}")
            return PassResult(changed=False, notes=notes, declined=declined)

    def _rewrite(
        self,
        graph: Graph,
        ctx: PassContext,
        points: dict[int, Site],
        notes: list[str],
        declined: list[tuple[int, str]],
        snapshot: Graph,
    ) -> PassResult:
        """The reductions at ``points`` (merge point value id -> site) and everything after."""
        hints = graph.meta.setdefault("symbol_hints", {})
        reducer = _Reducer(graph, proportional=getattr(self, "proportional", False))
        stage: _Stage | None = None
        created: set[int] = set()
        reductions: list[tuple[Site, int, int]] = []
        valid = None
        for node in list(graph.nodes):
            if id(node) in created or node.op == "param":
                continue
            if node.op == "site_tap" and any(
                v is not None and id(v) in reducer.reduced for v in node.inputs
            ):
                graph.erase(node)  # the reduced site has its own tap
                continue
            index = graph.nodes.index(node)
            count = len(graph.nodes)
            if not reducer.rewrite(node):
                for position, value in enumerate(node.inputs):
                    if value is not None and id(value) in reducer.reduced:
                        node.inputs[position] = reducer.unmerge(node, value)
                        reducer.note_unmerged(node)
            created.update(id(n) for n in graph.nodes[index : index + len(graph.nodes) - count])
            site = points.get(id(node.outputs[0])) if node.outputs else None
            if site is None:
                continue
            point = node.outputs[0]
            entry = reducer.reduced.get(id(point))
            if stage is None:
                valid = key_padding_keep(site.mask)
            x = entry.value if entry is not None else point
            q = reducer.reduced[id(site.q)].value if id(site.q) in reducer.reduced else site.q
            k = reducer.reduced[id(site.k)].value if id(site.k) in reducer.reduced else site.k
            inputs_reduced = all(
                (stage is None and id(v) not in reducer.reduced)
                or (
                    stage is not None
                    and getattr(reducer.reduced.get(id(v)), "stage", None) is stage
                )
                for v in (site.q, site.k)
            )
            if (
                (stage is None) != (entry is None)
                or (entry is not None and entry.stage is not stage)
                or not inputs_reduced
            ):
                decline(
                    notes,
                    declined,
                    site.index,
                    "tokens not reduced: a reduction before it fell back",
                )
                continue
            segments = (
                AttentionOperands.of(site.node.inputs).segments if stage is None else stage.segments
            )
            n = x.shape[0 if segments is not None else 1]
            hint = evaluate_dim(n, hints) if isinstance(n, str) else n
            symbol = _fresh_symbol(hints)
            position = graph.nodes.index(node) + 1
            anchor = graph.nodes[position] if position < len(graph.nodes) else None
            op, tokens, new_hint = self._reduction(
                graph, anchor, site, x, q, k,
                None if stage is None else stage.size,
                valid if stage is None else None,
                None if stage is None else stage.source,
                n, hint, symbol, len(points), segments,
            )  # fmt: skip
            created.add(id(op))
            if isinstance(tokens, str):
                hints[tokens] = new_hint
            outputs = op.outputs
            rows = outputs[3] if segments is not None else None
            stage = _Stage(outputs[1], outputs[2], tokens, new_hint, segments=rows)
            reducer.reduced[id(point)] = _Reduced(
                outputs[0], 0 if rows is not None else 1, stage, None if rows is not None else 0
            )
            reductions.append((site, hint, new_hint))
        for position, value in enumerate(graph.outputs):
            if value is not None and id(value) in reducer.reduced:
                graph.outputs[position] = reducer.unmerge(None, value)
        if not reductions:
            _restore(graph, snapshot)
            return PassResult(changed=False, notes=notes, declined=declined)
        graph.dead_code_elimination()
        graph.infer_types()
        verify(graph)
        notes.extend(reducer.fallbacks)
        original = reductions[0][1]
        for site, before, after in reductions:
            notes.append(f"site {site.index}: {before} -> {after} tokens at the example")
            ctx.record(self, site, self._record(site, before, after))
        _mark_tokens(graph, hints, original)
        return PassResult(changed=True, rewrites=len(reductions), notes=notes, declined=declined)


def _restore(graph: Graph, snapshot: Graph) -> None:
    graph.nodes = snapshot.nodes
    graph.inputs, graph.outputs = snapshot.inputs, snapshot.outputs
    graph.meta.clear()
    graph.meta.update(snapshot.meta)


def _fresh_symbol(hints: dict[str, int]) -> str:
    index = 0
    while f"ntr{index}" in hints:
        index += 1
    return f"ntr{index}"


def _mark_tokens(graph: Graph, hints: dict[str, int], original: int) -> None:
    """``tokens_kept`` of each site: its query tokens over the original count, at the example."""
    for node in graph.find("attention"):
        q_len = node.inputs[0].shape[2]  # type: ignore[union-attr]
        try:
            tokens = evaluate_dim(q_len, hints) if isinstance(q_len, str) else q_len
        except KeyError:
            continue
        if tokens < original:
            node.meta.setdefault("site", {})["tokens_kept"] = round(tokens / original, 4)


@dataclass(frozen=True)
class TokenMerge(_TokenPass):
    """ToMe: merge similar tokens between the attention and the MLP of chosen layers (lossy;
    ``r=0`` or ``ratio=1`` is exact).

    Options:
        ratio: fraction of the tokens kept after the last chosen layer (each chosen layer keeps
            ``ratio ** (1 / layers)`` of its tokens); used when ``r`` is not given.
        r: tokens merged at each chosen layer (capped at the unprotected half of the tokens).
        layers: layer indices to merge after (None: every layer).
        sites: site indices (None: all).
        protect: leading tokens that never merge (CLS; 0 for none).
        proportional: add ``log(size)`` to the attention scores after a merge, so a merged
            token counts as the tokens it stands for (recommended for off-the-shelf models).
    """

    name: ClassVar[str] = "token-merge"
    ratio: float | None = None
    r: int | None = None
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None
    protect: int = 1
    proportional: bool = True

    def validate(self) -> None:
        """``ratio`` in (0, 1], ``r`` and ``protect`` >= 0, not both ``ratio`` and ``r``."""
        super().validate()
        check_fraction(self.name, "ratio", self.ratio)
        check_positive(self.name, "r", self.r, allow_zero=True)
        check_positive(self.name, "protect", self.protect, allow_zero=True)
        if self.ratio is not None and self.r is not None:
            raise PipelineError(f"{self.name}: give ratio or r, not both")
        _check_layers(self.name, self.layers)

    def _keep(self, stages: int) -> float:
        """Fraction of its tokens each of ``stages`` merges keeps."""
        ratio = 0.5 if self.ratio is None else self.ratio
        return ratio ** (1.0 / max(1, stages))

    def _reduction(
        self, graph: Graph, anchor: Node | None, site: Site, x: Value, q: Value, k: Value,
        size: Value | None, valid: Value | None, source: Value | None, n: int | str, hint: int,
        symbol: str, stages: int, segments: Value | None,
    ) -> tuple[Node, int | str, int]:  # fmt: skip
        """Insert the reduction op (see :meth:`_TokenPass._reduction`)."""
        if self.r is not None:
            attrs = TokenMergeAttrs(r=self.r, protect=self.protect, symbol=symbol)
        else:
            attrs = TokenMergeAttrs(keep=self._keep(stages), protect=self.protect, symbol=symbol)
        merged = merge_count(hint, attrs)
        if self.r is not None and self.r > merged and size is None and segments is None:
            # the first merge sees the whole input; later ones cap r at their mergeable half
            raise PipelineError(
                f"{self.name}: option r={self.r} is larger than the {merged} tokens that can "
                f"merge at site {site.index} ({hint} tokens, {self.protect} protected): "
                f"use r <= {merged} or ratio="
            )
        if segments is not None:  # packed rows: each merges its own share (hint: a guess)
            node = graph.make_node("token_merge_packed", [x, k, size, source, segments], attrs)
            _place(graph, node, anchor)
            return node, symbol, max(2, hint - merged)
        tokens: int | str = reduced_tokens(n, attrs) if isinstance(n, int) else symbol
        node = graph.make_node("token_merge", [x, k, size, valid, source], attrs)
        _place(graph, node, anchor)
        return node, tokens, hint - merged

    def _record(self, site: Site, before: int, after: int) -> dict[str, Any]:
        if self.r is not None:
            return {"r": self.r, "tokens": [before, after]}
        return {"keep": round(after / before, 6), "tokens": [before, after]}


@dataclass(frozen=True)
class TokenPrune(_TokenPass):
    """EViT: keep the tokens the CLS token (or every query) attends to most, fuse the rest into
    one token, between the attention and the MLP of chosen layers (lossy; ``keep=1`` is exact).

    Options:
        keep: fraction of the unprotected tokens kept at each chosen layer.
        layers: layer indices to prune after (None: every layer).
        sites: site indices (None: all).
        protect: leading tokens always kept (the CLS token is token 0).
        fuse: fuse the pruned tokens into one token weighted by their attention (else drop).
        rank: ``cls`` (the attention token 0 gives) or ``received`` (attention received from
            every real query: mean-pooled encoders without a CLS token).
    """

    name: ClassVar[str] = "token-prune"
    keep: float = 0.7
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None
    protect: int = 1
    fuse: bool = True
    rank: str = "cls"

    def validate(self) -> None:
        """``keep`` in (0, 1], ``protect`` >= 0, ``rank`` known."""
        super().validate()
        check_fraction(self.name, "keep", self.keep)
        check_positive(self.name, "protect", self.protect, allow_zero=True)
        if self.rank not in ("cls", "received"):
            raise PipelineError(f"{self.name}: option rank={self.rank!r} must be cls or received")
        if self.rank == "cls" and self.protect < 1:
            raise PipelineError(
                f"{self.name}: rank=cls needs the CLS token protected (protect >= 1); "
                "use rank=received for models without one"
            )
        _check_layers(self.name, self.layers)

    def _reduction(
        self, graph: Graph, anchor: Node | None, site: Site, x: Value, q: Value, k: Value,
        size: Value | None, valid: Value | None, source: Value | None, n: int | str, hint: int,
        symbol: str, stages: int, segments: Value | None,
    ) -> tuple[Node, int | str, int]:  # fmt: skip
        """Insert the reduction op (see :meth:`_TokenPass._reduction`)."""
        attrs = TokenPruneAttrs(
            keep=self.keep, protect=self.protect, fuse=self.fuse, rank=self.rank,
            scale=site.attrs.scale if site.attrs.scale is not None else q.shape[-1] ** -0.5,
            symbol=symbol,
        )  # fmt: skip
        if self.protect >= hint:
            raise PipelineError(
                f"{self.name}: option protect={self.protect} is not shorter than the "
                f"{hint} tokens at site {site.index}"
            )
        if segments is not None:  # packed rows: each keeps its own share (hint: a guess)
            node = graph.make_node("token_prune_packed", [x, q, k, size, source, segments], attrs)
            _place(graph, node, anchor)
            return node, symbol, max(2, math.ceil(hint * self.keep))
        tokens: int | str = reduced_tokens(n, attrs) if isinstance(n, int) else symbol
        node = graph.make_node("token_prune", [x, q, k, size, valid, source], attrs)
        _place(graph, node, anchor)
        return node, tokens, reduced_tokens(hint, attrs)

    def _record(self, site: Site, before: int, after: int) -> dict[str, Any]:
        return {"keep": self.keep, "tokens": [before, after]}


def _place(graph: Graph, node: Node, anchor: Node | None) -> None:
    if anchor is None:
        graph.append(node)
    else:
        graph.insert_before(anchor, node)


def _check_layers(owner: str, layers: tuple[int, ...] | None) -> None:
    if layers is not None and (not layers or min(layers) < 0):
        raise PipelineError(f"{owner}: option layers={list(layers)} must be layer indices >= 0")
