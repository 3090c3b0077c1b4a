"""Block lists for the Triton attention kernel, derived from the one block-metadata format.

Entry points: :func:`block_meta_from_block_mask`, :func:`split_full_blocks`,
:func:`neighborhood_block_meta`.

Block-sparse calls carry :class:`attnopt.ir.block_sparse.BlockMeta` everywhere. The kernel can
also walk a second list of "full" key blocks, blocks that lie inside the key sequence and are
causally visible to every row of their query block, without per-element checks;
:func:`split_full_blocks` derives the two lists at launch time, each again a ``BlockMeta``.
"""

from __future__ import annotations

import functools

import torch

from attnopt.ir.block_sparse import BlockMeta, block_meta_visible
from attnopt.ir.neighborhood import neighborhood_visible


def block_meta_from_block_mask(block_mask: torch.Tensor, block_q: int, block_k: int) -> BlockMeta:
    """Block metadata listing the True entries of a dense block mask.

    Args:
        block_mask: bool ``[..., num_q_blocks, num_kv_blocks]`` with 0 to 2 leading dims (batch or
            1, heads or 1); True = the query block sees the key block.
        block_q: query rows per block.
        block_k: keys per block.

    Returns:
        The metadata (int32 lists, ascending, on ``block_mask``'s device).
    """
    blocks = block_mask.to(torch.bool)
    while blocks.dim() < 4:
        blocks = blocks.unsqueeze(0)
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not listed" puts listed block indices first, in ascending order.
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    return BlockMeta(block_q, block_k, counts, order[..., :width].to(torch.int32).contiguous())


def listed_blocks(meta: BlockMeta, num_kv_blocks: int) -> torch.Tensor:
    """The dense block mask of block metadata.

    Args:
        meta: the block metadata.
        num_kv_blocks: number of key blocks of the sequence.

    Returns:
        Bool ``[Bm, Hm, num_q_blocks, num_kv_blocks]``.
    """
    # One "block" per query and per key: block_meta_visible then speaks in blocks.
    unit = BlockMeta(1, 1, meta.kv_counts, meta.kv_indices)
    return block_meta_visible(unit, meta.num_q_blocks, num_kv_blocks)


def split_full_blocks(
    meta: BlockMeta, *, q_len: int, kv_len: int, causal: bool
) -> tuple[BlockMeta, BlockMeta]:
    """Split the listed blocks into those that need per-element checks and "full" ones.

    A full block lies inside the key sequence and, for causal calls, is visible (bottom-right
    aligned) to every row of its query block. Mask and bias tensors still apply to it.

    Args:
        meta: the call's block metadata.
        q_len: number of queries.
        kv_len: number of keys.
        causal: whether the call is causal.

    Returns:
        ``(partial, full)``: together they list exactly the blocks ``meta`` lists.
    """
    num_kv_blocks = -(-kv_len // meta.block_k)
    blocks = listed_blocks(meta, num_kv_blocks)
    device = blocks.device
    first_row = torch.arange(meta.num_q_blocks, device=device) * meta.block_q
    key_end = (torch.arange(num_kv_blocks, device=device) + 1) * meta.block_k
    inside = (key_end <= kv_len).expand(meta.num_q_blocks, num_kv_blocks)
    if causal:
        inside = inside & (key_end[None, :] - 1 <= first_row[:, None] + (kv_len - q_len))
    full = blocks & inside
    return (
        block_meta_from_block_mask(blocks & ~full, meta.block_q, meta.block_k),
        block_meta_from_block_mask(full, meta.block_q, meta.block_k),
    )


@functools.lru_cache(maxsize=16)
def neighborhood_block_meta(
    grid: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: int,
    num_global: int,
    block: int,
) -> tuple[torch.Tensor, BlockMeta]:
    """Neighbourhood visibility and the block lists that skip key blocks no query of a block sees.

    Args:
        grid: token grid ``(H, W)`` or ``(T, H, W)``.
        kernel: window size per grid dim.
        dilation: dilation.
        num_global: leading global tokens.
        block: query and key block size of the lists.

    Returns:
        ``(visible, meta)``: bool ``[S, S]`` with ``S = num_global + prod(grid)`` and the block
        metadata (both on the CPU).
    """
    visible = neighborhood_visible(grid, kernel, dilation, num_global)
    length = visible.shape[-1]
    padded = -(-length // block) * block
    padded_visible = torch.zeros(padded, padded, dtype=torch.bool)
    padded_visible[:length, :length] = visible
    blocks = padded_visible.reshape(padded // block, block, padded // block, block).any(dim=(1, 3))
    return visible, block_meta_from_block_mask(blocks, block, block)
