"""Neighbourhood attention on 2-D and 3-D token grids for CPU, NATTEN semantics.

Entry point: :func:`neighborhood_attention`. Which keys a token sees (grids, global tokens, the
inward-shifted windows, dilation) is the rule of :mod:`attnopt.ir.neighborhood`.

The kernel is tiled like GNA: queries are grouped into tiles of ``tile`` consecutive class members
per axis; the union of a tile's windows is a box of at most ``tile + K - 1`` members per axis. Each
tile's keys are gathered once (memory linear in the grid size) and all tiles run in one fused flash
call with a per-tile visibility mask. Global queries run as one small dense call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from attnopt.ir.attention_reference import mask_to_4d
from attnopt.ir.neighborhood import axis_starts, axis_visible, neighborhood_visible, per_axis
from attnopt.runtime.cpu.common import (
    additive_mask,
    all_finite,
    chunked_flash,
    exact_visible,
    flash_attend,
    gather_pairs,
    record_computed,
)
from attnopt.runtime.cpu.dense import dense_attention_cpu

__all__ = ["neighborhood_attention"]


@lru_cache(maxsize=64)
def _axis_tiles(length: int, kernel: int, dilation: int, tile: int):
    """Tiles along one axis: query coords ``[n, T]``, key coords ``[n, U]`` and visibility ``[n, T, U]``.

    Tiles hold up to ``tile`` consecutive members of one dilation class; short tiles repeat their
    last query (a duplicate computes the same row) and pad keys with masked duplicates.
    """
    starts = axis_starts(length, kernel, dilation)
    visible = axis_visible(length, kernel, dilation)
    queries, keys = [], []
    for residue in range(dilation):
        members = torch.arange(residue, length, dilation)
        runs = -(-members.numel() // tile)
        size = -(-members.numel() // runs)  # balanced runs: 9 members, tile 8 -> 5 + 4
        for first in range(0, members.numel(), size):
            run = members[first : first + size]
            lo, hi = int(starts[run[0]]), int(starts[run[-1]]) + dilation * (kernel - 1)
            queries.append(run)
            keys.append(torch.arange(lo, hi + 1, dilation))
    width, tile = max(k.numel() for k in keys), max(r.numel() for r in queries)
    q_coords = torch.stack([torch.cat([r, r[-1:].expand(tile - r.numel())]) for r in queries])
    k_coords = torch.stack([torch.cat([k, k[-1:].expand(width - k.numel())]) for k in keys])
    k_real = torch.stack([torch.arange(width) < k.numel() for k in keys])
    tile_visible = visible[q_coords.unsqueeze(-1), k_coords.unsqueeze(1)] & k_real.unsqueeze(1)
    return q_coords, k_coords, tile_visible


def _combine_axes(
    axes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], grid: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cartesian product of per-axis tiles: flat query ``[nT, Qt]``, key ``[nT, Ut]`` tokens, mask."""
    dims = len(grid)
    strides = [math.prod(grid[a + 1 :]) for a in range(dims)]
    q_tok = k_tok = torch.zeros((), dtype=torch.long)
    vis = torch.ones((), dtype=torch.bool)
    for axis, (q_coords, k_coords, tile_visible) in enumerate(axes):
        # layout: [n_0 .. n_{dims-1}, T_0 .. T_{dims-1}, U_0 .. U_{dims-1}]
        def place(t: torch.Tensor, slots: tuple[int, ...], axis: int = axis) -> torch.Tensor:
            shape = [1] * (3 * dims)
            for slot, size in zip(slots, t.shape):
                shape[slot] = size
            return t.reshape(shape)

        q_tok = q_tok + place(q_coords * strides[axis], (axis, dims + axis))
        k_tok = k_tok + place(k_coords * strides[axis], (axis, 2 * dims + axis))
        vis = vis & place(tile_visible, (axis, dims + axis, 2 * dims + axis))
    num_tiles = math.prod(p[0].shape[0] for p in axes)
    q_tok = q_tok.reshape(num_tiles, -1)
    k_tok = k_tok.reshape(num_tiles, -1)
    vis = vis.reshape(num_tiles, q_tok.shape[1], k_tok.shape[1])
    return q_tok, k_tok, vis


def _default_tile(grid: tuple[int, ...], dilations: tuple[int, ...]) -> tuple[int, ...]:
    # 64 queries per tile: 8x8 (2-D) or 4x4x4 (3-D); measured fastest for 7x7 on a 64x64 grid
    side = 8 if len(grid) == 2 else 4
    return tuple(max(1, min(side, length // d)) for length, d in zip(grid, dilations))


def _tile_plan(grid, kernels, dilations, tiles, num_global, device):
    """Token indices of every tile: queries ``[nT, Qt]``, keys ``[nT, G + Ut]`` (globals first)
    and the bool visibility ``[nT, Qt, G + Ut]``."""
    axes = [
        _axis_tiles(g, kn, d, min(t, g)) for g, kn, d, t in zip(grid, kernels, dilations, tiles)
    ]
    q_tok, k_tok, vis = (t.to(device) for t in _combine_axes(axes, grid))
    num_tiles, tile_q = q_tok.shape
    globals_ = torch.arange(num_global, device=device).expand(num_tiles, num_global)
    k_tok = torch.cat([globals_, k_tok + num_global], dim=1)
    vis = torch.cat([vis.new_ones(num_tiles, tile_q, num_global), vis], dim=2)
    return q_tok + num_global, k_tok, vis


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Sequence[int],
    kernel: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    num_global: int = 0,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tile: int | Sequence[int] | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """2-D / 3-D neighbourhood self-attention with global tokens, skipping out-of-window keys.

    Args:
        q: ``[B, Hq, S, D]`` with ``S = num_global + prod(grid)``.
        k: ``[B, Hkv, S, D]``.
        v: ``[B, Hkv, S, Dv]``.
        grid: ``(H, W)`` or ``(T, H, W)``, row-major after the global tokens.
        kernel: window size per axis (int or one per axis); needs ``kernel * dilation <= size``.
        dilation: dilation per axis.
        num_global: leading tokens that see and are seen by every token.
        scale: score scale (default ``D ** -0.5``).
        mask: bool or additive mask broadcastable to ``[B, Hq, S, S]``.
        bias: additive bias broadcastable to ``[B, Hq, S, S]``.
        tile: query tile per axis, in class members (default 8x8 in 2-D, 4x4x4 in 3-D).
        stats: optional dict filled with ``computed_fraction``.

    Returns:
        ``[B, Hq, S, Dv]`` in q's dtype.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid must be (H, W) or (T, H, W), got {grid}")
    batch, q_heads, seq, head_dim = q.shape
    if seq != num_global + math.prod(grid) or k.shape[2] != seq or v.shape[2] != seq:
        raise ValueError(f"sequence {seq} is not num_global {num_global} + grid {grid}")
    group, value_dim = q_heads // k.shape[1], v.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    kernels = per_axis(kernel, len(grid), "kernel")
    dilations = per_axis(dilation, len(grid), "dilation")
    tiles = _default_tile(grid, dilations) if tile is None else per_axis(tile, len(grid), "tile")
    mask4, bias4 = mask_to_4d(mask, "mask"), mask_to_4d(bias, "bias")
    if all(kn >= g for kn, g in zip(kernels, grid)):  # every window is the whole grid
        record_computed(stats, seq * seq, seq * seq)
        return dense_attention_cpu(q, k, v, scale=scale, causal=False, mask=mask, bias=bias)
    if not all_finite(q, k, v):  # the flash calls would leak hidden NaN/inf keys
        record_computed(stats, seq * seq, seq * seq)
        visible = neighborhood_visible(grid, kernels, dilations, num_global, q.device)
        return exact_visible(q, k, v, visible, scale=scale, mask=mask, bias=bias)
    q_tok, k_tok, vis = _tile_plan(grid, kernels, dilations, tiles, num_global, q.device)
    num_tiles, tile_q = q_tok.shape
    k_full, v_full = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
    q_flat = q.reshape(batch * q_heads, seq, head_dim)
    k_flat = k_full.reshape(batch * q_heads, seq, head_dim)
    v_flat = v_full.reshape(batch * q_heads, seq, value_dim)
    width = k_tok.shape[1]
    q_tiles = q_flat.index_select(1, q_tok.reshape(-1)).view(
        batch * q_heads, num_tiles, tile_q, head_dim
    )
    k_tiles = k_flat.index_select(1, k_tok.reshape(-1)).view(
        batch * q_heads, num_tiles, width, head_dim
    )
    v_tiles = v_flat.index_select(1, k_tok.reshape(-1)).view(
        batch * q_heads, num_tiles, width, value_dim
    )
    q_pos, k_pos = q_tok.unsqueeze(-1), k_tok.unsqueeze(1)
    user = [None if t is None else gather_pairs(t, q_pos, k_pos) for t in (mask4, bias4)]
    tile_out, _ = chunked_flash(q_tiles, k_tiles, v_tiles, vis, user, scale, batch=batch)
    # each grid token reads its row from one tile slot (padding slots are exact duplicates)
    slot = torch.empty(seq, dtype=torch.long, device=q.device)
    slot[q_tok.reshape(-1)] = torch.arange(q_tok.numel(), device=q.device)
    out = q.new_empty(batch * q_heads, seq, value_dim)
    out[:, num_global:] = tile_out.reshape(batch * q_heads, -1, value_dim).index_select(
        1, slot[num_global:]
    )
    computed = num_tiles * tile_q * width
    if num_global > 0:  # global queries see every key: one small dense call
        rows = torch.arange(num_global, device=q.device).unsqueeze(1)
        cols = torch.arange(seq, device=q.device).unsqueeze(0)
        glob_user = [None if t is None else gather_pairs(t, rows, cols) for t in (mask4, bias4)]
        addend = additive_mask(None, *glob_user, q.dtype)
        glob_out, _ = flash_attend(q[:, :, :num_global], k_full, v_full, addend, scale)
        out[:, :num_global] = glob_out.reshape(batch * q_heads, num_global, value_dim)
        computed += num_global * seq
    record_computed(stats, computed * batch * q_heads, batch * q_heads * seq * seq)
    return out.view(batch, q_heads, seq, value_dim)
