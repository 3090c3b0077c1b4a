"""Hybrid attention in torch, for CPU (issue 6): exact softmax in a local window plus linear
attention for the keys outside it, under one normalisation.

Entry point: :func:`hybrid_attention`; its reference is
:func:`attnopt.ir.linear_attention.hybrid_attention_reference`. Feature maps, masks and log-scales:
:mod:`attnopt.ir.linear_attention`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnopt.ir.attention_reference import mask_is_inert
from attnopt.ir.linear_attention import FeatureMap, hybrid_scale, mix_parts, prepare_features

__all__ = ["hybrid_attention"]


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


#: Bytes of the per-step temporaries (states, edge kernels, materialised window biases); the
#: number of query blocks per step follows from it.
_HYBRID_STEP_BYTES = 64 << 20


def _merge(soft, log_soft, lin, log_lin) -> torch.Tensor:
    """Mix the softmax part (output ``soft``, log-sum-exp ``a``, ``-inf``: no window key) with the
    linear part ``lin = [num, den]`` (last axis) of log-scale ``b`` (None = 0): its average
    ``num / den`` has log mass ``c = b + log den`` (see :func:`attnopt.ir.linear_attention.mix_parts`)."""
    dv = soft.shape[-1]
    den = lin[..., dv:]
    lin_avg = torch.where(den > 0, lin[..., :dv] / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    log_mass = torch.log(den)
    if log_lin is not None:
        log_mass = log_mass + log_lin
    return mix_parts(soft, log_soft, lin_avg, log_mass)


class _Geometry(NamedTuple):
    """Query blocks of ``chunk`` rows (``blocks`` of them, the last zero padded) and sizes."""

    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    chunk: int
    blocks: int

    @property
    def offset(self) -> int:
        """Position of query 0 among the keys (bottom-right alignment)."""
        return self.kv_len - self.q_len

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``[B, Hkv, G, Sq, X]`` -> block-major ``[blocks, B, Hkv, G C, X]`` (zero padded).

        Block-major, a step's slice of blocks stays one uniformly strided batch for ``matmul``.
        """
        padded = self.blocks * self.chunk
        if padded != x.shape[-2]:
            x = F.pad(x, (0, 0, 0, padded - x.shape[-2]))
        x = x.reshape(self.batch, self.kv_heads, self.group, self.blocks, self.chunk, -1)
        shape = (self.blocks, self.batch, self.kv_heads, self.group * self.chunk, -1)
        return x.permute(3, 0, 1, 2, 4, 5).reshape(shape).contiguous()

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`: ``[blocks, B, Hkv, G C, X]`` -> ``[B, Hkv, G, Sq, X]``."""
        x = x.reshape(self.blocks, self.batch, self.kv_heads, self.group, self.chunk, -1)
        x = x.permute(1, 2, 3, 0, 4, 5).reshape(
            self.batch, self.kv_heads, self.group, -1, x.shape[-1]
        )
        return x[:, :, :, : self.q_len]

    def blocks_per_step(self, bytes_per_block: int) -> int:
        """Query blocks per step so that a step's temporaries stay near the step budget."""
        return max(1, min(self.blocks, _HYBRID_STEP_BYTES // max(1, bytes_per_block)))


def _rows(x: torch.Tensor, start: int, stop: int, fill: float = 0.0) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x [..., S, X]``: a view inside ``[0, S)``, else a copy padded
    with ``fill``."""
    length = x.shape[-2]
    if 0 <= start and stop <= length:
        return x[..., start:stop, :]
    lo, hi = min(max(start, 0), length), min(max(stop, 0), length)
    out = x.new_full((*x.shape[:-2], stop - start, x.shape[-1]), fill)
    if hi > lo:
        out[..., lo - start : hi - start, :] = x[..., lo:hi, :]
    return out


class _Hybrid:
    """One hybrid-attention call over query blocks of ``chunk`` rows, a step of blocks at a time.

    Keys are read on three grids, each a view of the key rows away from the sequence ends:
    the softmax band of block ``b`` (``chunk + 2 window`` keys, causal ``chunk + window``, from
    ``p_{b C} - window``), and two chunk grids for the linear part, ``L`` starting at
    ``p_0 - window`` and ``R`` (non-causal) at ``p_0 + window + 1``. Row ``r`` of block ``b``
    takes, linearly, every ``L`` chunk before ``b`` and rows ``< r`` of ``L`` chunk ``b`` (the keys
    ``j < p - window``), and every ``R`` chunk after ``b`` and rows ``>= r`` of ``R`` chunk ``b``
    (the keys ``j > p + window``): whole chunks as carried prefix / suffix sums of chunk states
    ``phi(K_c)^T [V_c, 1]``, the two partial chunks as one masked ``phi(Q) [phi(K_L); phi(K_R)]^T``
    of width ``2 chunk``. Every sum adds exactly the wanted keys.
    """

    def __init__(self, geo: _Geometry, q, k, v, phi_q, log_lin, phi_k, key_bias, **options):
        self.geo, self.q, self.k, self.v = geo, q, k, v
        self.window, self.causal, self.scale = (
            options["window"],
            options["causal"],
            options["scale"],
        )
        self.masked = key_bias is not None
        if key_bias is None:
            key_bias = torch.zeros(1, 1, geo.kv_len, 1, dtype=q.dtype, device=q.device)
        self.key_bias = key_bias
        self.phi_q = geo.to_blocks(phi_q)
        self.log_lin = log_lin
        self.phi_k = phi_k
        self.values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [V, 1]
        chunk, window = geo.chunk, self.window
        self.band = chunk + window * (1 if self.causal else 2)
        self.left = geo.offset - window  # first key of L chunk 0 and of block 0's band
        self.right = geo.offset + window + 1  # first key of R chunk 0
        rows = torch.arange(chunk, device=q.device).unsqueeze(1)
        diff = torch.arange(self.band, device=q.device) - rows
        inside = (diff >= 0) & (diff <= (window if self.causal else 2 * window))
        pattern = torch.zeros(inside.shape, dtype=q.dtype, device=q.device)
        self.pattern = pattern.masked_fill_(~inside, float("-inf")).repeat(geo.group, 1)
        keys = torch.arange(chunk, device=q.device)
        drop = keys >= rows  # L chunk: keep rows < r
        if not self.causal:
            drop = torch.cat([drop, keys < rows], dim=1)  # R chunk: keep rows >= r
        # 0/1 weights, not a bool mask: a broadcast multiply is several times faster than
        # masked_fill (the kernel values are finite).
        self.keep = (~drop).repeat(geo.group, 1).to(q.dtype)

    def _inside(self, start: int, width: int) -> range:
        """Blocks ``b`` whose rows ``[start + b C, start + b C + width)`` are all keys."""
        chunk, kv_len = self.geo.chunk, self.geo.kv_len
        first = -(-max(0, -start) // chunk)
        last = (kv_len - width - start) // chunk
        return range(first, max(first, min(self.geo.blocks, last + 1)))

    def steps(self) -> list[tuple[int, int]]:
        """``(first, stop)`` block ranges: split where a grid enters or leaves the keys, then by
        the step budget."""
        geo = self.geo
        ranges = [self._inside(self.left, self.band), self._inside(self.left, geo.chunk)]
        if not self.causal:
            ranges.append(self._inside(self.right, geo.chunk))
        cuts = sorted({0, geo.blocks, *(c for r in ranges for c in (r.start, r.stop))})
        cuts = [c for c in cuts if 0 <= c <= geo.blocks]
        features, width = self.phi_k.shape[-1], self.values.shape[-1]
        rows = geo.group * geo.chunk
        bias = self.band if self.masked else 0  # a materialised window bias
        per_row = 2 * geo.chunk + 3 * width + bias
        per_block = 4 * geo.batch * geo.kv_heads * (3 * features * width + rows * per_row)
        size = geo.blocks_per_step(per_block)
        steps = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            steps += [(first, min(hi, first + size)) for first in range(lo, hi, size)]
        return steps

    def _grid(self, x: torch.Tensor, start: int, first: int, stop: int) -> torch.Tensor:
        """Chunks ``first..stop-1`` of the grid starting at key ``start``: ``[n, B, Hkv, C, X]``."""
        chunk = self.geo.chunk
        rows = _rows(x, start + first * chunk, start + stop * chunk)
        return rows.unflatten(2, (stop - first, chunk)).permute(2, 0, 1, 3, 4)

    def _chunks(self, x: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """``[L chunk; R chunk]`` (causal: the L chunk) of blocks ``[first, stop)``, block-major:
        ``[n, B, Hkv, C or 2 C, X]``, one contiguous copy."""
        geo, chunk = self.geo, self.geo.chunk
        width = chunk if self.causal else 2 * chunk
        out = x.new_empty(stop - first, geo.batch, geo.kv_heads, width, x.shape[-1])
        out[:, :, :, :chunk] = self._grid(x, self.left, first, stop)
        if not self.causal:
            out[:, :, :, chunk:] = self._grid(x, self.right, first, stop)
        return out

    def _sum(self, start: int, stop: int) -> torch.Tensor:
        """``phi(K)^T [V, 1]`` over keys ``[start, stop)`` clipped to the keys."""
        lo, hi = max(start, 0), min(max(stop, 0), self.geo.kv_len)
        hi = max(lo, hi)
        return torch.matmul(self.phi_k[:, :, lo:hi].transpose(-1, -2), self.values[:, :, lo:hi])

    def right_carries(self, steps) -> list[torch.Tensor]:
        """Per step, the linear sum over the keys after its last R chunk."""
        chunk = self.geo.chunk
        carry = self._sum(self.right + self.geo.blocks * chunk, self.geo.kv_len)
        carries = []
        for first, stop in reversed(steps):
            carries.append(carry)
            if first > 0:
                carry = carry + self._sum(self.right + first * chunk, self.right + stop * chunk)
        return carries[::-1]

    def linear(self, first: int, stop: int, carry_left, carry_right):
        """Linear ``[num, den]`` of blocks ``[first, stop)`` and the new left carry."""
        chunk = self.geo.chunk
        phi = self.phi_q[first:stop]
        keys, vals = self._chunks(self.phi_k, first, stop), self._chunks(self.values, first, stop)
        left = torch.matmul(keys[..., :chunk, :].transpose(-1, -2), vals[..., :chunk, :])
        outside = torch.empty_like(left)  # exclusive prefix sums, then the suffix sums added
        outside[0] = carry_left
        torch.cumsum(left[:-1], 0, out=outside[1:])
        outside[1:] += carry_left
        carry_left = outside[-1] + left[-1]
        del left
        if not self.causal:
            right = torch.matmul(keys[..., chunk:, :].transpose(-1, -2), vals[..., chunk:, :])
            for index in range(right.shape[0] - 2, -1, -1):  # suffix sums, in place
                right[index] += right[index + 1]
            outside.add_(carry_right)
            outside[:-1] += right[1:]
            del right
        lin = torch.matmul(phi, outside)
        del outside
        kernel = torch.matmul(phi, keys.transpose(-1, -2)).mul_(self.keep)
        width = vals.shape[-2]
        lin.view(-1, *lin.shape[-2:]).baddbmm_(
            kernel.view(-1, kernel.shape[-2], width), vals.view(-1, width, vals.shape[-1])
        )
        return lin, carry_left

    def softmax(self, first: int, stop: int, plain: bool):
        """Window softmax of blocks ``[first, stop)`` and its log-sum-exp (``-inf``: no key)."""
        geo, chunk, band = self.geo, self.geo.chunk, self.band
        lo = self.left + first * chunk
        hi = self.left + (stop - 1) * chunk + band
        band_keys = _rows(self.k, lo, hi).unfold(2, band, chunk).transpose(-1, -2)
        band_vals = _rows(self.v, lo, hi).unfold(2, band, chunk).transpose(-1, -2)
        q_blocks = self.q[first:stop]  # [n, B, Hkv, G C, D]
        outs, logs = [], []
        if not plain:
            key_rows = _rows(self.key_bias, lo, hi, float("-inf"))[..., 0].unfold(-1, band, chunk)
            bias = self.pattern + key_rows.unsqueeze(-2)  # [B|1, Hkv|1, n, G C, band]
            has_key = (bias > float("-inf")).any(-1, keepdim=True)
        for index in range(geo.batch):
            if plain:
                bias_b = self.pattern.expand(1, 1, *self.pattern.shape)
            else:
                bias_b = bias[min(index, bias.shape[0] - 1)].transpose(0, 1)
                bias_b = bias_b.expand(-1, geo.kv_heads, -1, -1)
            out, log = _softmax_lse(
                q_blocks[:, index],
                band_keys[index].transpose(0, 1),
                band_vals[index].transpose(0, 1),
                bias_b,
                self.scale,
            )
            outs.append(out)
            logs.append(log.unsqueeze(-1))
        if geo.batch == 1:
            soft, lse = outs[0].unsqueeze(1), logs[0].unsqueeze(1)
        else:
            soft, lse = torch.stack(outs, dim=1), torch.stack(logs, dim=1)
        if not plain:
            lse.masked_fill_(~has_key.permute(2, 0, 1, 3, 4), float("-inf"))
        return soft, lse

    def run(self) -> torch.Tensor:
        """The hybrid output ``[B, Hkv, G, Sq, Dv]`` (compute dtype)."""
        geo = self.geo
        steps = self.steps()
        plain = self._inside(self.left, self.band) if not self.masked else range(0, 0)
        carries = [None] * len(steps) if self.causal else self.right_carries(steps)
        carry_left = self._sum(0, self.left)
        out = None
        for (first, stop), carry_right in zip(steps, carries):
            lin, carry_left = self.linear(first, stop, carry_left, carry_right)
            soft, lse = self.softmax(first, stop, first in plain and stop - 1 in plain)
            log_lin = None if self.log_lin is None else self.log_lin[first:stop]
            merged = _merge(soft, lse, lin, log_lin)
            if out is None:
                out = merged.new_empty(geo.blocks, *merged.shape[1:])
            out[first:stop] = merged
            del lin, soft, lse, merged
        return geo.from_blocks(out)


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

    Computation, over query blocks of ``chunk`` rows, a step of blocks at a time (see
    :class:`_Hybrid`). Softmax part: block ``b`` scores the band of ``chunk + 2 window`` keys
    (causal ``chunk + window``) starting at ``p_{b chunk} - window`` in the CPU flash kernel, which
    also returns ``a_i``; the bands are overlapping views of the keys and the window one
    ``[chunk, band]`` additive mask shared by all blocks (a per-block bias is built only at the
    sequence ends or under a key mask). Linear part: two chunk grids of the keys aligned to the
    window's edges, so that each block needs whole-chunk prefix / suffix sums of chunk states
    ``phi(K_c)^T [V_c, 1]`` plus one masked ``chunk x 2 chunk`` kernel for the two partial chunks.
    Every sum adds exactly the wanted keys (a total minus the window would cancel badly); all
    features of a call share one key stabiliser (FAVOR+). Time O(N (chunk + 2 window) D +
    N F Dv); memory O(N (D + F + Dv)) plus per-step temporaries (``_HYBRID_STEP_BYTES``).

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
    scale = hybrid_scale(feature_map, q.shape[-1], scale)
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    window = min(window, q_len + kv_len)  # wider windows see the same keys
    if q_len == 0 or kv_len == 0:  # no rows, or rows without keys: zeros
        return q.new_zeros(batch, q_heads, q_len, v.shape[-1])
    geo = _Geometry(batch, kv_heads, q_heads // kv_heads, q_len, kv_len, chunk, -(-q_len // chunk))
    if mask is not None and mask_is_inert(mask):
        mask = None  # all kept, or all zeros: the unmasked fast path
    prep = prepare_features(q, k, v, feature_map, mask)
    rows = prep.phi_q.shape[:4] + (1,)
    log_lin = None if prep.log_q is None else geo.to_blocks(prep.log_q.expand(rows))
    key_bias = None  # [B|1, Hkv|1, Sk, 1]
    if prep.key_log_weight is not None:
        key_bias = prep.key_log_weight.transpose(-1, -2)
    queries = geo.to_blocks(q.to(prep.value.dtype).reshape(prep.phi_q.shape[:4] + (-1,)))
    hybrid = _Hybrid(
        geo, queries, k.to(prep.value.dtype), prep.value, prep.phi_q, log_lin, prep.phi_k,
        key_bias, window=window, causal=causal, scale=scale,
    )  # fmt: skip
    out = hybrid.run()
    return out.reshape(batch, q_heads, q_len, -1).to(q.dtype)
