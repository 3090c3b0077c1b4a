"""The ``attention`` op: one node per attention site, sparsity and linearization as attributes.

Entry points: :class:`AttentionAttrs`, :data:`VARIANTS`.

Inputs: ``q [B,Hq,Sq,D]``, ``k [B,Hkv,Sk,D]``, ``v [B,Hkv,Sk,Dv]``, then optional ``mask``
(bool, True = may attend, or additive float) and ``bias`` (additive float), both broadcastable to
``[B,Hq,Sq,Sk]``, then for static block sparsity ``kv_counts`` and ``kv_indices``, then for packed
documents ``segments`` (int ``[B, S]``: a query sees a key only when their segment ids are equal);
:class:`AttentionOperands` names them (never decode the list by position). The exact semantics are
in docs/attention-op.md. The op's implementation is :func:`reference_attention`, plain torch for
every variant, built from the variant definitions in :mod:`attnopt.ir.attention_reference`,
:mod:`attnopt.ir.block_sparse` (with :mod:`attnopt.ir.block_routing`),
:mod:`attnopt.ir.neighborhood` and :mod:`attnopt.ir.linear_attention`. Fast kernels live in the
runtime and are tested against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from attnopt.ir.attention_reference import attention_reference, visible_keys_mask
from attnopt.ir.block_routing import apply_permutation, permute_for_sparsity, route_blocks
from attnopt.ir.block_sparse import BlockMeta, block_meta_visible
from attnopt.ir.linear_attention import (
    FeatureMap,
    feature_map_for,
    hybrid_attention_reference,
    linear_attention_reference,
)
from attnopt.ir.neighborhood import neighborhood_visible
from attnopt.ir.ops import Cost, OpDef, register_op
from attnopt.ir.types import TensorType, Type

VARIANTS = ("dense", "sliding_window", "block_sparse", "neighborhood", "linear", "hybrid")


@dataclass(frozen=True)
class AttentionAttrs:
    """Attributes of ``attention``. Fields beyond ``softcap`` apply to one variant each.

    Attributes:
        scale: scores are ``scale * q @ k^T``.
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping value, or None.
        mask_causal: detection proved that the mask lets no query see a key the (bottom-right)
            causal rule hides; lossy passes treat the site as causal. The mask still applies.
        site: index of the attention site in the model (-1: not a detected site).
        variant: one of :data:`VARIANTS`.
        heads: query heads that run ``variant``; the others run dense (empty: all heads).
        window_left: sliding window: keys visible before the aligned position (None: all).
        window_right: sliding window: keys visible after it (None: all).
        sinks: leading keys visible to every query (sliding window, block sparse).
        block: block size of block-sparse attention (keys; queries too unless query_block).
        query_block: block sparse: query rows per block (0: same as ``block``).
        density: block sparse: fraction of key blocks kept per query block.
        threshold: block sparse: cumulative pooled-score mass to keep (instead of density).
        routing: block sparse: "topk", "threshold" (content routing at run time) or "static".
        keep_local: block sparse: always keep the diagonal block.
        min_len: dense below this key length (the dense/sparse switch).
        permute_keys: block sparse: reorder keys/values by importance before routing (PBS-Attn).
        grid: neighbourhood: token grid (H, W) or (T, H, W).
        kernel: neighbourhood: window size per grid dim.
        dilation: neighbourhood dilation.
        num_global: leading tokens that stay global (CLS, registers).
        feature_map: linear/hybrid: "elu", "relu", "favor", "cosformer".
        num_features: linear/hybrid: random features for "favor".
        seed: linear/hybrid: seed for random features.
        local_window: hybrid: exact softmax within this distance.
        mask_kind: what mask analysis proved about the site's masks, ``+``-joined from
            ``causal``, ``sliding_window``, ``key_padding``, ``key_mask``, ``documents`` and
            ``mask`` (an unproven remainder); ``none`` without masks ("" before analysis).
        nan_weights_zero: a weight that is NaN counts as 0, as in
            ``where(isnan(softmax(s)), 0, softmax(s)) @ v`` (how exporters decompose SDPA):
            a row of weights that softmax made NaN (NaN in its scores, inputs or mask) gives
            ``0 @ v`` instead of NaN. Finite inputs never differ (a row with no visible key is
            zeros either way).
    """

    scale: float = 1.0
    causal: bool = False
    softcap: float | None = None
    mask_causal: bool = False
    site: int = -1
    variant: str = "dense"
    heads: tuple[int, ...] = ()
    window_left: int | None = None
    window_right: int | None = None
    sinks: int = 0
    block: int = 64
    query_block: int = 0
    density: float | None = None
    threshold: float | None = None
    routing: str = "topk"
    keep_local: bool = True
    min_len: int = 0
    permute_keys: bool = False
    grid: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    dilation: int = 1
    num_global: int = 0
    feature_map: str = "elu"
    num_features: int = 0
    seed: int = 0
    local_window: int | None = None
    mask_kind: str = ""
    nan_weights_zero: bool = False


def _infer(types: list[Type | None], attrs: AttentionAttrs) -> list[Type]:
    q, v = types[0], types[2]
    assert isinstance(q, TensorType) and isinstance(v, TensorType)
    return [TensorType((*q.shape[:-1], v.shape[-1]), q.dtype)]


def _cost(inputs: list[Type | None], outputs: list[Type], attrs: AttentionAttrs) -> Cost:
    q, k, v = inputs[0], inputs[1], inputs[2]
    assert isinstance(q, TensorType) and isinstance(k, TensorType) and isinstance(v, TensorType)
    if not (q.is_static and k.is_static and v.is_static):
        return Cost(0.0, 0.0)
    batch, heads, q_len, head_dim = q.shape  # type: ignore[misc]
    kv_len, dim_v = int(k.shape[2]), int(v.shape[3])
    pairs = float(q_len) * kv_len  # type: ignore[arg-type]
    if attrs.causal:
        pairs -= float(q_len) * (q_len - 1) / 2  # type: ignore[operator]
    pairs *= kept_fraction(attrs, int(q_len), kv_len)  # type: ignore[arg-type]
    flops = 2.0 * batch * heads * pairs * (head_dim + dim_v)  # type: ignore[operator]
    if attrs.variant == "linear":
        features = attrs.num_features or int(head_dim)  # type: ignore[arg-type]
        flops = 4.0 * batch * heads * (int(q_len) + kv_len) * features * dim_v  # type: ignore[operator]
    moved = sum(t.nbytes() for t in (q, k, v, outputs[0]) if isinstance(t, TensorType))
    return Cost(flops=flops, bytes=float(moved))


def kept_fraction(attrs: AttentionAttrs, q_len: int, kv_len: int) -> float:
    """Fraction of query-key pairs a variant computes, from its attributes (an estimate for
    content-routed variants, whose kept blocks are only known at run time)."""
    if attrs.variant == "sliding_window":
        width = (attrs.window_left or kv_len) + (attrs.window_right or 0) + 1 + attrs.sinks
        return min(1.0, width / max(kv_len, 1))
    if attrs.variant == "block_sparse" and attrs.density is not None:
        return attrs.density
    if attrs.variant == "neighborhood" and attrs.kernel:
        return min(1.0, (math.prod(attrs.kernel) + attrs.num_global) / max(kv_len, 1))
    if attrs.variant == "hybrid" and attrs.local_window is not None:
        return min(1.0, (2 * attrs.local_window + 1) / max(kv_len, 1))
    return 1.0


class AttentionOperands(NamedTuple):
    """The operands of one ``attention`` node (or call), by name.

    Attributes:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: bool (True = may attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``, or None.
        bias: additive, broadcastable to ``[B, Hq, Sq, Sk]``, or None.
        kv_counts: static block sparsity: int32 ``[Bm, Hm, nQB]``, or None.
        kv_indices: static block sparsity: int32 ``[Bm, Hm, nQB, max_kv]``, or None.
        segments: packed documents: integer ``[B, S]`` segment ids of the queries and keys
            (self-attention); a query sees a key only when their ids are equal. Or None.
    """

    q: Any
    k: Any
    v: Any
    mask: Any = None
    bias: Any = None
    kv_counts: Any = None
    kv_indices: Any = None
    segments: Any = None

    @classmethod
    def of(cls, inputs: Sequence[Any]) -> AttentionOperands:
        """Name a positional operand list
        ``[q, k, v, mask?, bias?, kv_counts?, kv_indices?, segments?]``.

        Args:
            inputs: the node's inputs (tensors at run time, IR values in passes).

        Returns:
            The named operands (absent trailing ones are None).
        """
        if len(inputs) < 3 or len(inputs) > len(cls._fields):
            raise ValueError(f"attention takes 3 to {len(cls._fields)} operands, got {len(inputs)}")
        return cls(*inputs)

    def single_documents(self) -> AttentionOperands:
        """Without ``segments`` when every batch row is one document (the common case of a
        model that checks for packed sequences and finds none): the same attention."""
        seg = self.segments
        if seg is None or bool((seg == seg[:, :1]).all()):
            return self._replace(segments=None)
        return self

    def per_document(self, fn: Callable[[AttentionOperands], torch.Tensor]) -> torch.Tensor:
        """``fn`` run on each document (each run of equal segment ids in a row) on its own, for
        variants that take key masks only (linear, hybrid). Segment ids must be contiguous."""
        q, v, seg = self.q, self.v, self.segments
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        for b in range(q.shape[0]):
            ids = seg[b if seg.shape[0] > 1 else 0]
            changes = (ids[1:] != ids[:-1]).nonzero().flatten().tolist()
            bounds = [0, *(c + 1 for c in changes), ids.shape[0]]
            if len(set(ids[bounds[i]].item() for i in range(len(bounds) - 1))) != len(bounds) - 1:
                raise ValueError("documents must be contiguous runs of segment ids")
            for start, end in zip(bounds[:-1], bounds[1:]):
                mask = self.mask
                part = AttentionOperands(
                    _cut(q, b, 2, start, end),
                    _cut(self.k, b, 2, start, end),
                    _cut(v, b, 2, start, end),
                    None if mask is None else _cut(mask, b, 3, start, end),
                )
                out[b : b + 1, :, start:end] = fn(part)
        return out

    def without_segments(self) -> AttentionOperands:
        """The same attention with the document rule folded into the mask (no ``segments``).

        For kernels that do not skip between documents: exact, but computes every block.
        """
        if self.segments is None:
            return self
        seg = self.segments
        same = (seg[:, None, :, None] == seg[:, None, None, :]).to(self.q.device)
        mask = self.mask
        if mask is None:
            combined = same
        elif mask.dtype == torch.bool:
            combined = mask & same
        else:
            combined = mask.to(self.q.dtype).masked_fill(~same, float("-inf"))
        return self._replace(mask=combined, segments=None)

    def as_list(self) -> list[Any]:
        """The positional operand list, trailing None operands dropped."""
        items = list(self)
        while len(items) > 3 and items[-1] is None:
            items.pop()
        return items


def _cut(t: Any, row: int, axis: int, start: int, end: int) -> Any:
    """Row ``row`` (kept as a batch of one) of ``t`` narrowed to ``[start, end)`` along ``axis``
    (size-1 dims broadcast and stay)."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t[row : row + 1] if t.shape[0] > 1 else t
    return t.narrow(axis, start, end - start) if t.shape[axis] > 1 else t


def block_meta_of(
    operands: AttentionOperands,
    attrs: AttentionAttrs,
    small_ops: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> BlockMeta:
    """The block metadata of a ``block_sparse`` call: its static operands, or routed now.

    Args:
        operands: the call's operands (tensors).
        attrs: the node's attributes.
        small_ops: context for the small block computations of routing (see
            :func:`attnopt.ir.block_routing.route_blocks`).

    Returns:
        The :class:`~attnopt.ir.block_sparse.BlockMeta`.
    """
    if attrs.routing == "static":
        if operands.kv_counts is None or operands.kv_indices is None:
            raise ValueError("static block-sparse attention needs kv_counts and kv_indices inputs")
        return BlockMeta(
            attrs.query_block or attrs.block, attrs.block, operands.kv_counts, operands.kv_indices
        )
    return route_blocks(
        operands.q,
        operands.k,
        block=attrs.block,
        density=attrs.density if attrs.routing == "topk" else None,
        threshold=attrs.threshold if attrs.routing == "threshold" else None,
        keep_local=attrs.keep_local,
        sinks=attrs.sinks,
        causal=attrs.causal,
        mask=operands.mask,
        scale=attrs.scale,
        block_q=attrs.query_block or None,
        small_ops=small_ops,
    )


def feature_map_of(attrs: AttentionAttrs, head_dim: int) -> FeatureMap:
    """The feature map of a ``linear`` / ``hybrid`` node (built once per configuration).

    Args:
        attrs: the node's attributes.
        head_dim: query/key head dimension.

    Returns:
        The :class:`~attnopt.ir.linear_attention.FeatureMap`.
    """
    return feature_map_for(
        attrs.feature_map,
        head_dim,
        num_features=attrs.num_features,
        seed=attrs.seed,
        scale=attrs.scale,
    )


def effective_variant(attrs: AttentionAttrs, kv_len: int) -> str:
    """The variant a call runs as: ``dense`` below ``min_len`` keys, else ``attrs.variant``."""
    if attrs.variant != "dense" and kv_len < attrs.min_len:
        return "dense"
    return attrs.variant


def variant_heads(attrs: AttentionAttrs, num_heads: int) -> tuple[int, ...] | None:
    """The query heads that run the variant when only some do (the rest run dense), else None."""
    if attrs.heads and len(set(attrs.heads)) < num_heads:
        return tuple(sorted(set(attrs.heads)))
    return None


def _visibility(operands: AttentionOperands, attrs: AttentionAttrs, variant: str) -> Any:
    """The bool visibility a sparse variant adds to the dense rule (None: none)."""
    q, k = operands.q, operands.k
    q_len, kv_len = q.shape[2], k.shape[2]
    if variant == "sliding_window":
        return visible_keys_mask(
            q_len,
            kv_len,
            window_left=attrs.window_left,
            window_right=attrs.window_right,
            sinks=attrs.sinks,
            device=q.device,
        )
    if variant == "neighborhood":
        return neighborhood_visible(
            attrs.grid, attrs.kernel, attrs.dilation, attrs.num_global, device=q.device
        )
    meta = block_meta_of(operands, attrs)
    return block_meta_visible(meta, q_len, kv_len)


def reference_attention(inputs: Sequence[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """One ``attention`` node computed naively (full score matrices), for any variant.

    This is the op's definition: every kernel is checked against it. ``block_sparse`` with
    ``permute_keys`` routes on the permuted keys and attends to the same blocks of them.

    Args:
        inputs: the node's operands (see :class:`AttentionOperands`).
        attrs: the node's attributes.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    operands = AttentionOperands.of(inputs)
    q, k, v = operands.q, operands.k, operands.v
    if q.device.type == "meta":
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    operands = operands.single_documents()
    variant = effective_variant(attrs, k.shape[2])
    if operands.segments is not None and variant in ("linear", "hybrid"):
        return operands.per_document(lambda part: reference_attention(part.as_list(), attrs))
    operands = operands.without_segments()
    dense = {
        "scale": attrs.scale,
        "causal": attrs.causal,
        "softcap": attrs.softcap,
        "nan_weights_zero": attrs.nan_weights_zero,
    }
    if variant == "dense":
        return attention_reference(q, k, v, mask=operands.mask, bias=operands.bias, **dense)
    heads = variant_heads(attrs, q.shape[1])
    if heads is not None:
        full = attention_reference(q, k, v, mask=operands.mask, bias=operands.bias, **dense)
        group = q.shape[1] // k.shape[1]
        sub = _head_subset(operands, heads, group)
        full[:, list(heads)] = reference_attention(
            sub.as_list(), dataclasses.replace(attrs, heads=())
        )
        return full
    if variant in ("linear", "hybrid"):
        fmap = feature_map_of(attrs, q.shape[-1])
        if variant == "linear":
            return linear_attention_reference(
                q, k, v, fmap, causal=attrs.causal, mask=operands.mask
            )
        return hybrid_attention_reference(
            q,
            k,
            v,
            fmap,
            window=int(attrs.local_window or 0),
            causal=attrs.causal,
            mask=operands.mask,
            scale=attrs.scale,
        )
    if variant == "block_sparse" and attrs.permute_keys:
        perm, _ = permute_for_sparsity(q, k, v, attrs.block, scale=attrs.scale)
        k, v = apply_permutation(k, perm), apply_permutation(v, perm)
        operands = operands._replace(k=k, v=v)
    visible = _visibility(operands, attrs, variant)
    return attention_reference(
        q, k, v, mask=operands.mask, bias=operands.bias, visible=visible, **dense
    )


def _head_subset(
    operands: AttentionOperands, heads: tuple[int, ...], group: int
) -> AttentionOperands:
    """The operands of the query heads ``heads`` only (kv heads repeated to match)."""
    index = torch.tensor(heads, device=operands.q.device)

    def take(t: Any, expand_kv: bool = False) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] == 1:
            return t
        if expand_kv and group > 1:
            t = t.repeat_interleave(group, dim=1)
        return t.index_select(1, index)

    return AttentionOperands(
        take(operands.q),
        take(operands.k, True),
        take(operands.v, True),
        *(take(t) for t in operands[3:]),
    )


def _impl(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    return reference_attention(inputs, attrs)


def _verify(node: Any) -> str | None:
    attrs: AttentionAttrs = node.attrs
    if attrs.variant not in VARIANTS:
        return f"variant {attrs.variant!r} is not one of {VARIANTS}"
    if len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
        return "attention needs q, k and v"
    q, k, v = (value.type for value in node.inputs[:3])
    if not all(isinstance(t, TensorType) and t.rank == 4 for t in (q, k, v)):
        return "q, k and v must be rank-4 [batch, heads, seq, head_dim] tensors"
    if q.shape[-1] != k.shape[-1]:
        return f"q head_dim {q.shape[-1]} differs from k head_dim {k.shape[-1]}"
    if k.shape[2] != v.shape[2]:
        return f"k length {k.shape[2]} differs from v length {v.shape[2]}"
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}"
    if not math.isfinite(attrs.scale):
        return "scale must be finite"
    if len(node.inputs) > 7 and node.inputs[7] is not None:
        seg = node.inputs[7].type
        if not (isinstance(seg, TensorType) and seg.rank == 2) or q.shape[2] != k.shape[2]:
            return "segments must be [batch, seq] ids of a self-attention site"
    return None


register_op(
    OpDef(
        "attention",
        AttentionAttrs,
        _impl,
        infer=_infer,
        cost=_cost,
        emit=lambda names, attrs: f"K.attention([{', '.join(names)}], {{attrs}})",
        verify=_verify,
    )
)
