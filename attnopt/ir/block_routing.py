"""How block-sparse metadata is chosen: content routing, calibrated static patterns, key permutation.

Entry points: :func:`route_blocks`, :func:`calibration_block_scores`, :func:`static_block_pattern`,
:func:`permute_for_sparsity`, :func:`apply_permutation`.

The first three produce :class:`~attnopt.ir.block_sparse.BlockMeta` through the selection rules of
:mod:`attnopt.ir.block_sparse` (:func:`~attnopt.ir.block_sparse.block_rules`,
:func:`~attnopt.ir.block_sparse.select_blocks`); the permutation prepares keys for them:

* :func:`route_blocks` is content routing (BiFormer's bi-level routing; MInference/VMoBA's
  cumulative threshold): mean-pool queries and keys per block, score the pooled pairs, keep per
  query block the top-k key blocks or the smallest set whose softmax mass passes a threshold. Its
  cost is ``O(Sq * Sk * D / block^2)``, a few milliseconds where attention takes hundreds.
* :func:`static_block_pattern` picks a per-head pattern once, from the true block attention mass
  measured on calibration batches (:func:`calibration_block_scores`).
* :func:`permute_for_sparsity` is a PBS-Attn-style key permutation that packs the keys most queries
  attend to into few blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from attnopt.ir.attention_reference import mask_to_4d
from attnopt.ir.block_sparse import BlockMeta, block_rules, select_blocks

__all__ = [
    "apply_permutation",
    "calibration_block_scores",
    "permute_for_sparsity",
    "route_blocks",
    "static_block_pattern",
]


def _check_choice(density: float | None, threshold: float | None) -> None:
    if density is None and threshold is None:
        raise ValueError("give density, threshold or both")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _pool(x: torch.Tensor, block: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` ``[B, H, S, D]`` over blocks of ``block`` rows (optionally weighted per row)."""
    batch, heads, length, dim = x.shape
    num_blocks = -(-length // block)
    if weight is None and length % block == 0:  # the common case: one strided reduction, no copy
        return x.reshape(batch, heads, num_blocks, block, dim).mean(dim=3, dtype=torch.float32)
    w = torch.ones(1, 1, length, 1, dtype=torch.float32, device=x.device)
    if weight is not None:
        w = weight.to(torch.float32).reshape(weight.shape[0], weight.shape[1], length, 1)
    pad = num_blocks * block - length
    sums = torch.nn.functional.pad(x.to(torch.float32) * w, (0, 0, 0, pad))
    total = torch.nn.functional.pad(w, (0, 0, 0, pad)).reshape(w.shape[0], w.shape[1], -1, block)
    sums = sums.reshape(batch, heads, num_blocks, block, dim).sum(dim=3)
    return sums / total.sum(dim=-1, keepdim=True).clamp_min(1.0)


def _visible_bool(mask4: torch.Tensor) -> torch.Tensor:
    if mask4.dtype == torch.bool:
        return mask4
    # large finite negatives (HF's finfo.min padding) count as masked, like -inf
    return mask4 > torch.finfo(mask4.dtype).min / 2


def _mask_blocks(mask4: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Which (query block, key block) pairs hold at least one visible entry: ``[Bm, Hm, *, *]``.

    A row whose keys an additive mask hides with finite values (``finfo.min``) is uniform over
    those keys in eager softmax (every score becomes the same huge negative), so such rows keep
    every key with a finite mask value."""
    visible = _visible_bool(mask4)
    if mask4.dtype != torch.bool:
        empty = ~visible.any(dim=-1, keepdim=True)
        visible = visible | (empty & torch.isfinite(mask4))
    bm, hm, qm, km = visible.shape
    pad_q = (-qm) % block_q if qm > 1 else 0
    pad_k = (-km) % block_k if km > 1 else 0
    visible = torch.nn.functional.pad(visible, (0, pad_k, 0, pad_q), value=False)
    rows, cols = (block_q if qm > 1 else 1), (block_k if km > 1 else 1)
    visible = visible.reshape(
        bm, hm, visible.shape[2] // rows, rows, visible.shape[3] // cols, cols
    )
    return visible.any(dim=5).any(dim=3)


def route_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int = 64,
    density: float | None = None,
    threshold: float | None = None,
    keep_local: bool = True,
    sinks: int = 0,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    small_ops: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> BlockMeta:
    """Content routing: pick key blocks per query block from block-pooled q and k.

    Pooled scores are ``scale * mean(q_block) . mean(k_block)``; their softmax over the allowed key
    blocks ranks the blocks. With ``density`` each query block keeps ``ceil(density * nKB)`` blocks
    (forced local/sink blocks included, never fewer than those); with ``threshold`` it keeps the
    smallest set of top blocks whose softmax mass reaches the threshold (capped by ``density`` when
    both are given).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        block: key block size (and query block size unless ``block_q`` is given).
        density: fraction of key blocks to keep per query block, in ``(0, 1]``.
        threshold: cumulative pooled softmax mass to reach, in ``(0, 1]``.
        keep_local: always keep the key blocks under the query block's aligned positions.
        sinks: always keep the blocks holding the first ``sinks`` keys.
        causal: never select blocks wholly in the (bottom-right aligned) future.
        mask: bool or additive mask broadcastable to ``[B, Hq, Sq, Sk]``; blocks whose entries are
            all masked are excluded, and masked keys are left out of the key pooling.
        scale: score scale for the pooled scores (default ``D ** -0.5``).
        block_q: query block size (default ``block``).
        small_ops: a context the small ``[B, H, nQB, nKB]`` block computations run in (the CPU
            runtime passes one that keeps them on one thread); it changes no result.

    Returns:
        :class:`BlockMeta` with ``Bm = B``, ``Hm = Hq``.
    """
    _check_choice(density, threshold)
    block_q = block if block_q is None else block_q
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    mask4 = mask_to_4d(mask, "mask")
    key_weight = None
    if mask4 is not None and mask4.shape[1:3] == (1, 1) and mask4.shape[3] == kv_len:
        key_weight = _visible_bool(mask4)[:, :, 0, :].unsqueeze(2)  # [Bm, 1, 1, Sk]
    q_pool = _pool(q, block_q)  # the only passes over q and k: keep every thread
    k_pool = _pool(k, block, key_weight)
    mask_blocks = None if mask4 is None else _mask_blocks(mask4, block_q, block)
    with small_ops():  # the rest works on [B, H, nQB, nKB]
        k_pool = k_pool.repeat_interleave(q_heads // kv_heads, dim=1)
        logits = torch.matmul(q_pool, k_pool.transpose(-1, -2)) * scale
        allowed, forced = block_rules(
            q_len,
            kv_len,
            block_q,
            block,
            causal=causal,
            keep_local=keep_local,
            sinks=sinks,
            device=q.device,
        )
        allowed = allowed.expand(batch, q_heads, -1, -1)
        if mask_blocks is not None:
            allowed = allowed & mask_blocks
        forced = forced & allowed
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        counts, indices = select_blocks(
            probs, allowed, forced, density=density, threshold=threshold
        )
    return BlockMeta(block_q=block_q, block_k=block, kv_counts=counts, kv_indices=indices)


def calibration_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    rows_per_step: int = 256,
) -> torch.Tensor:
    """True attention mass per (head, query block, key block) for one calibration batch.

    Computed exactly, a few query rows at a time (memory ``rows_per_step * Sk``, never ``Sq x Sk``).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        block_q: query block size.
        block_k: key block size.
        scale: score scale (default ``D ** -0.5``).
        causal: bottom-right aligned causal rule.
        mask: bool or additive mask broadcastable to ``[B, Hq, Sq, Sk]``.
        rows_per_step: query rows per step.

    Returns:
        Float32 ``[Hq, nQB, nKB]``: mean over batch and the block's queries of the softmax
        probability falling in each key block (each row sums to 1 unless fully masked).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    k = k.repeat_interleave(q_heads // k.shape[1], dim=1).to(torch.float32)
    mask4 = mask_to_4d(mask, "mask")
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    mass = torch.zeros(q_heads, num_q_blocks, num_kv_blocks, device=q.device)
    step = max(block_q, rows_per_step // block_q * block_q)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        scores = torch.matmul(q[:, :, start:stop].to(torch.float32), k.transpose(-1, -2)) * scale
        if mask4 is not None:
            rows = mask4[:, :, start:stop] if mask4.shape[2] > 1 else mask4
            scores = (
                scores.masked_fill(~rows, float("-inf"))
                if rows.dtype == torch.bool
                else (scores + rows.to(torch.float32))
            )
        if causal:
            aligned = torch.arange(start, stop, device=q.device).unsqueeze(1) + kv_len - q_len
            scores = scores.masked_fill(
                torch.arange(kv_len, device=q.device) > aligned, float("-inf")
            )
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        probs = torch.nn.functional.pad(probs, (0, num_kv_blocks * block_k - kv_len))
        per_block = probs.reshape(batch, q_heads, stop - start, num_kv_blocks, block_k).sum(-1)
        rows_block = torch.arange(start, stop, device=q.device) // block_q
        mass.index_add_(1, rows_block, per_block.sum(0).to(mass.dtype))
    rows_per_block = torch.bincount(torch.arange(q_len, device=q.device) // block_q)
    return mass / (rows_per_block.view(1, -1, 1).to(mass.dtype) * batch)


def static_block_pattern(
    block_scores: torch.Tensor | Sequence[torch.Tensor],
    *,
    density: float | None = None,
    threshold: float | None = None,
    block_q: int,
    block_k: int,
    q_len: int,
    kv_len: int,
    keep_local: bool = True,
    sinks: int = 0,
    causal: bool = False,
) -> BlockMeta:
    """A per-head static block pattern chosen from calibration block scores.

    Args:
        block_scores: ``[Hq, nQB, nKB]`` block attention mass (see
            :func:`calibration_block_scores`), a stack ``[N, Hq, nQB, nKB]`` or a sequence of such
            tensors from several calibration batches; they are averaged.
        density: fraction of key blocks to keep per query block.
        threshold: cumulative (row-normalised) mass to reach instead of / capped by ``density``.
        block_q: query block size the scores were measured with.
        block_k: key block size.
        q_len: query length the pattern is for.
        kv_len: key length the pattern is for.
        keep_local: always keep the local (diagonal) key blocks.
        sinks: always keep the blocks holding the first ``sinks`` keys.
        causal: never select blocks wholly in the future.

    Returns:
        :class:`BlockMeta` with ``Bm = 1`` and ``Hm = Hq``.
    """
    _check_choice(density, threshold)
    if not isinstance(block_scores, torch.Tensor):
        block_scores = torch.stack([torch.as_tensor(s) for s in block_scores])
    scores = block_scores.to(torch.float32)
    if scores.dim() == 4:
        scores = scores.mean(dim=0)
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    if scores.dim() != 3 or scores.shape[1:] != (num_q_blocks, num_kv_blocks):
        raise ValueError(f"block_scores {tuple(scores.shape)} do not fit {q_len}x{kv_len} blocks")
    allowed, forced = block_rules(
        q_len,
        kv_len,
        block_q,
        block_k,
        causal=causal,
        keep_local=keep_local,
        sinks=sinks,
        device=scores.device,
    )
    probs = torch.where(allowed, scores.clamp_min(0.0), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    allowed = allowed.expand_as(probs)
    counts, indices = select_blocks(
        probs, allowed, forced.expand_as(probs), density=density, threshold=threshold
    )
    return BlockMeta(block_q, block_k, counts.unsqueeze(0), indices.unsqueeze(0))


def permute_for_sparsity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    *,
    segment: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PBS-Attn-style key permutation that packs heavily attended keys into few blocks.

    Each key gets an importance ``logsumexp_m(scale * mean(q_block_m) . k_j)`` (how much attention
    it draws from the pooled query blocks); inside every segment of ``segment`` keys (a multiple of
    ``block``) keys are sorted by decreasing importance, so the keys most queries need fill the first
    blocks of each segment and top-k block routing keeps more mass with fewer blocks. Permuting keys
    and values together (and the key dim of masks) leaves non-causal attention unchanged; for
    causal attention use segments of one block-aligned causal unit and keep the diagonal dense.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]`` (only checked: values follow the key permutation).
        block: block size of the block-sparse kernel the permutation prepares for.
        segment: keys are only reordered within segments of this many keys (default: all keys).
        scale: score scale (default ``D ** -0.5``).

    Returns:
        ``(perm, inverse_perm)``, int64 ``[B, Hkv, Sk]``: position ``p`` of the permuted sequence
        holds original key ``perm[..., p]``; ``inverse_perm`` undoes it.
    """
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    batch, kv_heads, kv_len, head_dim = k.shape
    group = q.shape[1] // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    segment = kv_len if segment is None else segment
    segment = max(block, -(-segment // block) * block)
    q_pool = _pool(q, block).reshape(batch, kv_heads, group * -(-q.shape[2] // block), head_dim)
    importance = torch.logsumexp(
        torch.matmul(k.to(torch.float32), q_pool.transpose(-1, -2)) * scale, -1
    )
    num_segments = -(-kv_len // segment)
    pad = num_segments * segment - kv_len
    importance = torch.nn.functional.pad(importance, (0, pad), value=float("-inf"))
    local = torch.argsort(
        importance.view(batch, kv_heads, num_segments, segment),
        dim=-1,
        descending=True,
        stable=True,
    )
    base = torch.arange(num_segments, device=k.device).view(1, 1, -1, 1) * segment
    perm = (local + base).reshape(batch, kv_heads, -1)[..., :kv_len]
    inverse = torch.empty_like(perm)
    inverse.scatter_(-1, perm, torch.arange(kv_len, device=k.device).expand_as(perm))
    return perm, inverse


def apply_permutation(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder keys or values by a permutation from :func:`permute_for_sparsity`.

    Args:
        x: ``[B, Hkv, S, D]`` keys or values.
        perm: int64 ``[B, Hkv, S]``.

    Returns:
        ``x`` with ``x_out[:, :, p] = x[:, :, perm[:, :, p]]``.
    """
    return torch.gather(x, 2, perm.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
