"""The CPU decode kernel (GQA-grouped, split-K flash-decoding) against the attention reference.

Every case compares :func:`decode_attention_cpu` with
:func:`attnopt.ir.attention_reference.attention_reference` within :mod:`attnopt.tolerances`: GQA
ratios 1/2/4/8, 1..4 queries, masks (none, bool key padding, additive per head, causal, both plus a
bias), split counts that do and do not divide the cache length, strided views of a static cache
(which must never be copied), rows with no visible key, soft-capping and NaN.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.ir import AttentionAttrs
from attnopt.ir.attention_reference import attention_reference
from attnopt.runtime import dispatch
from attnopt.runtime.cpu import decode
from attnopt.runtime.cpu.decode import (
    DECODE_MAX_Q_LEN,
    DECODE_MIN_KV_LEN,
    MIN_SPLIT_KEYS,
    decode_applies,
    decode_attention_cpu,
    decode_splits,
)
from attnopt.tolerances import assert_close

SCALE = 0.17
HEAD_DIM = 32


def _cache_views(batch, kv_heads, kv_len, *, spare=37, generator, dtype=torch.float32):
    """k, v as ``cache[:, :, :kv_len]`` views of a larger preallocated cache, and the caches."""
    shape = (batch, kv_heads, kv_len + spare, HEAD_DIM)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], k_cache, v_cache


def _mask(kind, batch, q_heads, q_len, kv_len, generator):
    """(mask, bias, causal) for one mask kind."""
    if kind == "none":
        return None, None, False
    if kind == "key_padding":
        keep = torch.rand(batch, 1, 1, kv_len, generator=generator) > 0.3
        keep[..., -1] = True
        return keep, None, False
    if kind == "additive":
        return torch.randn(1, q_heads, q_len, kv_len, generator=generator), None, False
    if kind == "causal":
        return None, None, True
    assert kind == "all"
    keep = torch.rand(batch, 1, q_len, kv_len, generator=generator) > 0.2
    bias = torch.randn(batch, q_heads, 1, kv_len, generator=generator)
    return keep, bias, True


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("q_len", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["none", "key_padding", "additive", "causal", "all"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_matches_reference(group, q_len, kind, splits):
    generator = torch.Generator().manual_seed(group * 100 + q_len * 10 + len(kind))
    batch, kv_heads, kv_len = 2, 2, 301
    q = torch.randn(batch, kv_heads * group, q_len, HEAD_DIM, generator=generator)
    k, v, _, _ = _cache_views(batch, kv_heads, kv_len, generator=generator)
    mask, bias, causal = _mask(kind, batch, kv_heads * group, q_len, kv_len, generator)
    out = decode_attention_cpu(
        q, k, v, mask=mask, bias=bias, scale=SCALE, causal=causal, splits=splits
    )
    expected = attention_reference(q, k, v, mask=mask, bias=bias, scale=SCALE, causal=causal)
    assert out.shape == expected.shape
    assert_close(out, expected)


@pytest.mark.parametrize("splits", [2, 4, 5])
def test_split_k_merge_with_uneven_tail_matches_unsplit(splits):
    generator = torch.Generator().manual_seed(splits)
    q = torch.randn(1, 8, 1, HEAD_DIM, generator=generator)
    k, v, _, _ = _cache_views(1, 1, 1029, generator=generator)  # 1029 % splits != 0
    single = decode_attention_cpu(q, k, v, scale=SCALE, splits=1)
    split = decode_attention_cpu(q, k, v, scale=SCALE, splits=splits)
    assert_close(split, single)
    assert_close(split, attention_reference(q, k, v, scale=SCALE))


@pytest.mark.parametrize("splits", [1, 3])
def test_reads_the_static_cache_in_place(monkeypatch, splits):
    generator = torch.Generator().manual_seed(1)
    k, v, k_cache, v_cache = _cache_views(2, 2, 700, spare=300, generator=generator)
    q = torch.randn(2, 8, 1, HEAD_DIM, generator=generator)
    seen = []
    real = decode._FLASH_CPU

    def recording(q_arg, k_arg, v_arg, *args, **kwargs):
        seen.append((k_arg.data_ptr(), v_arg.data_ptr(), k_arg.is_contiguous()))
        return real(q_arg, k_arg, v_arg, *args, **kwargs)

    monkeypatch.setattr(decode, "_FLASH_CPU", recording)
    out = decode_attention_cpu(q, k, v, scale=SCALE, splits=splits)
    assert_close(out, attention_reference(q, k, v, scale=SCALE))
    assert seen
    k_range = (k_cache.data_ptr(), k_cache.data_ptr() + k_cache.nbytes)
    v_range = (v_cache.data_ptr(), v_cache.data_ptr() + v_cache.nbytes)
    for k_ptr, v_ptr, contiguous in seen:
        assert k_range[0] <= k_ptr < k_range[1] and v_range[0] <= v_ptr < v_range[1]
        assert not contiguous  # a strided view of the cache, not a packed copy


def test_non_mergeable_layout_falls_back_to_one_split():
    # [B, S, H, D] storage seen as [B, H, S, D]: batch and heads cannot merge into one view dim.
    generator = torch.Generator().manual_seed(2)
    k = torch.randn(2, 600, 2, HEAD_DIM, generator=generator).transpose(1, 2)
    v = torch.randn(2, 600, 2, HEAD_DIM, generator=generator).transpose(1, 2)
    q = torch.randn(2, 8, 2, HEAD_DIM, generator=generator)
    out = decode_attention_cpu(q, k, v, scale=SCALE, causal=True, splits=4)
    assert_close(out, attention_reference(q, k, v, scale=SCALE, causal=True))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("additive", [False, True])
def test_fully_masked_rows_are_zero(splits, additive):
    generator = torch.Generator().manual_seed(3)
    k, v, _, _ = _cache_views(3, 2, 900, generator=generator)
    q = torch.randn(3, 4, 2, HEAD_DIM, generator=generator)
    keep = torch.rand(3, 1, 1, 900, generator=generator) > 0.5
    keep[1] = False  # batch element 1 sees nothing
    keep[2, ..., :600] = False  # batch element 2 sees only the last split's keys
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) if additive else keep
    out = decode_attention_cpu(q, k, v, mask=mask, scale=SCALE, splits=splits)
    expected = attention_reference(q, k, v, mask=mask, scale=SCALE)
    assert_close(out, expected)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("where", ["q", "k_visible", "k_hidden", "v_hidden"])
@pytest.mark.parametrize("splits", [1, 2])
def test_nan_propagates_like_the_reference(where, splits):
    generator = torch.Generator().manual_seed(4)
    k, v, _, _ = _cache_views(2, 2, 800, generator=generator)
    k, v = k.clone(), v.clone()
    q = torch.randn(2, 4, 1, HEAD_DIM, generator=generator)
    keep = torch.ones(2, 1, 1, 800, dtype=torch.bool)
    keep[..., 10] = False
    if where == "q":
        q[0, 1, 0, 3] = float("nan")
    elif where == "k_visible":
        k[1, 0, 20, 5] = float("nan")
    elif where == "k_hidden":
        k[1, 0, 10, 5] = float("nan")
    else:
        v[0, 1, 10, 0] = float("nan")
    out = decode_attention_cpu(q, k, v, mask=keep, scale=SCALE, splits=splits)
    expected = attention_reference(q, k, v, mask=keep, scale=SCALE)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.isnan(), expected.isnan())
    assert expected.isnan().any() == (where != "k_hidden")


@pytest.mark.parametrize("group", [1, 4])
def test_softcap(group):
    generator = torch.Generator().manual_seed(5)
    k, v, _, _ = _cache_views(2, 2, 500, generator=generator)
    q = 4 * torch.randn(2, 2 * group, 3, HEAD_DIM, generator=generator)
    keep = torch.rand(2, 1, 1, 500, generator=generator) > 0.3
    out = decode_attention_cpu(q, k, v, mask=keep, scale=SCALE, causal=True, softcap=2.0)
    expected = attention_reference(q, k, v, mask=keep, scale=SCALE, causal=True, softcap=2.0)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    generator = torch.Generator().manual_seed(6)
    k, v, _, _ = _cache_views(1, 2, 700, generator=generator, dtype=dtype)
    q = torch.randn(1, 8, 2, HEAD_DIM, generator=generator).to(dtype)
    keep = torch.rand(1, 1, 1, 700, generator=generator) > 0.3
    out = decode_attention_cpu(q, k, v, mask=keep, scale=SCALE, splits=2)
    assert out.dtype == dtype
    assert_close(out, attention_reference(q, k, v, mask=keep, scale=SCALE))


@pytest.mark.parametrize("shape", [(0, 4, 1, 300), (2, 4, 0, 300), (2, 4, 2, 0)])
def test_empty_calls(shape):
    batch, q_heads, q_len, kv_len = shape
    q = torch.randn(batch, q_heads, q_len, HEAD_DIM)
    k = torch.randn(batch, 2, kv_len, HEAD_DIM)
    for splits in (1, 2):
        out = decode_attention_cpu(q, k, k, scale=SCALE, splits=splits)
        assert out.shape == (batch, q_heads, q_len, HEAD_DIM)
        assert not out.any()


def test_decode_applies():
    q = torch.empty(1, 16, 1, 64)
    k = torch.empty(1, 4, 4096, 64)
    assert decode_applies(q, k, k)
    assert not decode_applies(q, k[:, :, : DECODE_MIN_KV_LEN - 1], k[:, :, : DECODE_MIN_KV_LEN - 1])
    assert not decode_applies(torch.empty(1, 16, DECODE_MAX_Q_LEN + 1, 64), k, k)
    assert not decode_applies(torch.empty(1, 16, 16, 64), k[:, :, :300], k[:, :, :300])
    assert not decode_applies(q, k, torch.empty(1, 4, 4096, 32))  # v head size differs
    assert not decode_applies(q.to(torch.float16), k, k)  # mixed dtypes
    assert not decode_applies(torch.empty(1, 6, 1, 64), k, k)  # 6 heads over 4 kv heads
    assert not decode_applies(q.to("meta"), k.to("meta"), k.to("meta"))


def test_decode_splits():
    assert decode_splits(4, 8192, threads=2) == 1  # enough work items already
    assert decode_splits(1, 8192, threads=2) == 2
    assert decode_splits(1, 8192, threads=8) == 8192 // MIN_SPLIT_KEYS
    assert decode_splits(1, MIN_SPLIT_KEYS - 1, threads=8) == 1
    assert decode_splits(3, 1 << 20, threads=8) == 3


def test_dispatch_takes_the_decode_kernel_for_decode_shapes(monkeypatch):
    generator = torch.Generator().manual_seed(7)
    k, v, _, _ = _cache_views(2, 2, 1024, generator=generator)
    q = torch.randn(2, 8, 1, HEAD_DIM, generator=generator)
    keep = torch.rand(2, 1, 1, 1024, generator=generator) > 0.2
    calls = []
    real = dispatch.decode_attention_cpu
    monkeypatch.setattr(
        dispatch, "decode_attention_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    attrs = AttentionAttrs(scale=SCALE)
    out = dispatch.attention_torch([q, k, v, keep, None], attrs)
    assert calls == [1]
    assert_close(out, attention_reference(q, k, v, mask=keep, scale=SCALE))
    dispatch.attention_torch([torch.randn(2, 8, 64, HEAD_DIM), k, v, keep, None], attrs)
    assert calls == [1]  # prefill shape: dense
