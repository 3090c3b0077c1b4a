"""Block-sparse attention for CPU: gather the listed key blocks, run fused flash calls.

Entry point: :func:`block_sparse_attention` (the metadata format is :mod:`attnopt.ir.block_sparse`).

Query blocks (one row per batch element, head and query block) run in slices: in stored order, so
that each slice's queries and outputs are plain views, or sorted by their number of key blocks when
that saves more than 10% of padded work (threshold routing gives very uneven counts). Each slice
gathers its key and value blocks into two reused buffers of :data:`GATHER_BUDGET` elements (a
bounded workspace: memory stays linear in the sequence length) and runs one flash call. Masks are
built only where a slice needs one: ragged slices get a key-only mask, causal slices compute the
diagonal block apart with one shared triangle and merge it through the log-sum-exp, so the wide
call over the other blocks stays unmasked.
"""

from __future__ import annotations

import contextlib

import torch

from attnopt.ir.attention_reference import mask_to_4d
from attnopt.ir.block_sparse import BlockMeta, block_meta_visible
from attnopt.runtime.cpu.common import (
    additive_mask,
    all_finite,
    bookkeeping_threads,
    check_qkv,
    exact_visible,
    flash_attend,
    gather_pairs,
    mask_empty_rows,
    merge_partials,
    record_computed,
    workspace,
)
from attnopt.runtime.cpu.dense import dense_attention_cpu

__all__ = ["GATHER_BUDGET", "block_sparse_attention"]

#: Elements of gathered keys per slice (the reused workspace holds keys and values: twice this).
GATHER_BUDGET = 1 << 24


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
    group = check_qkv(q, k, v)
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
        return dense_attention_cpu(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias)
    if not all_finite(q, k, v):  # the flash calls would leak hidden NaN/inf keys
        record_computed(stats, q_len * kv_len, q_len * kv_len)
        visible = block_meta_visible(meta, q_len, kv_len)
        return exact_visible(q, k, v, visible, scale=scale, causal=causal, mask=mask, bias=bias)
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
    """One block-sparse call: rows (batch, head, query block) in processing order, cut into
    slices whose gathered keys fit :data:`GATHER_BUDGET`; each slice gathers its key blocks into
    the reused workspace and runs one flash call. In causal slices where only each row's last
    block reaches the diagonal, that block runs apart (one shared triangle mask) and is merged
    through the log-sum-exp, so the wide call needs no mask."""

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
        self.k_buffer = workspace("block_sparse_k", size * head_dim, q.dtype, q.device)
        self.v_buffer = workspace("block_sparse_v", size * value_dim, q.dtype, q.device)
        # rows left out of the order (no key block) must read zeros
        every_row = self.order.numel() == rows
        self.out_blocks = (q.new_empty if every_row else q.new_zeros)(rows, self.block_q, value_dim)

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
                out, lse = self._part(rows, q_block, q_sel, slots[:, :-1], position[:-1] < last)
                diag_out, diag_lse = self._part(rows, q_block, q_sel, slots.gather(1, last), None)
                out = merge_partials(out, lse, diag_out, diag_lse)
            else:
                out, _ = self._part(rows, q_block, q_sel, slots, valid)
            computed += rows.numel() * self.block_q * width * self.block_k
            if in_order:
                self.out_blocks[first : first + rows.numel()] = out.squeeze(1)
            else:
                self.out_blocks.index_copy_(0, rows, out.squeeze(1))
        out = self.out_blocks.view(*self.shape[:2], -1, self.shape[3])
        return (
            out if out.shape[2] == self.q_len else out[:, :, : self.q_len].contiguous()
        ), computed

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
