"""Block-sparse attention semantics: the block metadata format and the block selection rules.

Entry points: :class:`BlockMeta` (the block metadata format: the op's ``kv_counts``/``kv_indices``
operands and what routing produces), :func:`block_meta_visible` (its dense meaning),
:func:`block_rules` and :func:`select_blocks` (the selection rules).

They are part of the ``block_sparse`` variant's definition. The CPU kernel
(:mod:`attnopt.runtime.cpu.block_sparse`) and the Triton kernels consume the same metadata; the
ways of producing it (content routing, calibrated static patterns, key permutation) are in
:mod:`attnopt.ir.block_routing` and all go through the rules here:

a causal query block never selects a block that lies wholly in its future; ``keep_local`` always
keeps the key blocks under the query block's own (aligned) positions; ``sinks`` always keeps the
blocks holding the first ``sinks`` keys; blocks whose keys are all masked are never selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BlockMeta",
    "block_meta_visible",
    "block_rules",
    "select_blocks",
]


@dataclass(frozen=True, eq=False)
class BlockMeta:
    """Block-sparse metadata: which key blocks each query block attends to.

    ``kv_counts`` is int32 ``[Bm, Hm, num_q_blocks]`` and ``kv_indices`` int32
    ``[Bm, Hm, num_q_blocks, max_kv_blocks]`` (first ``kv_counts`` entries valid, ascending), with
    ``Bm`` in ``{1, B}`` and ``Hm`` in ``{1, Hq}``. Query block ``m`` covers queries
    ``[m * block_q, (m + 1) * block_q)`` and key block ``n`` keys ``[n * block_k, (n + 1) * block_k)``.
    """

    block_q: int
    block_k: int
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor

    def __post_init__(self) -> None:
        if self.block_q <= 0 or self.block_k <= 0:
            raise ValueError(f"block sizes must be positive, got {self.block_q}, {self.block_k}")
        if self.kv_counts.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError("kv_counts must be [Bm, Hm, nQB] and kv_indices [Bm, Hm, nQB, max_kv]")
        if self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"kv_indices {tuple(self.kv_indices.shape)} does not match kv_counts "
                f"{tuple(self.kv_counts.shape)}"
            )

    @property
    def num_q_blocks(self) -> int:
        """Number of query blocks."""
        return self.kv_counts.shape[-1]

    @property
    def max_kv_blocks(self) -> int:
        """Width of ``kv_indices`` (the largest possible count)."""
        return self.kv_indices.shape[-1]

    def kept_fraction(self, num_kv_blocks: int) -> float:
        """Mean fraction of key blocks kept per query block.

        Args:
            num_kv_blocks: number of key blocks of the sequence.

        Returns:
            ``mean(kv_counts) / num_kv_blocks``.
        """
        return float(self.kv_counts.float().mean()) / max(num_kv_blocks, 1)


def block_meta_visible(meta: BlockMeta, q_len: int, kv_len: int) -> torch.Tensor:
    """Dense bool visibility of block metadata (the reference semantics; kernels never build it).

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


def block_rules(
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    *,
    causal: bool,
    keep_local: bool,
    sinks: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Structural ``(allowed, forced)`` bool ``[nQB, nKB]`` block matrices."""
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    offset = kv_len - q_len
    first_q = torch.arange(num_q_blocks, device=device) * block_q
    last_q = torch.clamp(first_q + block_q, max=q_len) - 1
    key_start = torch.arange(num_kv_blocks, device=device) * block_k
    allowed = torch.ones(num_q_blocks, num_kv_blocks, dtype=torch.bool, device=device)
    if causal:
        allowed &= key_start.unsqueeze(0) <= (last_q + offset).unsqueeze(1)
    forced = torch.zeros_like(allowed)
    if keep_local:
        lo = torch.clamp(first_q + offset, 0, kv_len - 1) // block_k
        hi = torch.clamp(last_q + offset, 0, kv_len - 1) // block_k
        blocks = torch.arange(num_kv_blocks, device=device)
        forced |= (blocks >= lo.unsqueeze(1)) & (blocks <= hi.unsqueeze(1))
    if sinks > 0:
        forced |= (key_start < sinks).unsqueeze(0)
    return allowed, forced & allowed


def select_blocks(
    probs: torch.Tensor,
    allowed: torch.Tensor,
    forced: torch.Tensor,
    *,
    density: float | None,
    threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose key blocks per query block from block probabilities ``[..., nQB, nKB]``.

    Returns:
        ``(kv_counts int32 [..., nQB], kv_indices int32 [..., nQB, max_kv])``.
    """
    num_kv_blocks = probs.shape[-1]
    probs = torch.where(allowed, probs, 0.0)
    score = torch.where(forced, 2.0, torch.where(allowed, probs, -1.0))
    num_forced = forced.sum(dim=-1, keepdim=True)
    if threshold is None:  # top-k only: no full sort needed
        budget = max(1, math.ceil(density * num_kv_blocks))
        width = min(num_kv_blocks, max(budget, int(num_forced.max()) if num_forced.numel() else 0))
        order_score, order = torch.topk(score, width, dim=-1)
    else:
        order_score, order = torch.sort(score, dim=-1, descending=True, stable=True)
    slot = torch.arange(order.shape[-1], device=probs.device)
    keep = order_score >= 0
    if threshold is not None:
        sorted_probs = probs.gather(-1, order)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= (mass_before < threshold) | (slot < num_forced)
    if density is not None:
        budget = max(1, math.ceil(density * num_kv_blocks))
        keep &= slot < torch.clamp(num_forced, min=budget)
    counts = keep.sum(dim=-1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    if order.shape[-1] > width:  # kept entries lead in score order
        keep, order = keep[..., :width], order[..., :width]
    chosen = torch.where(keep, order, num_kv_blocks).sort(dim=-1).values
    chosen = torch.where(chosen < num_kv_blocks, chosen, 0)
    return counts.to(torch.int32), chosen.to(torch.int32)
