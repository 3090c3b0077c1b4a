"""Hybrid attention in torch, for CPU (issue 6): exact softmax in a local window plus linear
attention for the keys outside it, under one normalisation.

Entry points: :func:`hybrid_attention`, :func:`hybrid_attention_naive` (both re-exported by
:mod:`attnopt.runtime.cpu_linear`). Feature maps, masks and log-scales: ``linear_features``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnopt.runtime.linear_features import (
    FeatureMap,
    _block_rows,
    _key_log_weight,
    _Keys,
    _prepare,
    _query_rows,
    _row_log_scale,
)
from attnopt.runtime.reference import causal_mask, visible_keys_mask

__all__ = ["hybrid_attention", "hybrid_attention_naive"]


def _softmax_lse(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp (the CPU flash kernel when head sizes agree)."""
    if q.device.type == "cpu" and q.shape[-1] == v.shape[-1]:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    weights = scores.sub_(torch.where(finite, lse, 0.0).unsqueeze(-1)).exp_()
    return torch.matmul(weights, v), torch.where(finite, lse, 0.0)


#: Bytes of the per-step temporaries of the hybrid form (query rows per step follow from it):
#: large enough that a step is a few big calls, small enough to stay out of fresh-page territory.
_HYBRID_STEP_BYTES = 32 << 20


class _Layout(NamedTuple):
    """Geometry of the hybrid form in padded key coordinates (key ``j`` at ``j + left_pad``).

    Query block ``b`` (rows ``[b C, b C + C)``, C = ``chunk``) starts at padded key ``first + b C``,
    a chunk multiple, and scores the band ``[start(b), start(b) + band)`` with
    ``start(b) = first - reach + b C``; ``reach`` is the window rounded up to whole chunks.
    Linear terms inside the band only occur within ``edge`` keys of its two ends.
    """

    chunk: int
    reach: int
    left_pad: int
    num_blocks: int
    band: int
    edge: int
    first: int

    def band_start(self, block: int) -> int:
        """Padded key where block ``block``'s band starts (a chunk multiple)."""
        return self.first - self.reach + block * self.chunk


def _hybrid_layout(q_len: int, kv_len: int, window: int, causal: bool, chunk: int) -> _Layout:
    offset = kv_len - q_len
    reach = -(-window // chunk) * chunk
    left_pad = max(0, reach - offset)
    left_pad += -(offset + left_pad) % chunk
    band = chunk + reach * (1 if causal else 2)
    edge = min(band, reach - window + chunk - 1)
    return _Layout(chunk, reach, left_pad, -(-q_len // chunk), band, edge, offset + left_pad)


def _band_masks(layout: _Layout, window: int, causal: bool, group: int, device):
    """Row x band masks: ``inside`` the window, and ``linear`` (visible but outside it)."""
    rows = torch.arange(layout.chunk, device=device).unsqueeze(1)
    diff = torch.arange(layout.band, device=device).unsqueeze(0) - layout.reach - rows
    inside = (diff >= -window) & (diff <= (0 if causal else window))
    linear = diff < -window if causal else ~inside
    return inside.repeat(group, 1), linear.repeat(group, 1)


def _edges(linear: torch.Tensor, layout: _Layout, causal: bool) -> list:
    """``(band offset, mask)`` of the band columns where the linear part applies."""
    if layout.edge <= 0:
        return []
    if causal:
        return [(0, linear[:, : layout.edge])]
    if 2 * layout.edge >= layout.band:  # the two edges overlap: one span, the whole band
        return [(0, linear)]
    return [(0, linear[:, : layout.edge]), (layout.band - layout.edge, linear[:, -layout.edge :])]


def _windows(x: torch.Tensor, start: int, size: int, chunk: int, count: int) -> torch.Tensor:
    """Views ``x[..., start + c chunk : ... + size, :]`` for ``c < count``, stacked (no copy)."""
    return x[..., start:, :].unfold(-2, size, chunk)[..., :count, :, :].transpose(-1, -2)


def _rows(x: torch.Tensor, start: int, stop: int, fill: float = 0.0) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x [..., S, X]``, ``fill`` where outside ``[0, S)``."""
    length = x.shape[-2]
    lo, hi = min(max(start, 0), length), min(max(stop, 0), length)
    out = x.new_full((*x.shape[:-2], stop - start, x.shape[-1]), fill)
    if hi > lo:
        out[..., lo - start : hi - start, :] = x[..., lo:hi, :]
    return out


def _chunk_states(phi_k: torch.Tensor, value: torch.Tensor, chunk: int) -> torch.Tensor:
    """``phi(K_c)^T [V_c, 1]`` of consecutive chunks: ``[B, Hkv, n, F, Dv + 1]``."""
    batch, kv_heads, length, features = phi_k.shape
    phi_k = phi_k.reshape(batch, kv_heads, length // chunk, chunk, features)
    value = value.reshape(batch, kv_heads, length // chunk, chunk, value.shape[-1])
    return torch.matmul(phi_k.transpose(-1, -2), value)


def _merge(soft, log_soft, parts) -> torch.Tensor:
    """``(e^{a-m} soft + sum e^{b-m} num_b) / (e^{a-m} + sum e^{b-m} den_b)``, m the max exponent.

    ``soft`` is normalised softmax output with log-sum-exp ``a``; ``parts`` are ``(lin, b)`` with
    ``lin = [num, den]`` on the last axis and log-scale ``b`` (None = 0).
    """
    zero = torch.zeros((), dtype=soft.dtype, device=soft.device)
    logs = [zero if log is None else log for _, log in parts]
    row_max = log_soft
    for log in logs:
        row_max = torch.maximum(row_max, log)
    den = torch.exp(log_soft - row_max)
    num = soft.mul_(den)
    dv = soft.shape[-1]
    for (lin, _), log in zip(parts, logs):
        weight = torch.exp(log - row_max)
        num.add_(lin[..., :dv] * weight)
        den = den + lin[..., dv:] * weight
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


class _Hybrid:
    """One hybrid-attention call: query blocks in steps, linear sums carried between steps."""

    def __init__(self, q, k, v, feature_map, log_weight, *, window, causal, scale, chunk):
        self.q, self.k, self.v, self.feature_map = q, k, v, feature_map
        self.window, self.causal, self.scale = window, causal, scale
        batch, q_heads, q_len, _ = q.shape
        self.kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.layout = _hybrid_layout(q_len, self.kv_len, window, causal, chunk)
        self.compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.log_weight = log_weight
        # Per query row and head: phi(q), q, two [num, den] rows and the edge kernels; plus one
        # mask row of the band per row (shared by the heads).
        per_head = (
            feature_map.feature_dim + q.shape[-1] + 2 * (v.shape[-1] + 1) + 2 * self.layout.edge
        )
        row_bytes = 4 * (batch * q_heads * per_head + self.layout.band)
        self.blocks_per_step = max(1, min(_HYBRID_STEP_BYTES // row_bytes, 8192) // chunk)
        group = q_heads // self.kv_heads
        inside, linear = _band_masks(self.layout, window, causal, group, q.device)
        self.window_bias = torch.zeros(inside.shape, dtype=self.compute, device=q.device)
        self.window_bias.masked_fill_(~inside, float("-inf"))
        self.edges = _edges(linear, self.layout, causal)
        no_mask = torch.zeros(1, 1, self.kv_len, 1, dtype=self.compute, device=q.device)
        self.key_bias = no_mask if log_weight is None else log_weight.transpose(-1, -2)

    def keys(self) -> _Keys:
        q_len = self.q.shape[2]
        max_len = max(q_len, self.kv_len)
        return _Keys(self.k, self.v, self.feature_map, self.log_weight, max_len, True)

    def zero_state(self) -> torch.Tensor:
        shape = (self.q.shape[0], self.kv_heads, self.feature_map.feature_dim, self.v.shape[-1] + 1)
        return torch.zeros(shape, dtype=self.compute, device=self.q.device)

    def steps(self, reverse: bool = False):
        """``(first block, number of blocks)`` of every step."""
        firsts = range(0, self.layout.num_blocks, self.blocks_per_step)
        for first in reversed(firsts) if reverse else firsts:
            yield first, min(self.blocks_per_step, self.layout.num_blocks - first)

    def absorb(self, keys: _Keys, total: torch.Tensor, start: int, stop: int) -> None:
        """Add ``phi(K)^T [V, 1]`` of padded keys ``[start, stop)`` to ``total``."""
        step = _block_rows(total.shape[0] * total.shape[1], self.feature_map.feature_dim)
        pad = self.layout.left_pad
        for lo in range(start, stop, step):
            phi_k, value = keys.rows(lo - pad, min(stop, lo + step) - pad, [total])
            total.add_(torch.matmul(phi_k.transpose(-1, -2), value))

    def query_blocks(self, first: int, count: int):
        """``phi(Q)``, its log-scale (or None) and q of ``count`` blocks: ``[B, Hkv, n, R, X]``."""
        chunk, q_len = self.layout.chunk, self.q.shape[2]
        start, stop = first * chunk, min(q_len, (first + count) * chunk)
        phi, log_q = _query_rows(self.q, self.feature_map, start, stop, self.kv_heads, self.kv_len)
        q = self.q[:, :, start:stop].to(self.compute).reshape(*phi.shape[:4], -1)
        return [None if x is None else self.to_blocks(x, count) for x in (phi, log_q, q)]

    def to_blocks(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """``[B, Hkv, G, rows, X]`` -> ``[B, Hkv, count, G C, X]`` (zero padded rows)."""
        batch, kv_heads, group, length, width = x.shape
        chunk = self.layout.chunk
        if length != count * chunk:
            x = F.pad(x, (0, 0, 0, count * chunk - length))
        x = x.reshape(batch, kv_heads, group, count, chunk, width).transpose(2, 3)
        return x.reshape(batch, kv_heads, count, group * chunk, width)

    def right_parts(self):
        """Non-causal: per row ``phi(q) [S, z]`` over the keys after its block's band.

        Runs backwards, so each block's suffix is a sum of exactly its keys (no cancellation).
        Returns ``[B, Hkv, n, R, Dv + 1]`` and the log-scale per row (None without one).
        """
        layout, chunk = self.layout, self.layout.chunk
        keys, suffix = self.keys(), self.zero_state()
        after_last = layout.band_start(layout.num_blocks - 1) + layout.band
        self.absorb(keys, suffix, after_last, layout.left_pad + self.kv_len)
        parts = logs = None
        for first, count in self.steps(reverse=True):
            start = layout.band_start(first) + layout.band - layout.left_pad
            phi_k, value = keys.rows(start, start + count * chunk, [suffix])
            within = _chunk_states(phi_k, value, chunk).flip(2).cumsum(2).flip(2)
            phi_q, log_q, _ = self.query_blocks(first, count)
            part = torch.matmul(phi_q, within.add_(suffix.unsqueeze(2)))
            suffix.copy_(within[:, :, 0])
            if parts is None:
                parts = part.new_empty(*part.shape[:2], layout.num_blocks, *part.shape[3:])
            parts[:, :, first : first + count] = part
            log = _row_log_scale(log_q, keys.reference)
            if log is not None:
                if logs is None:
                    logs = log.new_empty(*log.shape[:2], layout.num_blocks, *log.shape[3:])
                logs[:, :, first : first + count] = log
            del phi_k, value, within, phi_q, part
        return parts, logs

    def softmax_part(self, q_blocks, start: int, stop: int, count: int):
        """Windowed softmax of ``count`` blocks over padded keys ``[start, stop)``, and its lse."""
        layout, chunk, pad = self.layout, self.layout.chunk, self.layout.left_pad
        keys = _rows(self.k, start - pad, stop - pad).to(self.compute)
        values = _rows(self.v, start - pad, stop - pad).to(self.compute)
        key_bias = _rows(self.key_bias, start - pad, stop - pad, float("-inf"))
        band_bias = _windows(key_bias, 0, layout.band, chunk, count).transpose(-1, -2)
        bias = self.window_bias + band_bias  # [B | 1, Hkv | 1, count, R, band]
        has_key = (bias > float("-inf")).any(-1, keepdim=True)
        soft = q_blocks.new_empty(*q_blocks.shape[:-1], self.v.shape[-1])
        log_soft = q_blocks.new_empty(*q_blocks.shape[:-1], 1)
        for index in range(q_blocks.shape[0]):
            bias_index = min(index, bias.shape[0] - 1)
            bias_b = bias[bias_index].expand(self.kv_heads, *bias.shape[2:])
            window_keys = _windows(keys[index], 0, layout.band, chunk, count)
            window_values = _windows(values[index], 0, layout.band, chunk, count)
            out, lse = _softmax_lse(q_blocks[index], window_keys, window_values, bias_b, self.scale)
            soft[index] = out
            log_soft[index] = torch.where(has_key[bias_index], lse.unsqueeze(-1), float("-inf"))
        return soft, log_soft

    def run(self) -> torch.Tensor:
        """The hybrid output ``[B, Hq, Sq, Dv]`` (compute dtype)."""
        layout, chunk = self.layout, self.layout.chunk
        right, right_log = (None, None) if self.causal else self.right_parts()
        keys, prefix = self.keys(), self.zero_state()
        self.absorb(keys, prefix, 0, layout.band_start(0))
        out = None
        for first, count in self.steps():
            start = layout.band_start(first)
            stop = start + (count - 1) * chunk + layout.band
            phi_k, value = keys.rows(start - layout.left_pad, stop - layout.left_pad, [prefix])
            inclusive = _chunk_states(
                phi_k[:, :, : count * chunk], value[:, :, : count * chunk], chunk
            )
            inclusive = inclusive.cumsum_(2)
            exclusive = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], 2)
            phi_q, log_q, q_blocks = self.query_blocks(first, count)
            lin = torch.matmul(phi_q, exclusive.add_(prefix.unsqueeze(2)))
            for offset, mask in self.edges:
                edge_keys = _windows(phi_k, offset, mask.shape[-1], chunk, count)
                kernel = torch.matmul(phi_q, edge_keys.transpose(-1, -2)).masked_fill_(~mask, 0.0)
                lin += torch.matmul(kernel, _windows(value, offset, mask.shape[-1], chunk, count))
            prefix.add_(inclusive[:, :, -1])
            parts = [(lin, _row_log_scale(log_q, keys.reference))]
            if right is not None:
                blocks = slice(first, first + count)
                parts.append(
                    (right[:, :, blocks], None if right_log is None else right_log[:, :, blocks])
                )
            soft, log_soft = self.softmax_part(q_blocks, start, stop, count)
            merged = _merge(soft, log_soft, parts)
            if out is None:
                out = merged.new_empty(*merged.shape[:2], layout.num_blocks, *merged.shape[3:])
            out[:, :, first : first + count] = merged
            # Free this step's temporaries before the next step allocates its own.
            del phi_k, value, inclusive, exclusive, phi_q, q_blocks, lin, parts, soft, merged
        batch, kv_heads, q_len, dv = (
            self.q.shape[0],
            self.kv_heads,
            self.q.shape[2],
            self.v.shape[-1],
        )
        group = self.q.shape[1] // kv_heads
        out = out.view(batch, kv_heads, layout.num_blocks, group, chunk, dv).transpose(2, 3)
        out = out.reshape(batch, kv_heads, group, layout.num_blocks * chunk, dv)[:, :, :, :q_len]
        return out.reshape(batch, kv_heads * group, q_len, dv)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    window: int,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Exact softmax inside a local window plus linear attention outside it, one normalisation.

    With ``p_i = i + Sk - Sq`` the window ``W_i`` is ``|j - p_i| <= window`` (causal:
    ``p_i - window <= j <= p_i``); the linear part covers the other visible keys ``O_i``. The
    linear kernel is ``exp(lq_i + lk) phi(q_i) . phi(k_j)`` (see :class:`Features`); with
    ``b_i = lq_i + lk``, ``a_i = log sum_{W_i} e^{s_ij}`` and ``m_i = max(a_i, b_i)``::

        out_i = (sum_{W_i} e^{s_ij - m_i} v_j + e^{b_i - m_i} phi(q_i) S_i)
              / (sum_{W_i} e^{s_ij - m_i}     + e^{b_i - m_i} phi(q_i) z_i),
        S_i = sum_{O_i} phi(k_j) v_j^T,  z_i = sum_{O_i} phi(k_j):

    numerators and denominators of both parts summed, all scaled by the same ``e^{-m_i}`` (every
    exponent <= 0, so nothing overflows). For FAVOR+ the linear kernel estimates ``e^{s_ij}`` and
    this approximates softmax; for elu/relu/cosformer ``b_i = 0`` and the kernel values are mixed
    with ``e^{s_ij}`` as they are.

    Computation, over query blocks of ``chunk`` rows (all alike once the keys are padded), a step
    of blocks at a time. Softmax part: each block scores a band of ``chunk + 2 reach`` keys
    (causal ``chunk + reach``; ``reach`` = window rounded up to whole chunks) with the window as
    an additive mask, in the CPU flash kernel, which also returns ``a_i`` (one call per step and
    batch entry, the bands as overlapping views). Linear part: band keys outside a row's window,
    which only occur within ``edge`` keys of the band's ends, via a masked ``phi(Q) phi(K)^T`` of
    that width; keys before the band via a prefix sum of chunk states ``phi(K_c)^T [V_c, 1]``
    carried forward; non-causal keys after the band via suffix sums from a first, backward sweep
    (kept as per-row ``phi(q_i) [S, z]``). Every sum adds exactly the wanted keys (a total minus
    the window would cancel badly). FAVOR+ stabilisers of different key blocks are reconciled
    through the running reference of ``linear_features``. Time O(N (chunk + 2 window) D +
    N F Dv); memory O(N Dv) plus per-step temporaries (``_HYBRID_STEP_BYTES``).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the linear part's feature map (FAVOR+ must use the same ``scale``).
        window: local window radius ``w >= 0``.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention`.
        scale: score scale (default: the feature map's ``scale`` if it has one, else ``D ** -0.5``).
        chunk: query block and key chunk length.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype; rows that see no key are zeros.
    """
    scale = _hybrid_scale(feature_map, q.shape[-1], scale)
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    window = min(window, q.shape[2] + k.shape[2])  # wider windows see the same keys
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = _key_log_weight(mask, q_heads, kv_heads, compute)
    hybrid = _Hybrid(
        q, k, v, feature_map, log_weight, window=window, causal=causal, scale=scale, chunk=chunk
    )
    return hybrid.run().to(q.dtype)


def _hybrid_scale(feature_map: FeatureMap, head_dim: int, scale: float | None) -> float:
    map_scale = getattr(feature_map, "scale", None)
    if scale is None:
        return map_scale if map_scale is not None else head_dim**-0.5
    if feature_map.estimates_exp and map_scale is not None and not math.isclose(scale, map_scale):
        raise ValueError(f"scale {scale} differs from the feature map's scale {map_scale}")
    return scale


def hybrid_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    window: int,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Quadratic-form reference of :func:`hybrid_attention` (full ``Sq x Sk`` matrices).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the linear part's feature map.
        window: local window radius.
        causal: bottom-right aligned causal rule.
        mask: key padding mask, as in :func:`linear_attention`.
        scale: score scale, as in :func:`hybrid_attention`.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    scale = _hybrid_scale(feature_map, q.shape[-1], scale)
    prep = _prepare(q, k, v, feature_map, mask)
    batch, kv_heads, group, q_len, _ = prep.phi_q.shape
    kv_len = k.shape[2]
    keys = k.to(prep.value.dtype).unsqueeze(2)
    scores = torch.matmul(
        q.to(keys.dtype).reshape(prep.phi_q.shape[:4] + (-1,)), keys.transpose(-1, -2)
    )
    scores = scores * scale
    if prep.key_log_weight is not None:
        scores = scores + prep.key_log_weight.unsqueeze(2)
    right = 0 if causal else window
    inside = visible_keys_mask(
        q_len, kv_len, window_left=window, window_right=right, device=q.device
    )
    visible = causal_mask(q_len, kv_len, q.device) if causal else torch.ones_like(inside)
    scores = scores.masked_fill(~inside, float("-inf"))
    log_lin = prep.log_q if prep.log_q is not None else torch.zeros((), dtype=scores.dtype)
    row_max = torch.maximum(scores.amax(-1, keepdim=True), log_lin)
    kernel = torch.matmul(prep.phi_q, prep.phi_k.unsqueeze(2).transpose(-1, -2))
    kernel = kernel * torch.exp(log_lin - row_max) * (visible & ~inside)
    weights = torch.exp(scores - row_max) + kernel
    num = torch.matmul(weights, prep.value.unsqueeze(2))
    den = weights.sum(-1, keepdim=True)
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    return out.reshape(batch, kv_heads * group, q_len, -1).to(q.dtype)
