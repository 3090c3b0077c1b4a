"""The ``attention`` op: one node per attention site, sparsity and linearization as attributes.

Entry points: :class:`AttentionAttrs`, :data:`VARIANTS`.

Inputs: ``q [B,Hq,Sq,D]``, ``k [B,Hkv,Sk,D]``, ``v [B,Hkv,Sk,Dv]``, then optional ``mask``
(bool, True = may attend, or additive float) and ``bias`` (additive float), both broadcastable to
``[B,Hq,Sq,Sk]``, then for static block sparsity ``kv_counts`` and ``kv_indices``. The exact
semantics are in docs/attention-op.md; the reference is
:func:`attnopt.runtime.reference.attention_reference` (plain torch, imported lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

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


def _impl(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    q, v = inputs[0], inputs[2]
    if q.device.type == "meta":
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    from attnopt.runtime.kernels import attention_torch

    return attention_torch(inputs, attrs)


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
