"""CPU sparse attention kernels (issue 5) against the naive reference with the equivalent mask."""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.ir.attention_reference import attention_reference, visible_keys_mask
from attnopt.ir.block_routing import (
    apply_permutation,
    calibration_block_scores,
    permute_for_sparsity,
    route_blocks,
    static_block_pattern,
)
from attnopt.ir.block_sparse import BlockMeta, block_meta_visible
from attnopt.ir.neighborhood import neighborhood_visible
from attnopt.runtime.cpu import block_sparse as cpu_block_sparse
from attnopt.runtime.cpu import sliding_window as cpu_sparse
from attnopt.runtime.cpu.block_sparse import block_sparse_attention
from attnopt.runtime.cpu.dense import dense_attention_cpu
from attnopt.runtime.cpu.neighborhood import neighborhood_attention
from attnopt.runtime.cpu.sliding_window import sliding_window_attention
from attnopt.tolerances import assert_close


def _qkv(
    batch=2,
    q_heads=4,
    kv_heads=2,
    q_len=40,
    kv_len=40,
    dim=16,
    value_dim=16,
    dtype=torch.float32,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, value_dim, generator=gen).to(dtype)
    return q, k, v


def _padding_mask(batch, kv_len, pad):
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    keep[-1, ..., kv_len - pad :] = False
    return keep


def _extras(kind, batch, q_heads, q_len, kv_len):
    """(mask, bias) for one masking scenario."""
    gen = torch.Generator().manual_seed(7)
    if kind == "none":
        return None, None
    if kind == "padding":
        return _padding_mask(batch, kv_len, kv_len // 3), None
    if kind == "float_mask_bias":
        mask = torch.zeros(1, 1, q_len, kv_len).masked_fill(
            torch.rand(q_len, kv_len, generator=gen) < 0.2, float("-inf")
        )
        return mask, torch.randn(1, q_heads, q_len, kv_len, generator=gen)
    if kind == "per_batch":
        return torch.rand(batch, 1, q_len, kv_len, generator=gen) > 0.3, None
    raise AssertionError(kind)


# ---------------------------------------------------------------- sliding window

WINDOW_CASES = [
    # q_len, kv_len, left, right, sinks, causal
    (40, 40, 6, 6, 0, False),
    (40, 40, 9, 0, 0, True),
    (40, 40, 9, 3, 3, True),
    (40, 40, 5, 2, 4, False),
    (24, 56, 7, 0, 2, True),  # cross, decode-like alignment
    (56, 24, 5, 4, 0, False),  # more queries than keys
    (56, 24, 6, 0, 2, True),  # early queries see nothing
    (40, 40, None, 4, 0, False),  # one side unlimited
    (40, 40, 3, None, 1, False),
]


@pytest.mark.parametrize("case", WINDOW_CASES)
@pytest.mark.parametrize("extras", ["none", "padding", "float_mask_bias", "per_batch"])
@pytest.mark.parametrize("chunk", [8, None])
def test_sliding_window_matches_reference(case, extras, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(cpu_sparse, "EDGE_BUDGET", 64)  # one edge chunk per call
    q_len, kv_len, left, right, sinks, causal = case
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len)
    mask, bias = _extras(extras, 2, 4, q_len, kv_len)
    stats = {}
    out = sliding_window_attention(
        q,
        k,
        v,
        window_left=left,
        window_right=right,
        sinks=sinks,
        causal=causal,
        mask=mask,
        bias=bias,
        query_chunk=chunk,
        stats=stats,
    )
    visible = visible_keys_mask(q_len, kv_len, window_left=left, window_right=right, sinks=sinks)
    expected = attention_reference(q, k, v, mask=mask, bias=bias, causal=causal, visible=visible)
    assert_close(out, expected)
    assert 0 < stats["computed_fraction"] <= 1.0 + 1e-9


def test_sliding_window_interior_is_one_strided_call_and_skips_work():
    q, k, v = _qkv(batch=1, q_heads=2, kv_heads=2, q_len=512, kv_len=512)
    stats = {}
    out = sliding_window_attention(
        q, k, v, window_left=32, window_right=0, sinks=4, causal=True, query_chunk=32, stats=stats
    )
    visible = visible_keys_mask(512, 512, window_left=32, window_right=0, sinks=4)
    assert_close(out, attention_reference(q, k, v, causal=True, visible=visible))
    assert stats["computed_fraction"] < 0.2


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_covering_everything_is_dense(causal):
    q, k, v = _qkv(q_len=33, kv_len=33)
    dense = dense_attention_cpu(q, k, v, scale=0.25, causal=causal, mask=None, bias=None)
    out = sliding_window_attention(
        q, k, v, window_left=40, window_right=40, sinks=2, causal=causal, scale=0.25
    )
    assert torch.equal(out, dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sliding_window_low_precision(dtype):
    q, k, v = _qkv(q_len=48, kv_len=48, dtype=dtype)
    mask = _padding_mask(2, 48, 5)
    out = sliding_window_attention(
        q, k, v, window_left=8, window_right=0, sinks=2, causal=True, mask=mask, query_chunk=8
    )
    visible = visible_keys_mask(48, 48, window_left=8, window_right=0, sinks=2)
    assert out.dtype == dtype
    assert_close(out, attention_reference(q, k, v, mask=mask, causal=True, visible=visible))


def test_sliding_window_value_dim_differs_and_float64():
    q, k, v = _qkv(q_len=30, kv_len=30, value_dim=8, dtype=torch.float64)
    out = sliding_window_attention(q, k, v, window_left=4, window_right=4, sinks=1, query_chunk=8)
    visible = visible_keys_mask(30, 30, window_left=4, window_right=4, sinks=1)
    assert_close(out, attention_reference(q, k, v, visible=visible))


# ---------------------------------------------------------------- block sparse


def _random_meta(batch_meta, heads_meta, q_len, kv_len, block_q, block_k, seed=0, allow_empty=True):
    gen = torch.Generator().manual_seed(seed)
    num_q, num_k = -(-q_len // block_q), -(-kv_len // block_k)
    counts = torch.randint(
        0 if allow_empty else 1, num_k + 1, (batch_meta, heads_meta, num_q), generator=gen
    )
    indices = torch.zeros(batch_meta, heads_meta, num_q, num_k, dtype=torch.int32)
    for idx in range(counts.numel()):
        b, h, m = torch.unravel_index(torch.tensor(idx), counts.shape)
        chosen = torch.randperm(num_k, generator=gen)[: counts[b, h, m]].sort().values
        indices[b, h, m, : chosen.numel()] = chosen.to(torch.int32)
    return BlockMeta(block_q, block_k, counts.to(torch.int32), indices)


BLOCK_CASES = [
    # q_len, kv_len, block_q, block_k, causal, meta batch, meta heads
    (64, 64, 16, 16, False, 2, 4),
    (64, 64, 16, 16, True, 1, 4),
    (50, 70, 16, 8, True, 2, 1),  # ragged tails, cross, bottom-right causal
    (70, 50, 8, 16, False, 1, 1),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("extras", ["none", "padding", "float_mask_bias", "per_batch"])
def test_block_sparse_matches_reference(case, extras, monkeypatch):
    monkeypatch.setattr(cpu_block_sparse, "GATHER_BUDGET", 4096)  # several slices, reused buffers
    q_len, kv_len, block_q, block_k, causal, batch_meta, heads_meta = case
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len)
    meta = _random_meta(batch_meta, heads_meta, q_len, kv_len, block_q, block_k)
    mask, bias = _extras(extras, 2, 4, q_len, kv_len)
    stats = {}
    out = block_sparse_attention(q, k, v, meta, causal=causal, mask=mask, bias=bias, stats=stats)
    visible = block_meta_visible(meta, q_len, kv_len)
    expected = attention_reference(q, k, v, mask=mask, bias=bias, causal=causal, visible=visible)
    assert_close(out, expected)
    assert 0 < stats["computed_fraction"] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_sparse_low_precision(dtype):
    q, k, v = _qkv(q_len=64, kv_len=64, dtype=dtype)
    meta = _random_meta(1, 4, 64, 64, 16, 16, allow_empty=False)
    out = block_sparse_attention(q, k, v, meta, causal=True)
    expected = attention_reference(q, k, v, causal=True, visible=block_meta_visible(meta, 64, 64))
    assert out.dtype == dtype
    assert_close(out, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_full_density_is_dense(causal):
    q, k, v = _qkv(q_len=48, kv_len=48)
    meta = route_blocks(q, k, block=16, density=1.0, causal=False)
    dense = dense_attention_cpu(q, k, v, scale=48**-0.5, causal=causal, mask=None, bias=None)
    assert torch.equal(block_sparse_attention(q, k, v, meta, scale=48**-0.5, causal=causal), dense)


# ---------------------------------------------------------------- routing


def _check_meta_invariants(meta, num_kv_blocks):
    counts, indices = meta.kv_counts.long(), meta.kv_indices.long()
    assert meta.kv_counts.dtype == torch.int32 and meta.kv_indices.dtype == torch.int32
    for row, count in zip(indices.reshape(-1, indices.shape[-1]), counts.reshape(-1)):
        listed = row[:count]
        assert torch.all(listed[1:] > listed[:-1]), "ascending and unique"
        assert torch.all((listed >= 0) & (listed < num_kv_blocks))


@pytest.mark.parametrize("causal", [False, True])
def test_route_blocks_topk_invariants(causal):
    q, k, _ = _qkv(q_len=128, kv_len=128)
    meta = route_blocks(q, k, block=16, density=0.25, sinks=3, causal=causal)
    _check_meta_invariants(meta, 8)
    visible = block_meta_visible(meta, 128, 128)
    assert meta.kv_counts.shape == (2, 4, 8)
    for m in range(8):
        local, allowed = m, (m + 1 if causal else 8)
        assert visible[..., m * 16, local * 16].all(), "local block kept"
        assert visible[..., m * 16, 0].all(), "sink block kept"
        assert (meta.kv_counts[..., m] == min(2, allowed)).all()
        if causal:
            assert not visible[..., m * 16, (m + 1) * 16 :].any(), "no block wholly in the future"


def test_route_blocks_threshold_and_padding():
    q, k, _ = _qkv(q_len=96, kv_len=96)
    keep = _padding_mask(2, 96, 40)  # last batch element: blocks 4 and 5 fully padded
    meta = route_blocks(q, k, block=16, threshold=0.6, keep_local=False, mask=keep)
    _check_meta_invariants(meta, 6)
    visible = block_meta_visible(meta, 96, 96)
    assert not visible[1, :, :, 64:].any()
    assert (meta.kv_counts >= 1).all() and (meta.kv_counts[1] <= 4).all()
    capped = route_blocks(q, k, block=16, threshold=0.99, density=0.33, mask=keep)
    assert (capped.kv_counts <= 2).all()


@pytest.mark.parametrize("causal", [False, True])
def test_routed_block_sparse_matches_reference(causal):
    q, k, v = _qkv(q_len=80, kv_len=80)
    keep = _padding_mask(2, 80, 13)
    meta = route_blocks(q, k, block=16, density=0.4, sinks=1, causal=causal, mask=keep)
    out = block_sparse_attention(q, k, v, meta, causal=causal, mask=keep)
    expected = attention_reference(
        q, k, v, mask=keep, causal=causal, visible=block_meta_visible(meta, 80, 80)
    )
    assert_close(out, expected)


@pytest.mark.parametrize("extras", ["none", "float_mask_bias", "per_batch"])
def test_threshold_routed_causal_cross_attention(extras, monkeypatch):
    # uneven counts (rows sorted by count), causal diagonal split, several slices
    monkeypatch.setattr(cpu_block_sparse, "GATHER_BUDGET", 2048)
    q, k, v = _qkv(q_len=48, kv_len=80)
    mask, bias = _extras(extras, 2, 4, 48, 80)
    meta = route_blocks(q, k, block=16, threshold=0.5, causal=True, sinks=2)
    assert meta.kv_counts.unique().numel() > 1
    out = block_sparse_attention(q, k, v, meta, causal=True, mask=mask, bias=bias)
    visible = block_meta_visible(meta, 48, 80)
    assert_close(
        out, attention_reference(q, k, v, mask=mask, bias=bias, causal=True, visible=visible)
    )


@pytest.mark.parametrize("causal", [False, True])
def test_routing_ragged_lengths_full_mask_and_value_dim(causal):
    q, k, v = _qkv(q_len=37, kv_len=53, value_dim=8)
    keep = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(3)) > 0.3
    for choice in ({"density": 0.3}, {"threshold": 0.7}):
        meta = route_blocks(q, k, block=16, block_q=8, causal=causal, mask=keep, sinks=3, **choice)
        _check_meta_invariants(meta, 4)
        out = block_sparse_attention(q, k, v, meta, causal=causal, mask=keep)
        visible = block_meta_visible(meta, 37, 53)
        assert_close(out, attention_reference(q, k, v, mask=keep, causal=causal, visible=visible))


def test_static_pattern_from_calibration():
    q, k, v = _qkv(q_len=64, kv_len=64)
    scores = [calibration_block_scores(q, k, block_q=16, block_k=16, causal=True, rows_per_step=32)]
    scores.append(calibration_block_scores(q.flip(2), k, block_q=16, block_k=16, causal=True))
    assert scores[0].shape == (4, 4, 4)
    torch.testing.assert_close(scores[0].sum(-1), torch.ones(4, 4))
    meta = static_block_pattern(
        scores, density=0.5, block_q=16, block_k=16, q_len=64, kv_len=64, causal=True
    )
    assert meta.kv_counts.shape == (1, 4, 4)
    _check_meta_invariants(meta, 4)
    assert meta.kv_counts[0, :, 0].eq(1).all() and meta.kv_counts[0, :, 3].eq(2).all()
    mean_scores = torch.stack(scores).mean(0)
    visible = block_meta_visible(meta, 64, 64)
    for h in range(4):  # the kept off-diagonal block is the heaviest one
        row = mean_scores[h, 3, :3]
        assert visible[0, h, 63, int(row.argmax()) * 16]
    out = block_sparse_attention(q, k, v, meta, causal=True)
    assert_close(out, attention_reference(q, k, v, causal=True, visible=visible))


def test_permutation_leaves_attention_unchanged_and_packs_keys():
    q, k, v = _qkv(q_len=64, kv_len=96, kv_heads=2)
    k[:, :, 5::11] += 3 * q.mean(dim=(1, 2), keepdim=True)[:, :, :1]  # a few keys every query wants
    perm, inverse = permute_for_sparsity(q, k, v, 16)
    k_perm, v_perm = apply_permutation(k, perm), apply_permutation(v, perm)
    assert torch.equal(apply_permutation(k_perm, inverse), k)
    assert_close(attention_reference(q, k_perm, v_perm), attention_reference(q, k, v))
    keep = _padding_mask(2, 96, 20)
    keep_perm = torch.gather(keep.expand(2, 2, 1, 96), 3, perm.unsqueeze(2))
    masked = attention_reference(q, k_perm, v_perm, mask=keep_perm.repeat_interleave(2, dim=1))
    assert_close(masked, attention_reference(q, k, v, mask=keep))
    segmented, _ = permute_for_sparsity(q, k, v, 16, segment=32)
    assert torch.equal(segmented.sort(-1).values, torch.arange(96).expand(2, 2, 96))
    assert ((segmented // 32) == torch.arange(96) // 32).all(), "stays inside its segment"
    before = calibration_block_scores(q, k, block_q=16, block_k=16).amax(-1).mean()
    after = calibration_block_scores(q, k_perm, block_q=16, block_k=16).amax(-1).mean()
    assert after > before


# ---------------------------------------------------------------- neighbourhood


def _natten_start(index, length, kernel, dilation):
    """NATTEN's window-start formula, written independently of the kernel."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue, full = index % dilation, (length // dilation) * dilation
        extra = length - full
        if residue < extra:
            return length - extra + residue - 2 * half * dilation
        return full + residue - kernel * dilation
    return index - half * dilation


@pytest.mark.parametrize(
    "length,kernel,dilation", [(9, 3, 1), (10, 5, 1), (13, 3, 2), (14, 3, 3), (12, 5, 2)]
)
def test_neighborhood_axis_windows_match_natten(length, kernel, dilation):
    visible = neighborhood_visible((length, 1), (kernel, 1), (dilation, 1))
    for i in range(length):
        start = _natten_start(i, length, kernel, dilation)
        expected = torch.zeros(length, dtype=torch.bool)
        expected[start : start + kernel * dilation : dilation] = True
        assert torch.equal(visible[i], expected), i


NEIGHBOR_CASES = [
    # grid, kernel, dilation, num_global, tile
    ((9, 11), 3, 1, 0, None),
    ((9, 11), (5, 3), (1, 2), 1, (4, 3)),
    ((12, 10), 3, 3, 4, None),
    ((4, 6, 7), 3, 1, 1, None),
    ((5, 6, 8), (3, 3, 5), (1, 2, 1), 2, (2, 2, 3)),
]


@pytest.mark.parametrize("case", NEIGHBOR_CASES)
@pytest.mark.parametrize("extras", ["none", "padding", "float_mask_bias"])
def test_neighborhood_matches_reference(case, extras):
    grid, kernel, dilation, num_global, tile = case
    seq = num_global + math.prod(grid)
    q, k, v = _qkv(q_len=seq, kv_len=seq, batch=2)
    mask, bias = _extras(extras, 2, 4, seq, seq)
    stats = {}
    out = neighborhood_attention(
        q,
        k,
        v,
        grid=grid,
        kernel=kernel,
        dilation=dilation,
        num_global=num_global,
        mask=mask,
        bias=bias,
        tile=tile,
        stats=stats,
    )
    visible = neighborhood_visible(grid, kernel, dilation, num_global)
    kernels = (kernel,) * len(grid) if isinstance(kernel, int) else kernel
    assert (visible[num_global:].sum(-1) == num_global + math.prod(kernels)).all()
    assert visible[:num_global].all() and visible[:, :num_global].all()
    assert_close(out, attention_reference(q, k, v, mask=mask, bias=bias, visible=visible))
    assert stats["computed_fraction"] < 1


def test_neighborhood_bf16_and_full_kernel_is_dense():
    q, k, v = _qkv(q_len=1 + 64, kv_len=65, dtype=torch.bfloat16)
    out = neighborhood_attention(q, k, v, grid=(8, 8), kernel=5, num_global=1)
    assert_close(out, attention_reference(q, k, v, visible=neighborhood_visible((8, 8), 5, 1, 1)))
    full = neighborhood_attention(q, k, v, grid=(8, 8), kernel=8, num_global=1)
    assert torch.equal(
        full, dense_attention_cpu(q, k, v, scale=16**-0.5, causal=False, mask=None, bias=None)
    )


_THREADS_CHECK = """
import threading, torch
from attnopt.runtime.cpu.common import bookkeeping_threads
torch.set_num_threads(2)
seen = []
release = threading.Event()
other = threading.Thread(target=release.wait)
other.start()
with bookkeeping_threads():  # another Python thread is alive: the count must not move
    seen.append(torch.get_num_threads())
release.set()
other.join()
with bookkeeping_threads():  # alone: lowered for the section, restored after
    seen.append(torch.get_num_threads())
seen.append(torch.get_num_threads())
print(seen)
"""


def test_bookkeeping_threads_leaves_other_threads_alone():
    import subprocess
    import sys

    # A fresh process: the test process may have helper threads of its own alive.
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_CHECK], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[2, 1, 2]"
