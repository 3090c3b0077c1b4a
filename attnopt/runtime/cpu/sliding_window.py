"""Sliding-window attention with sinks for CPU: chunked windows, no ``Sq x Sk`` matrix.

Entry point: :func:`sliding_window_attention`. Semantics are those of docs/attention-op.md
(bottom-right alignment, GQA, bool or additive masks, bias, fully masked rows give zeros).

The queries are cut into chunks of ``C`` rows; the chunks whose window lies inside the sequence
(all but a few at the edges) read their ``C + window`` keys through one strided view of the key
tensor (no copy) and run in a single fused flash-attention call with a ``[C, C + window]`` band
mask shared by every chunk; the edge chunks run in a few grouped calls on exact key ranges. Sinks
are a second small flash call over the first ``sinks`` keys, merged through the log-sum-exp.
The other CPU kernels of the family sit beside this one in :mod:`attnopt.runtime.cpu`.

``stats`` (a dict, optional) is filled with ``computed_fraction``, the share of the dense score
entries actually computed (including padding waste), for passes to report.
"""

from __future__ import annotations

import torch

from attnopt.ir.attention_reference import mask_to_4d, visible_keys_mask
from attnopt.runtime.cpu.common import (
    additive_mask,
    all_finite,
    bookkeeping_threads,
    check_qkv,
    chunked_flash,
    exact_visible,
    flash_attend,
    gather_pairs,
    mask_empty_rows,
    merge_partials,
    record_computed,
)
from attnopt.runtime.cpu.dense import dense_attention_cpu

__all__ = ["sliding_window_attention"]

#: Score entries per sliding-window edge call (bounds the edge masks).
EDGE_BUDGET = 1 << 22


def _heads_flat(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, Hkv, S, D]`` -> contiguous ``[B * Hq, S, D]`` (kv heads repeated for GQA)."""
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    return x.contiguous().reshape(-1, x.shape[2], x.shape[3])


def _window_extent(
    window_left: int | None, window_right: int | None, causal: bool, q_len: int, kv_len: int
) -> tuple[int, int, bool]:
    """Finite (left, right) extents covering the band, and whether the band covers everything."""
    for name, size in (("window_left", window_left), ("window_right", window_right)):
        if size is not None and size < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {size}")
    left_full = window_left is None or window_left >= kv_len - 1
    right_full = causal or window_right is None or window_right >= q_len - 1
    left = max(kv_len - 1, 0) if left_full else window_left
    right = 0 if causal else (max(q_len - 1, 0) if right_full else window_right)
    return left, right, left_full and right_full


def _pick_chunk(window: int, q_len: int, query_chunk: int | None) -> int:
    # small chunks waste least (each query computes chunk + window keys); measured on 2 cores,
    # 64-row chunks beat 128/256 for windows of 512-1024 and 32 wins below 256
    if query_chunk is None:
        query_chunk = 64 if window >= 256 else 32
    return max(1, min(query_chunk, q_len))


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_left: int | None,
    window_right: int | None,
    sinks: int = 0,
    scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    query_chunk: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Sliding-window attention with sinks, computing only the keys inside each window.

    Query ``i`` sees key ``j`` iff ``i + off - window_left <= j <= i + off + window_right`` or
    ``j < sinks`` (``off = Sk - Sq``), and also passes ``mask``, ``bias`` and the causal rule.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]`` (``Hq % Hkv == 0``).
        v: ``[B, Hkv, Sk, Dv]``.
        window_left: keys visible before the aligned position (None: unlimited).
        window_right: keys visible after it (None: unlimited; forced to 0 by ``causal``).
        sinks: the first ``sinks`` keys are visible to every query.
        scale: score scale (default ``D ** -0.5``).
        causal: bottom-right aligned causal rule.
        mask: bool (True = visible) or additive mask broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive bias broadcastable to ``[B, Hq, Sq, Sk]``.
        query_chunk: queries per chunk (default from the window size).
        stats: optional dict filled with ``computed_fraction``.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    group = check_qkv(q, k, v)
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    batch, q_heads, q_len, head_dim = q.shape
    kv_len, value_dim = k.shape[2], v.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    left, right, covers_all = _window_extent(window_left, window_right, causal, q_len, kv_len)
    if covers_all or q_len == 0 or kv_len == 0:
        record_computed(stats, q_len * kv_len, q_len * kv_len)
        return dense_attention_cpu(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias)
    if not all_finite(q, k, v):  # the flash calls would leak hidden NaN/inf keys
        record_computed(stats, q_len * kv_len, q_len * kv_len)
        visible = visible_keys_mask(
            q_len, kv_len, window_left=window_left, window_right=window_right, sinks=sinks,
            device=q.device,
        )  # fmt: skip
        return exact_visible(q, k, v, visible, scale=scale, causal=causal, mask=mask, bias=bias)
    offset, sinks = kv_len - q_len, min(sinks, kv_len)
    chunk = _pick_chunk(left + right, q_len, query_chunk)
    num_chunks = -(-q_len // chunk)
    first = max(0, -(-(sinks - offset + left) // chunk))
    last = min(q_len // chunk - 1, (kv_len - chunk - offset - right) // chunk)
    mask4, bias4 = mask_to_4d(mask, "mask"), mask_to_4d(bias, "bias")
    k_flat, v_flat = _heads_flat(k, group), _heads_flat(v, group)
    out = q.new_empty(batch, q_heads, q_len, value_dim)
    computed = 0
    if first <= last:
        interior = _WindowInterior(q, k_flat, v_flat, first, last, chunk, left, right, sinks)
        computed += interior.run(out, mask4, bias4, scale)
    edge_runs = [(0, min(first, num_chunks)), (max(last + 1, first), num_chunks)]
    for start, stop in _edge_groups(edge_runs, chunk, q_len, kv_len, left, right, sinks):
        computed += _window_edge(
            q, k_flat, v_flat, out, start, stop, left, right, sinks, causal, mask4, bias4, scale
        )
    record_computed(stats, computed * batch * q_heads, batch * q_heads * q_len * kv_len)
    return out


class _WindowInterior:
    """The chunks whose window lies inside ``[sinks, Sk)``: one strided, batched flash call."""

    def __init__(self, q, k_flat, v_flat, first, last, chunk, left, right, sinks) -> None:
        self.q, self.first, self.chunk, self.sinks = q, first, chunk, sinks
        self.num = last - first + 1
        self.width = chunk + left + right
        self.key_start = first * chunk + (k_flat.shape[1] - q.shape[2]) - left
        self.k_win = self._windows(k_flat)
        self.v_win = self._windows(v_flat)
        self.k_flat, self.v_flat = k_flat, v_flat
        with bookkeeping_threads():
            local = torch.arange(self.width, device=q.device)
            rows = torch.arange(chunk, device=q.device).unsqueeze(1)
            self.band = (local >= rows) & (local <= rows + left + right)

    def _windows(self, x_flat: torch.Tensor) -> torch.Tensor:
        rows, length, dim = x_flat.shape
        return x_flat.as_strided(
            (rows, self.num, self.width, dim),
            (length * dim, self.chunk * dim, dim, 1),
            x_flat.storage_offset() + self.key_start * dim,
        )

    def run(self, out: torch.Tensor, mask4, bias4, scale: float) -> int:
        batch, heads, _, head_dim = self.q.shape
        lo, hi = self.first * self.chunk, (self.first + self.num) * self.chunk
        q_win = self.q[:, :, lo:hi].reshape(batch * heads, self.num, self.chunk, head_dim)
        device = self.q.device
        with bookkeeping_threads():
            q_pos = torch.arange(lo, hi, device=device).view(self.num, self.chunk, 1)
            k_pos = self.key_start + self.chunk * torch.arange(self.num, device=device)
            k_pos = k_pos.view(-1, 1, 1) + torch.arange(self.width, device=device)
        user = [None if t is None else gather_pairs(t, q_pos, k_pos) for t in (mask4, bias4)]
        win_out, win_lse = chunked_flash(
            q_win, self.k_win, self.v_win, self.band, user, scale, batch=batch
        )
        computed = self.num * self.chunk * self.width
        if self.sinks > 0:
            win_out = self._merge_sinks(q_win, win_out, win_lse, q_pos, mask4, bias4, scale)
            computed += self.num * self.chunk * self.sinks
        out[:, :, lo:hi] = win_out.reshape(batch, heads, hi - lo, -1)
        return computed

    def _merge_sinks(self, q_win, win_out, win_lse, q_pos, mask4, bias4, scale) -> torch.Tensor:
        batch, heads = self.q.shape[:2]
        rows = self.num * self.chunk
        q_rows = q_win.reshape(batch, heads, rows, -1)
        k_pos = torch.arange(self.sinks, device=q_win.device).view(1, -1)
        user = [
            None if t is None else gather_pairs(t, q_pos.view(-1, 1), k_pos) for t in (mask4, bias4)
        ]
        addend = additive_mask(None, *user, self.q.dtype)
        k_sink = self.k_flat[:, : self.sinks].reshape(batch, heads, self.sinks, -1)
        v_sink = self.v_flat[:, : self.sinks].reshape(batch, heads, self.sinks, -1)
        sink_out, sink_lse = flash_attend(q_rows, k_sink, v_sink, addend, scale)
        sink_lse = mask_empty_rows(sink_lse, addend)
        shape = win_out.shape
        merged = merge_partials(
            win_out.reshape(batch, heads, rows, -1),
            win_lse.reshape(batch, heads, rows),
            sink_out,
            sink_lse,
        )
        return merged.reshape(shape)


def _edge_groups(runs, chunk, q_len, kv_len, left, right, sinks) -> list[tuple[int, int]]:
    """Query row ranges for the edge chunks: consecutive chunks merged while the group's
    ``rows x keys`` stays under :data:`EDGE_BUDGET` (few calls, bounded mask memory)."""
    offset, groups = kv_len - q_len, []
    for first_chunk, stop_chunk in runs:
        start = first_chunk * chunk
        for index in range(first_chunk, stop_chunk):
            stop = min(q_len, (index + 1) * chunk)
            lo = max(0, start + offset - left)
            hi = min(kv_len, stop + offset + right)
            if stop > start + chunk and (stop - start) * (max(0, hi - lo) + sinks) > EDGE_BUDGET:
                groups.append((start, index * chunk))
                start = index * chunk
        if stop_chunk > first_chunk:
            groups.append((start, min(q_len, stop_chunk * chunk)))
    return groups


def _window_edge(
    q, k_flat, v_flat, out, start, stop, left, right, sinks, causal, mask4, bias4, scale
) -> int:
    """Edge queries ``[start, stop)`` (a group of chunks) on their exact key range plus sinks."""
    batch, heads, q_len, _ = q.shape
    kv_len, device = k_flat.shape[1], q.device
    offset = kv_len - q_len
    lo = max(0, start + offset - left)
    hi = min(kv_len, stop - 1 + offset + right + 1)
    if sinks > 0 and lo <= sinks:
        k_pos = torch.arange(0, max(hi, sinks), device=device)
    elif sinks > 0:
        k_pos = torch.cat([torch.arange(sinks, device=device), torch.arange(lo, hi, device=device)])
    else:
        k_pos = torch.arange(lo, max(lo, hi), device=device)
    if k_pos.numel() == 0:
        out[:, :, start:stop] = 0
        return 0
    contiguous = sinks == 0 or lo <= sinks
    if contiguous:
        k_sel, v_sel = (x[:, int(k_pos[0]) : int(k_pos[-1]) + 1] for x in (k_flat, v_flat))
    else:
        k_sel, v_sel = (x.index_select(1, k_pos) for x in (k_flat, v_flat))
    k_sel = k_sel.reshape(batch, heads, k_pos.numel(), -1)
    v_sel = v_sel.reshape(batch, heads, k_pos.numel(), -1)
    with bookkeeping_threads():
        aligned = torch.arange(start, stop, device=device).unsqueeze(1) + offset
        keys = k_pos.unsqueeze(0)
        allowed = ((keys >= aligned - left) & (keys <= aligned + right)) | (keys < sinks)
        if causal:
            allowed &= keys <= aligned
        q_pos = aligned - offset
        user = [None if t is None else gather_pairs(t, q_pos, keys) for t in (mask4, bias4)]
        addend = additive_mask(allowed, *user, q.dtype)
    chunk_out, _ = flash_attend(q[:, :, start:stop], k_sel, v_sel, addend, scale)
    out[:, :, start:stop] = chunk_out
    return (stop - start) * k_pos.numel()
