"""Linear and hybrid attention kernels (attnopt.runtime.cpu) against their references."""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.ir.attention_reference import attention_reference
from attnopt.ir.linear_attention import FavorFeatureMap, make_feature_map
from attnopt.ir.linear_attention import hybrid_attention_reference as hybrid_attention_naive
from attnopt.ir.linear_attention import linear_attention_reference as linear_attention_naive
from attnopt.runtime.cpu import hybrid as cpu_hybrid
from attnopt.runtime.cpu import linear_features
from attnopt.runtime.cpu.hybrid import hybrid_attention
from attnopt.runtime.cpu.linear import linear_attention
from attnopt.tolerances import assert_close

FEATURE_MAPS = ["elu", "relu", "favor", "cosformer"]
# (q_len, kv_len): self, cross with more keys, cross with more queries.
LENGTHS = [(67, 67), (40, 75), (75, 40)]
HEADS = [(4, 4), (4, 2), (4, 1)]  # (Hq, Hkv): MHA, GQA, MQA


def _qkv(q_heads, kv_heads, q_len, kv_len, dim=16, dv=16, batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dv, generator=generator, dtype=dtype)
    return q, k, v


def _padding_mask(batch, kv_len, kind):
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    keep[1, ..., kv_len - 7 :] = False
    keep[0, ..., 3] = False
    if kind == "bool":
        return keep
    masked = -1e9 if kind == "float" else torch.finfo(torch.float32).min
    return torch.zeros(keep.shape).masked_fill(~keep, masked)


def _feature_map(name, dim=16):
    return make_feature_map(name, dim, num_features=32, seed=1)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("heads", HEADS)
def test_chunked_matches_naive(name, causal, lengths, heads):
    q, k, v = _qkv(*heads, *lengths)
    feature_map = _feature_map(name)
    expected = linear_attention_naive(q, k, v, feature_map, causal=causal)
    assert_close(linear_attention(q, k, v, feature_map, causal=causal, chunk=16), expected)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(150, 150), (130, 210), (210, 130)])
def test_row_blocks_match_naive(monkeypatch, name, causal, lengths):
    """Several row blocks (64 rows each): carried state, FAVOR+ stabilisers rescaled per block."""
    monkeypatch.setattr(linear_features, "_BLOCK_BYTES", 1)
    q, k, v = _qkv(4, 2, *lengths, dv=8)
    q, k = q * 2.0, k * 2.0  # spread the FAVOR+ stabilisers of different blocks
    mask = _padding_mask(2, lengths[1], "float")
    feature_map = _feature_map(name)
    expected = linear_attention_naive(q, k, v, feature_map, causal=causal, mask=mask)
    actual = linear_attention(q, k, v, feature_map, causal=causal, mask=mask, chunk=16)
    assert_close(actual, expected)


@pytest.mark.parametrize("chunk", [1, 7, 64, 128])
def test_causal_chunk_size_does_not_matter(chunk):
    q, k, v = _qkv(4, 2, 50, 50, dv=8)
    feature_map = _feature_map("elu")
    expected = linear_attention_naive(q, k, v, feature_map, causal=True)
    assert_close(linear_attention(q, k, v, feature_map, causal=True, chunk=chunk), expected)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("kind", ["bool", "float", "finfo_min"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_matches_naive(name, kind, causal):
    q, k, v = _qkv(4, 2, 33, 33)
    mask = _padding_mask(2, 33, kind)
    feature_map = _feature_map(name)
    expected = linear_attention_naive(q, k, v, feature_map, causal=causal, mask=mask)
    actual = linear_attention(q, k, v, feature_map, causal=causal, mask=mask, chunk=8)
    assert_close(actual, expected)


@pytest.mark.parametrize("name", ["elu", "relu", "favor"])
def test_padded_keys_contribute_nothing(name):
    """Masking the last keys equals dropping them (FAVOR+: same key stabiliser by construction)."""
    q, k, v = _qkv(2, 2, 20, 30, batch=1)
    mask = torch.ones(1, 1, 1, 30, dtype=torch.bool)
    mask[..., 24:] = False
    feature_map = _feature_map(name)
    dropped = linear_attention(q, k[:, :, :24], v[:, :, :24], feature_map)
    assert_close(linear_attention(q, k, v, feature_map, mask=mask), dropped)


def test_query_dependent_mask_is_refused():
    q, k, v = _qkv(2, 2, 8, 8)
    with pytest.raises(ValueError, match="key padding"):
        linear_attention(q, k, v, _feature_map("elu"), mask=torch.ones(8, 8, dtype=torch.bool))


def test_rows_without_keys_are_zero():
    """Causal with more queries than keys: the first rows see no key (as the reference)."""
    q, k, v = _qkv(2, 2, 30, 10)
    out = linear_attention(q, k, v, _feature_map("elu"), causal=True, chunk=8)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    reference = attention_reference(q, k, v, causal=True)
    assert torch.equal(reference[:, :, :20], out[:, :, :20])


def test_favor_projection_is_block_orthogonal_with_chi_norms():
    feature_map = FavorFeatureMap(16, num_features=48, seed=3, scale=0.25)
    directions = torch.nn.functional.normalize(feature_map.projection.double(), dim=1)
    for block in directions.split(16):
        torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64))
    norms = feature_map.projection.norm(dim=1)
    assert abs(norms.mean().item() - math.sqrt(16)) < 1.0


def test_favor_error_falls_with_more_features():
    """Relative error of FAVOR+ against exact softmax attention, averaged over seeds.

    The estimator's relative variance per feature is ``exp(|q' + k'|^2) - 1``: inputs of moderate
    norm keep it O(1), so the error visibly follows ``1 / sqrt(num_features)``.
    """
    q, k, v = _qkv(2, 2, 64, 64, dim=16, dv=16, batch=1, seed=5, dtype=torch.float64)
    q, k = q * 0.35, k * 0.35
    exact = attention_reference(q, k, v)
    errors = []
    for num_features in (16, 64, 256):
        per_seed = []
        for seed in range(6):
            feature_map = make_feature_map("favor", 16, num_features=num_features, seed=seed)
            approx = linear_attention(q, k, v, feature_map)
            per_seed.append(((approx - exact).norm() / exact.norm()).item())
        errors.append(sum(per_seed) / len(per_seed))
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1], errors
    assert errors[2] < 0.08, errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_cosformer_decomposition_equals_cosine_reweighting(causal, lengths):
    """phi(q_i) . phi(k_j) == relu(q_i) . relu(k_j) cos(pi (p_i - j) / 2M), p_i = i + Sk - Sq."""
    q_len, kv_len = lengths
    q, k, v = _qkv(2, 2, q_len, kv_len, dtype=torch.float64)
    positions = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len) - torch.arange(kv_len)
    positions = positions.to(torch.float64)
    weights = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    weights = weights * torch.cos(math.pi * positions / (2 * max(q_len, kv_len)))
    if causal:
        weights = weights * (positions >= 0)
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)
    actual = linear_attention(q, k, v, _feature_map("cosformer"), causal=causal, chunk=16)
    assert_close(actual, expected)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_hybrid_with_full_window_is_softmax(name, causal, lengths):
    q, k, v = _qkv(4, 2, *lengths)
    mask = _padding_mask(2, lengths[1], "bool")
    expected = attention_reference(q, k, v, causal=causal, mask=mask)
    window = 200 if name != "elu" else 10**9  # any window >= Sq + Sk means all keys
    out = hybrid_attention(q, k, v, _feature_map(name), window=window, causal=causal, mask=mask)
    assert_close(out, expected)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("window", [0, 5, 23])
def test_hybrid_matches_naive(name, causal, lengths, window):
    q, k, v = _qkv(4, 2, *lengths)
    feature_map = _feature_map(name)
    expected = hybrid_attention_naive(q, k, v, feature_map, window=window, causal=causal)
    actual = hybrid_attention(q, k, v, feature_map, window=window, causal=causal, chunk=8)
    assert_close(actual, expected)


@pytest.mark.parametrize("name", ["elu", "favor", "cosformer"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(90, 90), (60, 140), (140, 60)])
def test_hybrid_steps_match_naive(monkeypatch, name, causal, lengths):
    """One query block per step and small key blocks: carried prefix/suffix sums and FAVOR+
    stabilisers rescaled between steps."""
    monkeypatch.setattr(linear_features, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(cpu_hybrid, "_HYBRID_STEP_BYTES", 1)
    q, k, v = _qkv(4, 2, *lengths)
    q, k = q * 1.5, k * 1.5
    mask = _padding_mask(2, lengths[1], "bool")
    feature_map = _feature_map(name)
    kwargs = {"window": 20, "causal": causal, "mask": mask}
    expected = hybrid_attention_naive(q, k, v, feature_map, **kwargs)
    assert_close(hybrid_attention(q, k, v, feature_map, chunk=16, **kwargs), expected)


@pytest.mark.parametrize("dv", [16, 8])  # CPU flash kernel path, and the plain torch path
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("heads", HEADS)
def test_hybrid_mask_gqa_head_sizes(dv, kind, heads):
    q, k, v = _qkv(*heads, 45, 45, dv=dv)
    mask = _padding_mask(2, 45, kind)
    feature_map = _feature_map("favor")
    for causal in (False, True):
        expected = hybrid_attention_naive(q, k, v, feature_map, window=6, causal=causal, mask=mask)
        actual = hybrid_attention(q, k, v, feature_map, window=6, causal=causal, mask=mask, chunk=4)
        assert_close(actual, expected)


def _hybrid_by_rows(q, k, v, feature_map, window, causal):
    """The hybrid formula one query at a time, in float64, without any max subtraction."""
    scale = feature_map.scale if hasattr(feature_map, "scale") else q.shape[-1] ** -0.5
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos, max_len = torch.arange(q_len) + kv_len - q_len, max(q_len, kv_len)
    fq = feature_map(q, is_query=True, positions=q_pos, max_len=max_len)
    fk = feature_map(k, is_query=False, positions=torch.arange(kv_len), max_len=max_len)
    log_q = 0.0 if fq.log_scale is None else fq.log_scale
    log_k = 0.0 if fk.log_scale is None else fk.log_scale
    out = torch.zeros(q.shape[:3] + v.shape[-1:], dtype=torch.float64)
    for head in range(q.shape[1]):
        for row in range(q_len):
            pos = row + kv_len - q_len
            num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
            for key in range(kv_len):
                if causal and key > pos:
                    continue
                if pos - window <= key <= pos + (0 if causal else window):
                    weight = torch.exp(scale * q[0, head, row] @ k[0, head, key])
                else:
                    lq = log_q if isinstance(log_q, float) else log_q[0, head, row, 0]
                    lk = log_k if isinstance(log_k, float) else log_k[0, head, 0, 0]
                    kernel = fq.values[0, head, row] @ fk.values[0, head, key]
                    weight = torch.exp(torch.as_tensor(lq + lk)) * kernel
                num, den = num + weight * v[0, head, key], den + weight
            out[0, head, row] = num / den
    return out


@pytest.mark.parametrize("name", ["elu", "favor", "cosformer"])
@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_naive_matches_row_by_row_formula(name, causal):
    q, k, v = _qkv(2, 2, 12, 12, dim=8, dv=4, batch=1, dtype=torch.float64)
    feature_map = make_feature_map(name, 8, num_features=16, seed=2)
    expected = _hybrid_by_rows(q, k, v, feature_map, window=3, causal=causal)
    actual = hybrid_attention_naive(q, k, v, feature_map, window=3, causal=causal)
    assert_close(actual, expected)


def test_hybrid_favor_is_closer_to_softmax_than_linear_favor():
    """Peaked (diagonal) attention: the exact window takes the peak FAVOR+ estimates badly."""
    generator = torch.Generator().manual_seed(9)
    k = torch.randn(1, 2, 128, 16, generator=generator)
    q = 1.5 * k + 0.3 * torch.randn(k.shape, generator=generator)
    v = torch.randn(1, 2, 128, 16, generator=generator)
    exact = attention_reference(q, k, v)
    linear_error = hybrid_error = 0.0
    for seed in range(3):
        feature_map = make_feature_map("favor", 16, num_features=64, seed=seed)
        linear_error += (linear_attention(q, k, v, feature_map) - exact).norm()
        hybrid_error += (hybrid_attention(q, k, v, feature_map, window=4) - exact).norm()
    assert hybrid_error < 0.7 * linear_error


def test_hybrid_refuses_a_scale_the_favor_map_was_not_built_for():
    q, k, v = _qkv(2, 2, 8, 8)
    feature_map = make_feature_map("favor", 16, num_features=16, scale=0.25)
    with pytest.raises(ValueError, match="scale"):
        hybrid_attention(q, k, v, feature_map, window=2, scale=0.5)


def test_make_feature_map_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown feature map"):
        make_feature_map("softmax", 16)
    assert make_feature_map("cosformer", 16).feature_dim == 32
    assert make_feature_map("favor", 64).feature_dim == 64 * 4


@pytest.mark.parametrize("name", ["elu", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_rows_whose_window_keys_are_all_masked(name, causal):
    """Window 0 on a masked key: the row's softmax part is empty, only the linear part counts."""
    q, k, v = _qkv(4, 2, 70, 70)
    mask = _padding_mask(2, 70, "bool")
    feature_map = _feature_map(name)
    kwargs = {"window": 0, "causal": causal, "mask": mask}
    expected = hybrid_attention_naive(q, k, v, feature_map, **kwargs)
    actual = hybrid_attention(q, k, v, feature_map, chunk=16, **kwargs)
    assert torch.isfinite(actual).all()
    assert_close(actual, expected)


def test_hybrid_long_rows_cross_the_interior_and_both_ends():
    """Enough blocks for the unmasked interior path, the padded ends and several steps."""
    q, k, v = _qkv(2, 2, 333, 333, batch=1)
    feature_map = _feature_map("elu")
    for window in (0, 17, 64):
        expected = hybrid_attention_naive(q, k, v, feature_map, window=window)
        assert_close(hybrid_attention(q, k, v, feature_map, window=window, chunk=16), expected)


@pytest.mark.parametrize("name", ["elu", "favor"])
def test_hybrid_survives_very_negative_window_scores(name):
    """Window log-sum-exp far below the linear part's scale (a constant -120 mask on every key):
    the mix is normalised per part, so the window part does not underflow to nothing."""
    q, k, v = _qkv(2, 2, 20, 20, batch=1)
    mask = torch.full((1, 1, 1, 20), -120.0)
    expected = attention_reference(q, k, v, mask=mask)
    out = hybrid_attention(q, k, v, _feature_map(name), window=100, mask=mask)
    assert_close(out, expected)
    naive = hybrid_attention_naive(q, k, v, _feature_map(name), window=100, mask=mask)
    assert_close(naive, expected)


@pytest.mark.parametrize("lengths", [(0, 9), (9, 0), (0, 0)])
def test_hybrid_empty_lengths(lengths):
    q, k, v = _qkv(2, 2, *lengths)
    for fn in (hybrid_attention, hybrid_attention_naive):
        out = fn(q, k, v, _feature_map("elu"), window=3)
        assert out.shape == (2, 2, lengths[0], 16)
        assert not out.any()
