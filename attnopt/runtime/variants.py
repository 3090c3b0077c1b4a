"""Torch kernels of the sparse and linear ``attention`` variants, registered with the runtime.

Entry point: :func:`register_all` (called on import of :mod:`attnopt.runtime.kernels` users).

Each runner reads the node's attributes and calls the CPU kernel that skips the dropped work:
chunked windows, gathered key blocks, tiled neighbourhoods, O(N) linear attention.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnopt.ir.attention import AttentionAttrs
from attnopt.runtime.cpu_block_routing import apply_permutation, permute_for_sparsity, route_blocks
from attnopt.runtime.cpu_linear import hybrid_attention, linear_attention, make_feature_map
from attnopt.runtime.cpu_neighborhood import neighborhood_attention
from attnopt.runtime.cpu_sparse import block_sparse_attention, sliding_window_attention
from attnopt.runtime.cpu_sparse_common import BlockMeta
from attnopt.runtime.kernels import register_variant_runner


def _unpack(inputs: list[Any]) -> tuple:
    padded = list(inputs) + [None] * (7 - len(inputs))
    return tuple(padded[:7])


def run_sliding_window(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """``sliding_window`` variant (see docs/attention-op.md)."""
    q, k, v, mask, bias, _, _ = _unpack(inputs)
    return sliding_window_attention(
        q,
        k,
        v,
        window_left=attrs.window_left,
        window_right=attrs.window_right,
        sinks=attrs.sinks,
        scale=attrs.scale,
        causal=attrs.causal,
        mask=mask,
        bias=bias,
    )


def block_meta_for(inputs: list[Any], attrs: AttentionAttrs) -> BlockMeta:
    """The block metadata of a ``block_sparse`` call: static inputs or routed now."""
    q, k, _, mask, _, counts, indices = _unpack(inputs)
    if attrs.routing == "static":
        if counts is None or indices is None:
            raise ValueError("static block-sparse attention needs kv_counts and kv_indices inputs")
        return BlockMeta(attrs.query_block or attrs.block, attrs.block, counts, indices)
    return route_blocks(
        q,
        k,
        block=attrs.block,
        density=attrs.density if attrs.routing == "topk" else None,
        threshold=attrs.threshold if attrs.routing == "threshold" else None,
        keep_local=attrs.keep_local,
        sinks=attrs.sinks,
        causal=attrs.causal,
        mask=mask,
        scale=attrs.scale,
        block_q=attrs.query_block or None,
    )


def run_block_sparse(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """``block_sparse`` variant: static metadata or content routing, then gathered blocks."""
    q, k, v, mask, bias, _, _ = _unpack(inputs)
    if attrs.permute_keys:
        # Non-causal attention without masks is invariant to reordering keys with their values.
        perm, _ = permute_for_sparsity(q, k, v, attrs.block, scale=attrs.scale)
        k, v = apply_permutation(k, perm), apply_permutation(v, perm)
        inputs = [q, k, v, *inputs[3:]]
    meta = block_meta_for(inputs, attrs)
    return block_sparse_attention(
        q, k, v, meta, scale=attrs.scale, causal=attrs.causal, mask=mask, bias=bias
    )


def run_neighborhood(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """``neighborhood`` variant over the token grid after ``num_global`` tokens."""
    q, k, v, mask, bias, _, _ = _unpack(inputs)
    return neighborhood_attention(
        q,
        k,
        v,
        grid=attrs.grid,
        kernel=attrs.kernel,
        dilation=attrs.dilation,
        num_global=attrs.num_global,
        scale=attrs.scale,
        mask=mask,
        bias=bias,
    )


@functools.lru_cache(maxsize=64)
def _feature_map(name: str, head_dim: int, num_features: int, seed: int, scale: float) -> Any:
    """The feature map of a ``linear`` / ``hybrid`` node (built once per configuration)."""
    return make_feature_map(
        name, head_dim, num_features=num_features or None, seed=seed, scale=scale
    )


def feature_map_for(attrs: AttentionAttrs, head_dim: int) -> Any:
    """The :class:`~attnopt.runtime.linear_features.FeatureMap` a ``linear`` / ``hybrid`` node
    uses."""
    return _feature_map(attrs.feature_map, head_dim, attrs.num_features, attrs.seed, attrs.scale)


def run_linear(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """``linear`` variant: kernelised linear attention with the node's feature map."""
    q, k, v, mask, _, _, _ = _unpack(inputs)
    fmap = feature_map_for(attrs, q.shape[-1])
    return linear_attention(q, k, v, fmap, causal=attrs.causal, mask=mask)


def run_hybrid(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """``hybrid`` variant: exact softmax inside ``local_window``, linear attention outside."""
    q, k, v, mask, _, _, _ = _unpack(inputs)
    fmap = feature_map_for(attrs, q.shape[-1])
    return hybrid_attention(
        q,
        k,
        v,
        fmap,
        window=int(attrs.local_window or 0),
        causal=attrs.causal,
        mask=mask,
        scale=attrs.scale,
    )


def register_all() -> None:
    """Register every variant runner with :mod:`attnopt.runtime.kernels`."""
    register_variant_runner("sliding_window", run_sliding_window)
    register_variant_runner("block_sparse", run_block_sparse)
    register_variant_runner("neighborhood", run_neighborhood)
    register_variant_runner("linear", run_linear)
    register_variant_runner("hybrid", run_hybrid)


register_all()
