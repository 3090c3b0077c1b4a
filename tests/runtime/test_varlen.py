"""The varlen CPU kernel (packed documents, padding removal) against SDPA with the explicit
block-diagonal mask it avoids building."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnopt.runtime.cpu import varlen as cpu_varlen
from attnopt.runtime.cpu.dense import dense_attention_cpu
from attnopt.runtime.cpu.varlen import (
    RunBuckets,
    document_attention_cpu,
    pack_offsets,
    segment_offsets,
    varlen_attention,
)
from attnopt.tolerances import assert_close, exact_tolerance

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # not in the test extra yet: the property test is skipped, not the module
    given = None

SCALE = 0.3


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)


def _packed(q_heads, kv_heads, tokens, dim=8, value_dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_heads, tokens, dim, generator=gen).to(dtype)
    k = torch.randn(kv_heads, tokens, dim, generator=gen).to(dtype)
    v = torch.randn(kv_heads, tokens, value_dim, generator=gen).to(dtype)
    return q, k, v


def _block_diagonal(lengths: list[int], causal: bool) -> torch.Tensor:
    """The ``[N, N]`` document mask the kernel must never build."""
    run_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = run_of[:, None] == run_of[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    return allowed


def _masked_sdpa(q, k, v, lengths, causal):
    """SDPA in float32 over the whole packed sequence with the explicit mask; k and v repeated
    for grouped heads (independent of the kernel's enable_gqa)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    mask = _block_diagonal(lengths, causal)
    out = F.scaled_dot_product_attention(
        q[None].float(), k[None].float(), v[None].float(), attn_mask=mask, scale=SCALE
    )
    return out[0]


def _check_varlen(lengths, causal, *, q_heads=4, kv_heads=2, dtype=torch.float32, seed=0):
    q, k, v = _packed(q_heads, kv_heads, sum(lengths), dtype=dtype, seed=seed)
    out = varlen_attention(q, k, v, _offsets(lengths), scale=SCALE, causal=causal)
    assert out.shape == (q_heads, sum(lengths), v.shape[-1])
    assert out.dtype == dtype
    tol = exact_tolerance(dtype)
    expected = _masked_sdpa(q, k, v, lengths, causal)
    torch.testing.assert_close(out.float(), expected, atol=tol.atol, rtol=tol.rtol)


LENGTHS = {
    "mixed": [3, 0, 5, 5, 1, 7, 5],  # repeated length not back to back: gathered bucket
    "single-run": [23],
    "back-to-back": [6, 6, 6, 6],  # one bucket read as a strided view
    "ones": [1, 1, 1, 1, 1],
    "empty-runs": [0, 4, 0, 0, 9, 0],
    "long-and-short": [64, 2, 64, 2, 33],
}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_matches_block_diagonal_sdpa(lengths, causal, dtype):
    _check_varlen(lengths, causal, dtype=dtype)


@pytest.mark.parametrize("q_heads,kv_heads", [(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_varlen_grouped_heads(q_heads, kv_heads):
    _check_varlen([5, 5, 8, 1], True, q_heads=q_heads, kv_heads=kv_heads)


def test_varlen_value_dim_differs():
    lengths = [4, 7, 4]
    q, k, v = _packed(2, 2, sum(lengths), dim=8, value_dim=12)
    out = varlen_attention(q, k, v, _offsets(lengths), scale=SCALE)
    assert out.shape == (2, 15, 12)
    assert_close(out, _masked_sdpa(q, k, v, lengths, False))


def test_varlen_no_tokens():
    q, k, v = _packed(2, 2, 0)
    out = varlen_attention(q, k, v, torch.zeros(1, dtype=torch.long), scale=SCALE)
    assert out.shape == (2, 0, 8)


def _recording_sdpa(monkeypatch) -> list[tuple[tuple[int, ...], torch.Tensor | None, bool]]:
    """Patch SDPA to record each call's (q shape, attn_mask, is_causal)."""
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def test_varlen_one_sdpa_call_per_distinct_length_without_buckets(monkeypatch):
    """Without buckets, runs are batched by length and the N x N mask is never formed."""
    lengths = [3, 5, 3, 3, 0, 5, 8]
    q, k, v = _packed(4, 2, sum(lengths))
    with monkeypatch.context() as patch:
        calls = _recording_sdpa(patch)
        out = varlen_attention(q, k, v, _offsets(lengths), scale=SCALE, buckets=None)
    assert_close(out, _masked_sdpa(q, k, v, lengths, False))
    assert sorted(shape for shape, _, _ in calls) == [(1, 4, 8, 8), (2, 4, 5, 8), (3, 4, 3, 8)]
    assert all(mask is None for _, mask, _ in calls)


# --- buckets of close lengths ----------------------------------------------------------------

#: 32 distinct lengths spread over 10..256, as padding removal sees a batch of sentences.
SPREAD = torch.linspace(10, 256, 32).round().long().tolist()


def test_run_buckets_plan_spread_lengths():
    buckets = RunBuckets()
    plan = buckets.plan(dict.fromkeys(SPREAD, 1))
    assert len(plan) <= 8
    assert sorted(length for bucket in plan for length in bucket) == sorted(SPREAD)
    for bucket in plan:
        assert bucket == sorted(bucket, reverse=True)
        longest = max(bucket[0], buckets.min_length)
        counted = [max(length, buckets.min_length) for length in bucket]
        assert longest <= buckets.max_ratio * min(counted)
        assert len(bucket) * longest <= (1 + buckets.max_waste) * sum(counted)


@pytest.mark.parametrize(
    "counts,expected",
    [
        ({100: 3}, [[100]]),  # one length: one bucket, as without buckets
        ({100: 1, 81: 1}, [[100, 81]]),  # ratio 1.23, waste 11%
        ({100: 1, 79: 1}, [[100], [79]]),  # ratio 1.27
        ({100: 1, 81: 9}, [[100], [81]]),  # ratio 1.23, but 10 * 100 > 1.2 * 829 tokens
        ({2: 9, 63: 1, 40: 2}, [[63, 40, 2]]),  # all below min_length: one call
        ({200: 1, 30: 1}, [[200], [30]]),
    ],
)
def test_run_buckets_plan_rules(counts, expected):
    assert RunBuckets().plan(counts) == expected


def test_run_buckets_rejects_bad_options():
    with pytest.raises(ValueError, match="max_ratio >= 1"):
        RunBuckets(max_ratio=0.9)
    with pytest.raises(ValueError, match="max_waste >= 0"):
        RunBuckets(max_waste=-0.1)
    with pytest.raises(ValueError, match="min_length >= 1"):
        RunBuckets(min_length=0)


def _spread_key_mask(kind: str | None, tokens: int) -> torch.Tensor | None:
    if kind is None:
        return None
    keep = torch.rand(tokens, generator=torch.Generator().manual_seed(5)) > 0.2
    keep[: SPREAD[0]] = False  # every key of the first run is hidden
    if kind == "bool":
        return keep
    return torch.zeros(tokens).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kind", [None, "bool", "finite-min"], ids=["no-mask", "bool", "finite"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_buckets_spread_lengths(kind, causal, monkeypatch):
    """32 runs of 32 lengths in a few padded SDPA calls, exactly the block-diagonal result;
    a shuffled order gathers runs from anywhere."""
    lengths = SPREAD[::2] + SPREAD[1::2]
    q, k, v = _packed(2, 1, sum(lengths), seed=2)
    key_mask = _spread_key_mask(kind, sum(lengths))
    with monkeypatch.context() as patch:
        calls = _recording_sdpa(patch)
        out = varlen_attention(
            q, k, v, _offsets(lengths), scale=SCALE, causal=causal, key_mask=key_mask
        )
    assert len(calls) <= 8
    assert sum(shape[0] for shape, _, _ in calls) == len(lengths)
    if causal and kind is None:  # the causal rule alone hides the padding
        assert all(mask is None and is_causal for _, mask, is_causal in calls)
    allowed = _block_diagonal(lengths, causal)
    if key_mask is None:
        expected = _masked_sdpa(q, k, v, lengths, causal)
    else:
        both = allowed & key_mask if kind == "bool" else key_mask.masked_fill(~allowed, -torch.inf)
        expected = dense_attention_cpu(q[None], k[None], v[None], mask=both, scale=SCALE)[0]
    assert_close(out, expected)
    unbucketed = varlen_attention(
        q, k, v, _offsets(lengths), scale=SCALE, causal=causal, key_mask=key_mask, buckets=None
    )
    assert_close(out, unbucketed)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_attention_buckets_across_rows(causal, monkeypatch):
    """Padding removal's layout: one run per row, rows of close lengths share a call."""
    batch, seq = 6, 40
    lengths = torch.tensor([40, 33, 36, 12, 0, 25])
    segments = (torch.arange(seq)[None, :] >= lengths[:, None]).long()  # run, then padding
    q, k, v = _batch(batch=batch, seq=seq)
    mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    with monkeypatch.context() as patch:
        calls = _recording_sdpa(patch)
        out = document_attention_cpu(q, k, v, segments, scale=SCALE, causal=causal, mask=mask)
    assert len(calls) == 1  # every run is shorter than min_length
    assert_close(out, _document_reference(q, k, v, segments, causal, mask))


@pytest.mark.parametrize(
    "offsets,message",
    [
        ([0, 5, 3, 8], r"non-decreasing: offsets\[2\]=3 < offsets\[1\]=5"),
        ([0, 4, 7], r"offsets\[-1\] must equal the number of tokens N=8, got 7"),
        ([0, 4, 9], r"offsets\[-1\] must equal the number of tokens N=8, got 9"),
        ([1, 4, 8], r"offsets\[0\] must be 0, got 1"),
        ([], r"at least one boundary"),
    ],
)
def test_varlen_rejects_bad_offsets(offsets, message):
    q, k, v = _packed(2, 2, 8)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, torch.tensor(offsets, dtype=torch.long), scale=SCALE)


def test_varlen_rejects_bad_shapes():
    q, k, v = _packed(2, 2, 8)
    with pytest.raises(ValueError, match="1-D integer"):
        varlen_attention(q, k, v, torch.tensor([0.0, 8.0]), scale=SCALE)
    with pytest.raises(ValueError, match=r"\[H, N, D\]"):
        varlen_attention(q[None], k[None], v[None], _offsets([8]), scale=SCALE)
    with pytest.raises(ValueError, match="not a multiple"):
        varlen_attention(q.repeat(2, 1, 1)[:3], k, v, _offsets([8]), scale=SCALE)


def test_varlen_key_mask_with_causal():
    lengths = [5, 6, 5]
    q, k, v = _packed(4, 2, 16)
    key_mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    out = varlen_attention(q, k, v, _offsets(lengths), scale=SCALE, causal=True, key_mask=key_mask)
    allowed = _block_diagonal(lengths, True) & key_mask
    expected = dense_attention_cpu(q[None], k[None], v[None], mask=allowed, scale=SCALE)[0]
    assert_close(out, expected)


# --- segment ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segments,expected",
    [
        ([7, 7, -3, -3, -3, 100], [0, 2, 5, 6]),
        ([4, 4, 4], [0, 3]),
        ([0, 1, 2, 3], [0, 1, 2, 3, 4]),
        ([2, 0, 1], [0, 1, 2, 3]),  # ids need not be sorted
        ([], [0]),
        ([5, 3, 5], None),  # 5 reappears after 3
        ([0, 0, 1, 1, 0], None),
    ],
)
def test_segment_offsets(segments, expected):
    got = segment_offsets(torch.tensor(segments, dtype=torch.long))
    if expected is None:
        assert got is None
    else:
        assert got.dtype == torch.long
        assert got.tolist() == expected


def test_segment_offsets_rejects_non_integer_rows():
    with pytest.raises(ValueError, match="1-D integer"):
        segment_offsets(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D integer"):
        segment_offsets(torch.zeros(3))


# --- document_attention_cpu ----------------------------------------------------------------


def _batch(batch=3, q_heads=4, kv_heads=2, seq=12, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    return q, k, v


def _document_reference(q, k, v, segments, causal, mask=None):
    """dense_attention_cpu with the explicit document mask (and-ed with the padding mask)."""
    allowed = segments[:, None, :, None] == segments[:, None, None, :]
    if mask is None:
        combined = allowed
    elif mask.dtype == torch.bool:
        combined = allowed & mask
    else:
        combined = mask.expand(allowed.shape).masked_fill(~allowed, float("-inf"))
    return dense_attention_cpu(q, k, v, mask=combined, scale=SCALE, causal=causal)


CONTIGUOUS = torch.tensor(
    [
        [0] * 5 + [1] * 7,
        [9] * 3 + [4] * 3 + [2] * 6,  # arbitrary ids; length 3 twice
        [6] * 2 + [3] * 3 + [8] * 5 + [1] * 2,  # its length-5 run continues row 0's: gathered
    ]
)
NON_CONTIGUOUS = torch.tensor(
    [
        [0] * 5 + [1] * 7,
        [2] * 3 + [5] * 3 + [2] * 6,  # 2 reappears: this row falls back to the dense kernel
        [1, 0] * 6,
    ]
)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_attention_contiguous_uses_varlen(causal, monkeypatch):
    q, k, v = _batch()
    expected = _document_reference(q, k, v, CONTIGUOUS, causal)

    def no_dense(*args, **kwargs):
        raise AssertionError("contiguous segments must not fall back to the dense kernel")

    monkeypatch.setattr(cpu_varlen, "dense_attention_cpu", no_dense)
    out = document_attention_cpu(q, k, v, CONTIGUOUS, scale=SCALE, causal=causal)
    assert_close(out, expected)


def test_document_attention_matches_plain_sdpa():
    q, k, v = _batch(kv_heads=4)
    allowed = CONTIGUOUS[:, None, :, None] == CONTIGUOUS[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=SCALE)
    assert_close(document_attention_cpu(q, k, v, CONTIGUOUS, scale=SCALE), expected)


def test_document_attention_shared_segment_row():
    q, k, v = _batch()
    row = CONTIGUOUS[1:2]
    expected = _document_reference(q, k, v, row.expand(3, -1), False)
    assert_close(document_attention_cpu(q, k, v, row, scale=SCALE), expected)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_attention_non_contiguous_falls_back(causal, monkeypatch):
    q, k, v = _batch()
    fallback_rows = []
    real = cpu_varlen.dense_attention_cpu

    def recording(q, *args, **kwargs):
        fallback_rows.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(cpu_varlen, "dense_attention_cpu", recording)
    out = document_attention_cpu(q, k, v, NON_CONTIGUOUS, scale=SCALE, causal=causal)
    assert fallback_rows == [2]  # rows 1 and 2, in one call
    assert_close(out, _document_reference(q, k, v, NON_CONTIGUOUS, causal))


def _padding_masks():
    keep = torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, :5] = False  # every key of document 0 of row 0 is masked
    keep[2, :] = True
    keep[2, 11] = False
    additive_min = torch.zeros(3, 12).masked_fill(~keep, torch.finfo(torch.float32).min)
    additive_inf = torch.zeros(3, 12).masked_fill(~keep, float("-inf"))
    return {
        "bool": keep[:, None, None, :],
        "finite-min": additive_min[:, None, None, :],
        "minus-inf": additive_inf[:, None, None, :],
    }


@pytest.mark.parametrize("kind", ["bool", "finite-min", "minus-inf"])
@pytest.mark.parametrize("segments", [CONTIGUOUS, NON_CONTIGUOUS], ids=["varlen", "fallback"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_attention_key_padding_mask(kind, segments, causal):
    """Rows whose every key is masked come out as dense_attention_cpu gives them (zeros for
    bool and -inf, the document's uniform average for a finite fill)."""
    q, k, v = _batch()
    mask = _padding_masks()[kind]
    out = document_attention_cpu(q, k, v, segments, scale=SCALE, causal=causal, mask=mask)
    expected = _document_reference(q, k, v, segments, causal, mask)
    assert_close(out, expected)
    if kind != "finite-min" and segments is CONTIGUOUS:
        assert bool((out[0, :, :5] == 0).all())  # the fully masked document


def test_document_attention_mask_shapes():
    q, k, v = _batch(batch=1)
    segments = CONTIGUOUS[:1]
    keep = torch.ones(12, dtype=torch.bool)
    keep[3] = False
    expected = _document_reference(q, k, v, segments, False, keep[None, None, None, :])
    for shaped in (keep, keep[None], keep[None, None, None, :]):
        out = document_attention_cpu(q, k, v, segments, scale=SCALE, mask=shaped)
        assert_close(out, expected)
    q, k, v = _batch()
    with pytest.raises(ValueError, match="key padding mask"):
        document_attention_cpu(
            q, k, v, CONTIGUOUS, scale=SCALE, mask=torch.ones(3, 1, 12, 12, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="does not broadcast"):
        document_attention_cpu(
            q, k, v, CONTIGUOUS, scale=SCALE, mask=torch.ones(2, 1, 1, 12, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="segments must be"):
        document_attention_cpu(q, k, v, CONTIGUOUS[:, :5], scale=SCALE)


def test_document_attention_bf16():
    q, k, v = (t.bfloat16() for t in _batch())
    out = document_attention_cpu(q, k, v, CONTIGUOUS, scale=SCALE, causal=True)
    assert out.dtype == torch.bfloat16
    expected = _document_reference(q.float(), k.float(), v.float(), CONTIGUOUS, True)
    tol = exact_tolerance(torch.bfloat16)
    torch.testing.assert_close(out.float(), expected, atol=tol.atol, rtol=tol.rtol)


# --- padding removal -----------------------------------------------------------------------

VALID = {
    "right-padded": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]],
    "left-padded": [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]],
    "any-pattern": [[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 1]],
}


@pytest.mark.parametrize("pattern", VALID.values(), ids=VALID.keys())
def test_pack_offsets(pattern):
    valid = torch.tensor(pattern, dtype=torch.bool)
    indices, offsets = pack_offsets(valid)
    expected = [b * 6 + s for b in range(3) for s in range(6) if pattern[b][s]]
    assert indices.dtype == torch.long and offsets.dtype == torch.long
    assert indices.tolist() == expected
    assert offsets.tolist() == [0, *torch.tensor(pattern).sum(1).cumsum(0).tolist()]


@pytest.mark.parametrize("pattern", VALID.values(), ids=VALID.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding_removal_round_trip(pattern, causal):
    """Pack a padded batch, run varlen, unpack: the valid rows match padded SDPA with the key
    padding mask (causal over each row's valid tokens in order)."""
    valid = torch.tensor(pattern, dtype=torch.bool)
    batch, seq = valid.shape
    q, k, v = _batch(batch=batch, seq=seq)
    indices, offsets = pack_offsets(valid)

    def pack(t):  # [B, H, S, D] -> [H, N, D]
        return t.transpose(1, 2).flatten(0, 1)[indices].transpose(0, 1)

    packed = varlen_attention(pack(q), pack(k), pack(v), offsets, scale=SCALE, causal=causal)
    out = packed.new_zeros(batch * seq, *packed.transpose(0, 1).shape[1:])
    out = out.index_copy(0, indices, packed.transpose(0, 1)).unflatten(0, (batch, seq))
    allowed = valid[:, None, None, :]
    if causal:  # among valid tokens, in order: position order is the same
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    expected = dense_attention_cpu(q, k, v, mask=allowed, scale=SCALE).transpose(1, 2)
    assert_close(out[valid], expected[valid])


def test_pack_offsets_rejects_non_bool():
    with pytest.raises(ValueError, match=r"\[B, S\] bool"):
        pack_offsets(torch.ones(2, 3, dtype=torch.long))


# --- property test -------------------------------------------------------------------------

if given is not None:

    @settings(max_examples=40, deadline=None)
    @given(
        lengths=st.lists(st.integers(0, 9), min_size=1, max_size=10),
        causal=st.booleans(),
        heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
        seed=st.integers(0, 2**16),
    )
    def test_varlen_property_random_runs(lengths, causal, heads, seed):
        _check_varlen(lengths, causal, q_heads=heads[0], kv_heads=heads[1], seed=seed)

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_varlen_property_random_runs():
        pass


def test_varlen_seeded_random_runs():
    """The property test's check on fixed random run lengths (runs without hypothesis too)."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(12):
        count = int(torch.randint(1, 12, (1,), generator=gen))
        lengths = torch.randint(0, 10, (count,), generator=gen).tolist()
        _check_varlen(lengths, trial % 2 == 1, seed=trial)


@pytest.mark.parametrize("layout", ["head-major", "token-major", "other"])
def test_varlen_buckets_any_layout(layout):
    """Gathers by index_select on either contiguous layout, by advanced indexing otherwise."""
    lengths = [70, 5, 64, 81, 0, 66]
    q, k, v = _packed(4, 2, sum(lengths), seed=4)
    if layout == "token-major":
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    elif layout == "other":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    for causal in (False, True):
        out = varlen_attention(q, k, v, _offsets(lengths), scale=SCALE, causal=causal)
        assert_close(out, _masked_sdpa(q, k, v, lengths, causal))
