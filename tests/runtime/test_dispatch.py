"""The runtime's per-variant dispatch against the op's definition, ``reference_attention``.

Every variant the IR defines runs its CPU kernel through ``attention_torch`` and must equal the
plain-torch reference of the op (``attnopt.ir.attention.reference_attention``, the op's ``impl``);
the operand accessor names the positional operand list the same way everywhere.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt.ir import get_op
from attnopt.ir.attention import (
    AttentionAttrs,
    AttentionOperands,
    effective_variant,
    reference_attention,
    variant_heads,
)
from attnopt.ir.block_routing import route_blocks
from attnopt.runtime.dispatch import VARIANT_KERNELS, attention_torch
from attnopt.tolerances import assert_close

S, D = 64, 16
SCALE = D**-0.5

CASES = {
    "dense": AttentionAttrs(scale=SCALE),
    "dense_causal_softcap": AttentionAttrs(scale=SCALE, causal=True, softcap=5.0),
    "sliding_window": AttentionAttrs(
        scale=SCALE, variant="sliding_window", window_left=7, window_right=3, sinks=2
    ),
    "sliding_window_causal": AttentionAttrs(
        scale=SCALE, causal=True, variant="sliding_window", window_left=9, window_right=0
    ),
    "block_sparse_topk": AttentionAttrs(scale=SCALE, variant="block_sparse", block=16, density=0.5),
    "block_sparse_threshold": AttentionAttrs(
        scale=SCALE, variant="block_sparse", block=16, routing="threshold", threshold=0.8
    ),
    "block_sparse_permuted": AttentionAttrs(
        scale=SCALE, variant="block_sparse", block=16, density=0.5, permute_keys=True
    ),
    "neighborhood": AttentionAttrs(
        scale=SCALE, variant="neighborhood", grid=(8, 8), kernel=(3, 3), dilation=1
    ),
    "linear_elu": AttentionAttrs(scale=SCALE, variant="linear", feature_map="elu"),
    "linear_favor_causal": AttentionAttrs(
        scale=SCALE, causal=True, variant="linear", feature_map="favor", num_features=32, seed=3
    ),
    "hybrid": AttentionAttrs(scale=SCALE, variant="hybrid", feature_map="relu", local_window=8),
    "some_heads_windowed": AttentionAttrs(
        scale=SCALE, variant="sliding_window", window_left=4, window_right=4, heads=(0, 3)
    ),
    "dense_below_min_len": AttentionAttrs(
        scale=SCALE, variant="sliding_window", window_left=2, window_right=2, min_len=S + 1
    ),
}


def _qkv(seed: int = 0, q_heads: int = 4, kv_heads: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, S, D, generator=generator)
    k = torch.randn(2, kv_heads, S, D, generator=generator)
    v = torch.randn(2, kv_heads, S, D, generator=generator)
    return [q, k, v]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_kernels_equal_the_ops_reference(name):
    attrs = CASES[name]
    inputs = _qkv()
    if attrs.variant == "neighborhood":  # a grid needs all heads alike; MHA keeps it simple
        inputs = _qkv(q_heads=2, kv_heads=2)
    expected = reference_attention(inputs, attrs)
    assert_close(attention_torch(inputs, attrs), expected)
    assert_close(
        get_op("attention").impl(inputs, attrs), expected
    )  # the op's impl is the reference


def test_key_padding_mask_is_honoured_by_kernels_and_reference():
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 1, S, dtype=torch.bool)
    keep[0, ..., 40:] = False
    for name in ("dense", "sliding_window", "block_sparse_topk", "linear_elu", "hybrid"):
        attrs = CASES[name]
        expected = reference_attention([q, k, v, keep], attrs)
        assert_close(attention_torch([q, k, v, keep], attrs), expected)
        # the mask matters: without it the result differs
        assert not torch.allclose(expected, reference_attention([q, k, v], attrs), atol=1e-4)


def test_static_block_sparse_reads_its_metadata_operands():
    q, k, v = _qkv()
    meta = route_blocks(q, k, block=16, density=0.25)
    attrs = AttentionAttrs(scale=SCALE, variant="block_sparse", block=16, routing="static")
    inputs = [q, k, v, None, None, meta.kv_counts, meta.kv_indices]
    expected = reference_attention(inputs, attrs)
    assert_close(attention_torch(inputs, attrs), expected)
    dense = reference_attention([q, k, v], AttentionAttrs(scale=SCALE))
    assert not torch.allclose(expected, dense, atol=1e-4)  # the metadata really drops blocks
    with pytest.raises(ValueError, match="kv_counts and kv_indices"):
        reference_attention([q, k, v], attrs)


def test_operands_are_named_once():
    q, k, v = _qkv()
    ops = AttentionOperands.of([q, k, v, None, "bias"])
    assert ops.q is q and ops.mask is None and ops.bias == "bias" and ops.kv_indices is None
    assert ops.as_list() == [q, k, v, None, "bias"]
    assert AttentionOperands.of([q, k, v]).as_list() == [q, k, v]
    with pytest.raises(ValueError, match="3 to 8"):
        AttentionOperands.of([q, k])


def test_which_variant_runs_is_decided_in_one_place():
    window = CASES["sliding_window"]
    assert effective_variant(window, S) == "sliding_window"
    assert effective_variant(dataclasses.replace(window, min_len=S + 1), S) == "dense"
    assert variant_heads(window, 4) is None
    assert variant_heads(dataclasses.replace(window, heads=(3, 1, 3)), 4) == (1, 3)
    assert variant_heads(dataclasses.replace(window, heads=(0, 1, 2, 3)), 4) is None
    assert set(VARIANT_KERNELS) == {
        "dense", "sliding_window", "block_sparse", "neighborhood", "linear", "hybrid"
    }  # fmt: skip
