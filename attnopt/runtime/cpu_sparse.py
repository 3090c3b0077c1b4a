"""Fast CPU sparse attention (issue 5): sliding windows with sinks, block-sparse, routing.

Entry points: :func:`sliding_window_attention`, :func:`block_sparse_attention`, :class:`BlockMeta`,
:func:`block_meta_visible`, and (re-exported) :func:`route_blocks`,
:func:`calibration_block_scores`, :func:`static_block_pattern`, :func:`permute_for_sparsity`,
:func:`apply_permutation`, :func:`neighborhood_attention`, :func:`neighborhood_visible`.

Semantics are those of docs/attention-op.md (bottom-right alignment, GQA, bool or additive masks,
bias, fully masked rows give zeros). Nothing here forms the ``Sq x Sk`` score matrix:

* sliding windows cut the queries into chunks of ``C`` rows; the chunks whose window lies inside
  the sequence (all but a few at the edges) read their ``C + window`` keys through one strided view
  of the key tensor (no copy) and run in a single fused flash-attention call with a ``[C, C + window]``
  band mask shared by every chunk; the few edge chunks run one by one on exact key ranges. Sinks
  are a second tiny flash call over the first ``sinks`` keys, merged through the log-sum-exp.
* block-sparse attention sorts query blocks by their number of key blocks, gathers the listed key
  blocks into reused buffers (a bounded workspace, so memory stays linear in the sequence) and runs
  one flash call per slice of query blocks; the mask is built only where a slice needs one.

Every function takes ``stats``: a dict it fills with ``computed_fraction``, the share of the dense
score entries actually computed (including padding waste), for passes to report.
"""

from __future__ import annotations

import contextlib

import torch

from attnopt.runtime.cpu_block_routing import (
    apply_permutation,
    calibration_block_scores,
    permute_for_sparsity,
    route_blocks,
    static_block_pattern,
)
from attnopt.runtime.cpu_neighborhood import neighborhood_attention, neighborhood_visible
from attnopt.runtime.cpu_sparse_common import (
    BlockMeta,
    additive_mask,
    bookkeeping_threads,
    chunked_flash,
    dense_attention,
    flash_attend,
    gather_pairs,
    mask_empty_rows,
    mask_to_4d,
    merge_partials,
    record_computed,
)

__all__ = [
    "BlockMeta",
    "apply_permutation",
    "block_meta_visible",
    "block_sparse_attention",
    "calibration_block_scores",
    "neighborhood_attention",
    "neighborhood_visible",
    "permute_for_sparsity",
    "route_blocks",
    "sliding_window_attention",
    "static_block_pattern",
]

#: Elements of gathered keys per block-sparse slice (the reused workspace is twice this).
GATHER_BUDGET = 1 << 24
#: Score entries per sliding-window edge call (bounds the edge masks).
EDGE_BUDGET = 1 << 22


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, S, D]")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    return q.shape[1] // k.shape[1]


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
    group = _check_qkv(q, k, v)
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    batch, q_heads, q_len, head_dim = q.shape
    kv_len, value_dim = k.shape[2], v.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    left, right, covers_all = _window_extent(window_left, window_right, causal, q_len, kv_len)
    if covers_all or q_len == 0 or kv_len == 0:
        record_computed(stats, q_len * kv_len, q_len * kv_len)
        return dense_attention(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias)
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
        interior = _window_interior(q, k_flat, v_flat, first, last, chunk, left, right, sinks)
        computed += interior.run(out, mask4, bias4, scale)
    edge_runs = [(0, min(first, num_chunks)), (max(last + 1, first), num_chunks)]
    for start, stop in _edge_groups(edge_runs, chunk, q_len, kv_len, left, right, sinks):
        computed += _window_edge(
            q, k_flat, v_flat, out, start, stop, left, right, sinks, causal, mask4, bias4, scale
        )
    record_computed(stats, computed * batch * q_heads, batch * q_heads * q_len * kv_len)
    return out


class _window_interior:
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
    """One edge chunk of queries ``[start, stop)`` on its exact key range plus the sinks."""
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
    pick = slice(int(k_pos[0]), int(k_pos[-1]) + 1) if contiguous else k_pos
    k_sel = k_flat[:, pick].reshape(batch, heads, k_pos.numel(), -1)
    v_sel = v_flat[:, pick].reshape(batch, heads, k_pos.numel(), -1)
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


def block_meta_visible(meta: BlockMeta, q_len: int, kv_len: int) -> torch.Tensor:
    """Dense bool visibility of block metadata (for tests and the reference path only).

    Args:
        meta: the block metadata.
        q_len: number of queries.
        kv_len: number of keys.

    Returns:
        Bool ``[Bm, Hm, q_len, kv_len]``: True where the key's block is listed for the query's block.
    """
    counts, indices = meta.kv_counts.long(), meta.kv_indices.long()
    num_kv_blocks = -(-kv_len // meta.block_k)
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1)
    listed = torch.zeros(*counts.shape, num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    target = torch.where(valid, indices.clamp(0, num_kv_blocks - 1), num_kv_blocks)
    listed.scatter_(-1, target, True)
    listed = listed[..., :num_kv_blocks]
    rows = torch.arange(q_len, device=indices.device) // meta.block_q
    cols = torch.arange(kv_len, device=indices.device) // meta.block_k
    return listed[:, :, rows][..., cols]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: BlockMeta,
    *,
    scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Block-sparse attention: each query block attends only to the keys of its listed key blocks.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]`` (``Hq % Hkv == 0``).
        v: ``[B, Hkv, Sk, Dv]``.
        meta: block metadata (``Bm`` in ``{1, B}``, ``Hm`` in ``{1, Hq}``, ``ceil(Sq / block_q)``
            query blocks).
        scale: score scale (default ``D ** -0.5``).
        causal: bottom-right aligned causal rule, applied inside the kept blocks.
        mask: bool (True = visible) or additive mask broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive bias broadcastable to ``[B, Hq, Sq, Sk]``.
        stats: optional dict filled with ``computed_fraction``.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype; query blocks with no key block give zeros.
    """
    group = _check_qkv(q, k, v)
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    num_q_blocks = -(-q_len // meta.block_q)
    num_kv_blocks = -(-kv_len // meta.block_k)
    if (
        meta.num_q_blocks != num_q_blocks
        or meta.kv_counts.shape[0] not in (1, batch)
        or (meta.kv_counts.shape[1] not in (1, q_heads))
    ):
        raise ValueError(f"metadata {tuple(meta.kv_counts.shape)} does not fit q {tuple(q.shape)}")
    scale = head_dim**-0.5 if scale is None else scale
    if bool((meta.kv_counts >= num_kv_blocks).all()):
        record_computed(stats, q_len * kv_len, q_len * kv_len)
        return dense_attention(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias)
    run = _BlockSparseRun(q, k, v, meta, group, scale, causal, mask, bias)
    out, computed = run.run()
    record_computed(stats, computed, batch * q_heads * q_len * kv_len)
    return out


def _slice_cost(counts: torch.Tensor, per_slice: int) -> int:
    """Key blocks computed when ``counts`` run in slices of ``per_slice`` rows (padded to the
    widest row of each slice)."""
    pad = (-counts.numel()) % per_slice
    slices = torch.nn.functional.pad(counts, (0, pad)).view(-1, per_slice)
    return int(slices.amax(dim=1).sum()) * per_slice


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x.contiguous()
    pad = x.new_zeros(x.shape[0], x.shape[1], length - x.shape[2], x.shape[3])
    return torch.cat([x, pad], dim=2)


class _BlockSparseRun:
    """One block-sparse call: query blocks sorted by key-block count, cut into slices whose
    gathered keys fit :data:`GATHER_BUDGET`; each slice gathers its key blocks into reused buffers
    and runs one flash call. Causal slices run the diagonal block apart (its small causal mask)
    and merge it through the log-sum-exp, so the wide call needs no mask."""

    def __init__(self, q, k, v, meta, group, scale, causal, mask, bias) -> None:
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
        self.block_q, self.block_k = meta.block_q, meta.block_k
        self.num_q_blocks = -(-q_len // self.block_q)
        num_kv_blocks = -(-kv_len // self.block_k)
        self.q_len, self.kv_len, self.causal, self.scale = q_len, kv_len, causal, scale
        self.mask4, self.bias4 = mask_to_4d(mask, "mask"), mask_to_4d(bias, "bias")
        self.shape = (batch, q_heads, q_len, value_dim)
        with bookkeeping_threads():
            rows = batch * q_heads * self.num_q_blocks
            self.counts = meta.kv_counts.long().expand(batch, q_heads, -1).reshape(rows)
            self.indices = meta.kv_indices.long().expand(batch, q_heads, self.num_q_blocks, -1)
            self.indices = self.indices.reshape(rows, -1)
            row_ids = torch.arange(rows, device=q.device)
            self.head_of_row = (row_ids // self.num_q_blocks) % q_heads
            self.batch_of_row = row_ids // (self.num_q_blocks * q_heads)
            self.kv_base = (
                self.batch_of_row * kv_heads + self.head_of_row // group
            ) * num_kv_blocks
            widest = int(self.counts.max())
            self.per_slice = max(
                1, GATHER_BUDGET // max(1, widest * self.block_k * max(head_dim, value_dim))
            )
            self.order = self._order()
        self.q_blocks = _pad_seq(q, self.num_q_blocks * self.block_q).reshape(
            -1, self.block_q, head_dim
        )
        self.k_blocks = _pad_seq(k, num_kv_blocks * self.block_k).reshape(
            -1, self.block_k, head_dim
        )
        self.v_blocks = _pad_seq(v, num_kv_blocks * self.block_k).reshape(
            -1, self.block_k, value_dim
        )
        size = min(self.per_slice, self.order.numel()) * widest * self.block_k
        self.k_buffer = q.new_empty(size * head_dim)
        self.v_buffer = q.new_empty(size * value_dim)
        self.out_blocks = q.new_zeros(rows, self.block_q, value_dim)

    def _order(self) -> torch.Tensor:
        """Rows in processing order: as stored (slices are views, no reordering) unless sorting
        by count cuts the padded work of the slices by more than 10% (threshold routing)."""
        natural = torch.arange(self.counts.numel(), device=self.counts.device)
        by_count = torch.argsort(self.counts, stable=True)
        if bool((self.counts > 0).all()) and _slice_cost(
            self.counts, self.per_slice
        ) <= 1.1 * _slice_cost(self.counts[by_count], self.per_slice):
            return natural
        return by_count[self.counts[by_count] > 0]

    def run(self) -> tuple[torch.Tensor, int]:
        computed = 0
        for start in range(0, self.order.numel(), self.per_slice):
            rows = self.order[start : start + self.per_slice]
            with bookkeeping_threads():
                q_block = rows % self.num_q_blocks
                counts = self.counts[rows]
                width = int(counts.max())
                slots = self.indices[rows, :width]
                position = torch.arange(width, device=rows.device)
                valid = position < counts.unsqueeze(1)
                slots = torch.where(valid, slots, slots[:, :1])
                first = int(rows[0])
                in_order = int(rows[-1]) - first + 1 == rows.numel() and bool(
                    (rows.diff() == 1).all()
                )
                last = counts.unsqueeze(1) - 1
                split = (
                    self.causal
                    and width > 1
                    and not bool(
                        (self._crossing(slots, q_block) & valid & (position != last)).any()
                    )
                )
            q_sel = self.q_blocks[first : first + rows.numel()] if in_order else self.q_blocks[rows]
            q_sel = q_sel.unsqueeze(1)
            if split:  # every block but the last (diagonal) one lies wholly in the past
                out, lse = self._part(
                    rows, q_block, q_sel, slots[:, :-1], valid[:, :-1] & (position[:-1] < last)
                )
                diag_out, diag_lse = self._part(rows, q_block, q_sel, slots.gather(1, last), None)
                out = merge_partials(out, lse, diag_out, diag_lse)
                computed += rows.numel() * self.block_q * (width - 1 + 1) * self.block_k
            else:
                out, _ = self._part(rows, q_block, q_sel, slots, valid)
                computed += rows.numel() * self.block_q * width * self.block_k
            if in_order:
                self.out_blocks[first : first + rows.numel()] = out.squeeze(1)
            else:
                self.out_blocks.index_copy_(0, rows, out.squeeze(1))
        out = self.out_blocks.view(*self.shape[:2], -1, self.shape[3])[:, :, : self.q_len]
        return out, computed

    def _crossing(self, slots: torch.Tensor, q_block: torch.Tensor) -> torch.Tensor:
        """Key blocks reaching past the first query of their query block (need a causal mask)."""
        first_query = q_block * self.block_q + (self.kv_len - self.q_len)
        return slots * self.block_k + self.block_k - 1 > first_query.unsqueeze(1)

    def _part(self, rows, q_block, q_sel, slots, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """Flash attention of the slice's query blocks on the given key-block slots."""
        count, keys = rows.numel(), slots.shape[1] * self.block_k
        head_dim, value_dim = self.k_blocks.shape[-1], self.v_blocks.shape[-1]
        with bookkeeping_threads():
            flat = (self.kv_base[rows].unsqueeze(1) + slots).reshape(-1)
        k_out = self.k_buffer[: count * keys * head_dim].view(-1, self.block_k, head_dim)
        v_out = self.v_buffer[: count * keys * value_dim].view(-1, self.block_k, value_dim)
        k_sel = torch.index_select(self.k_blocks, 0, flat, out=k_out).view(count, 1, keys, head_dim)
        v_sel = torch.index_select(self.v_blocks, 0, flat, out=v_out).view(
            count, 1, keys, value_dim
        )
        addend = self._addend(rows, q_block, slots, valid)
        out, lse = flash_attend(q_sel, k_sel, v_sel, addend, self.scale)
        return out, mask_empty_rows(lse, addend)

    def _addend(self, rows, q_block, slots, valid) -> torch.Tensor | None:
        """Additive mask of one part, or None; decided on the small ``[rows, slots]`` tensors."""
        with bookkeeping_threads():
            ragged = valid is not None and not bool(valid.all())
            tail = self.kv_len % self.block_k != 0 and bool(
                (slots == (self.kv_len - 1) // self.block_k).any()
            )
            crossing = self._crossing(slots, q_block) if self.causal else None
            if crossing is not None and valid is not None:
                crossing &= valid  # masked slots may hold any block
            crossing = crossing is not None and bool(crossing.any())
        plain = self.mask4 is None and self.bias4 is None and not (ragged or tail)
        if plain and not crossing:
            return None
        device, offset = slots.device, self.kv_len - self.q_len
        if plain and slots.shape[1] == 1:  # a diagonal part: one triangle shared by all rows
            with bookkeeping_threads():
                shift = q_block * self.block_q + offset - slots[:, 0] * self.block_k
                same = bool((shift == shift[0]).all())
            if same:
                rows = torch.arange(self.block_q, device=device).unsqueeze(1) + int(shift[0])
                past = torch.arange(self.block_k, device=device) <= rows
                return additive_mask(past, None, None, self.q_blocks.dtype)
        # key-only masks are [rows, 1, keys]: small enough for one thread
        key_only = not crossing and all(
            t is None or t.shape[2] == 1 for t in (self.mask4, self.bias4)
        )
        with bookkeeping_threads() if key_only else contextlib.nullcontext():
            k_pos = slots.unsqueeze(-1) * self.block_k + torch.arange(self.block_k, device=device)
            k_pos = k_pos.reshape(slots.shape[0], 1, -1)
            q_pos = q_block.view(-1, 1, 1) * self.block_q + torch.arange(
                self.block_q, device=device
            )
            q_pos = q_pos.view(-1, self.block_q, 1)
            allowed = None
            if ragged or tail:
                allowed = k_pos < self.kv_len
                if valid is not None:
                    allowed = allowed & valid.repeat_interleave(self.block_k, dim=1).unsqueeze(1)
            if crossing:
                past = k_pos <= q_pos + offset
                allowed = past if allowed is None else allowed & past
            user = []
            for t in (self.mask4, self.bias4):
                if t is not None:
                    t = gather_pairs(
                        t,
                        q_pos.clamp(max=self.q_len - 1),
                        k_pos.clamp(max=self.kv_len - 1),
                        batch_idx=self.batch_of_row[rows].view(-1, 1, 1),
                        head_idx=self.head_of_row[rows].view(-1, 1, 1),
                    )
                user.append(t)
            addend = additive_mask(allowed, *user, self.q_blocks.dtype)
        return None if addend is None else addend.unsqueeze(1)
