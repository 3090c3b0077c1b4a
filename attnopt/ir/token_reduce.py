"""Token reduction ops: fewer tokens mid-graph (ToMe merging, EViT pruning) and back again.

Entry points: the ops ``token_merge``, ``token_prune`` (a padded batch ``[B, N, C]``),
``token_merge_packed``, ``token_prune_packed`` (packed tokens ``[T, C]`` after padding removal,
rows given by segment ids) and ``token_unmerge``; their functions :func:`merge_tokens`,
:func:`prune_tokens`, :func:`merge_packed`, :func:`prune_packed`, :func:`unmerge_tokens`; the
attributes :class:`TokenMergeAttrs`, :class:`TokenPruneAttrs`, :class:`UnmergeAttrs`.

Every reduction op takes the token-wise hidden state and the bookkeeping of the reductions before
it, and returns the reduced state with new bookkeeping:

* ``size`` (float) is the number of original tokens each current token stands for; a padded
  token has size 0 and counts as nothing (it is masked as a key, merges only with padding and
  never changes a real token);
* ``source`` (int64) maps each original position to the current token it ended up in (``-1``:
  dropped, its unmerged vector is zeros). ``token_unmerge`` gathers with it, so every original
  position gets the vector of the token it was merged into.

In a padded batch, ``x [B, N, C] -> (x' [B, N', C], size' [B, N'], source' [B, S0])`` with the
same ``N'`` for every row (padding merges or is pruned first). On packed tokens, ``x [T, C] ->
(x' [T', C], size' [T'], source' [T0], segments' [1, T'])``: each row reduces its own share of
its own tokens. The first reduction of a graph gets ``size=None`` (ones, or ``valid`` when the
model has a key padding mask) and ``source=None`` (the identity). A size that depends on the
data is a symbol named by the attributes, bound from the output by the program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnopt.ir.ops import OpDef, register_op
from attnopt.ir.types import TensorType, Type

__all__ = [
    "TokenMergeAttrs",
    "SiteTapAttrs",
    "restore_site_output",
    "TokenPruneAttrs",
    "UnmergeAttrs",
    "merge_tokens",
    "merge_count",
    "merge_packed",
    "prune_packed",
    "prune_count",
    "prune_tokens",
    "reduced_tokens",
    "unmerge_tokens",
]

#: Similarity given to a pair of padded tokens: above any cosine, so padding merges first.
_PAD_PAIR = 2.0


@dataclass(frozen=True)
class TokenMergeAttrs:
    """``token_merge``: merge ``r`` tokens (or down to ``keep`` of them) by bipartite matching.

    Attributes:
        r: tokens removed by this merge (capped at the mergeable half), or None.
        keep: fraction of this layer's tokens kept (``N' = ceil(keep * N)``), used when ``r`` is
            None.
        protect: leading tokens that never merge (CLS, distillation, registers).
        symbol: name of ``N'`` when it is only known at run time.
    """

    r: int | None = None
    keep: float | None = None
    protect: int = 1
    symbol: str = "ntm0"


@dataclass(frozen=True)
class TokenPruneAttrs:
    """``token_prune``: keep the most attended tokens, fuse the rest into one token.

    Attributes:
        keep: fraction of the unprotected tokens kept (rounded up).
        protect: leading tokens always kept; with ``rank="cls"`` token 0 is the CLS token.
        fuse: fuse the pruned tokens into one extra token (else they are dropped).
        rank: ``"cls"`` (attention from token 0) or ``"received"`` (attention each token
            receives from every real query: models without a CLS token).
        scale: the attention's score scale.
        symbol: name of ``N'`` when it is only known at run time.
    """

    keep: float = 0.7
    protect: int = 1
    fuse: bool = True
    rank: str = "cls"
    scale: float = 1.0
    symbol: str = "ntp0"


@dataclass(frozen=True)
class UnmergeAttrs:
    """``token_unmerge``: the token axis of ``x`` (1 for ``[B, N, C]``, 2 for ``[B, H, N, D]``)
    and its batch axis (None: packed tokens of no batch axis, ``source`` is ``[T0]``)."""

    axis: int = 1
    batch: int | None = 0


def _start(x: torch.Tensor, size: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """The sizes going into a reduction: given, or 1 per real token (0 per padded one)."""
    if size is not None:
        return size
    if valid is not None:  # [B or 1, N] or [B or 1, 1, 1, N]
        rows = valid.reshape(-1, x.shape[1]).expand(x.shape[0], x.shape[1])
        return rows.to(torch.float32)
    return x.new_ones(x.shape[:2], dtype=torch.float32)


def _compose(local: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """Original position -> new token, through this reduction's ``local`` map (-1 stays -1);
    ``[B, S0]`` maps in a batch, ``[T0]`` maps of packed tokens."""
    if source is None:
        return local
    if source.dim() == 1:
        mapped = local[source.clamp(min=0)]
    else:
        mapped = local.gather(1, source.clamp(min=0))
    return torch.where(source < 0, source, mapped)


def _match(
    keys: torch.Tensor, real: torch.Tensor, protect: int, pad_pairs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's matching of the alternating split: for each token of the first set (even
    positions), its most similar token of the second and their cosine, ``[B, Na]`` each.
    Padding matches only padding (first of all when ``pad_pairs``); protected tokens and padding
    without a padded partner get ``-inf``."""
    keys = keys.float()
    keys = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    scores = keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)
    a_real, b_real = real[:, ::2, None], real[:, None, 1::2]
    scores = scores.masked_fill(~(a_real & b_real), -math.inf)
    if pad_pairs:
        scores = scores.masked_fill(~a_real & ~b_real, _PAD_PAIR)
    if protect:
        scores[:, : (protect + 1) // 2, :] = -math.inf
        scores[:, :, : protect // 2] = -math.inf
    return scores.max(dim=-1)


def merge_count(n: int, attrs: TokenMergeAttrs) -> int:
    """Tokens ``token_merge`` removes from ``n``: ``r`` or ``n - ceil(keep * n)``, capped at the
    unprotected half that can merge (the first set of the alternating split)."""
    mergeable = max(0, (n + 1) // 2 - (attrs.protect + 1) // 2)
    if attrs.r is not None:
        wanted = attrs.r
    else:
        keep = 1.0 if attrs.keep is None else attrs.keep
        wanted = n - math.ceil(keep * n - 1e-9)
    return max(0, min(wanted, mergeable, n - 1))


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor | None,
    valid: torch.Tensor | None,
    source: torch.Tensor | None,
    attrs: TokenMergeAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: merge the ``r`` most similar pairs by size-weighted mean.

    Args:
        x: token-wise states ``[B, N, C]``.
        metric: the attention keys ``[B, H, N, D]`` (averaged over heads, L2-normalised).
        size: tokens per current token ``[B, N]`` (None: from ``valid`` or ones).
        valid: ``[B, N]`` bool (or ``[B, 1, 1, N]``) real tokens, read when ``size`` is None.
        source: original position -> current token ``[B, S0]`` (None: the identity).
        attrs: the merge's attributes.

    Returns:
        ``(x', size', source')``: the tokens left, in their order before the merge.
    """
    batch, n, channels = x.shape
    size = _start(x, size, valid)
    r = merge_count(n, attrs)
    local = torch.arange(n, device=x.device).expand(batch, n)
    if r == 0:
        return x, size, _compose(local, source)
    best, partner = _match(metric.mean(dim=1), size > 0, attrs.protect, pad_pairs=True)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    n_a, n_b = (n + 1) // 2, n // 2
    kept = n_a - r
    x_a, x_b = x[:, ::2], x[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    dst = partner.gather(1, merged_a)
    src_size = size_a.gather(1, merged_a)
    src_x = x_a.gather(1, merged_a[..., None].expand(batch, r, channels))
    total = size_b.scatter_add(1, dst, src_size)
    weighted = (x_b * size_b[..., None]).scatter_add(
        1, dst[..., None].expand(batch, r, channels), src_x * src_size[..., None]
    )
    x_b = weighted / total.clamp(min=1e-12)[..., None]
    # the tokens left, in their order before the merge (the protected prefix stays in front and
    # padding at the end, where the next merge's alternating split pairs it up again)
    arange_b = torch.arange(n_b, device=x.device).expand(batch, n_b)
    order = torch.cat([2 * kept_a, 2 * arange_b + 1], dim=1).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=x.device).expand_as(order)
    )
    x_a = x_a.gather(1, kept_a[..., None].expand(batch, kept, channels))
    joined = torch.cat([x_a, x_b.to(x.dtype)], dim=1)
    out = joined.gather(1, order[..., None].expand(*order.shape, channels))
    new_size = torch.cat([size_a.gather(1, kept_a), total], dim=1).gather(1, order)
    # this merge's map: a kept A token -> its slot, a merged one -> its partner's, B -> its own
    map_a = torch.empty(batch, n_a, dtype=torch.long, device=x.device)
    map_a.scatter_(1, kept_a, torch.arange(kept, device=x.device).expand(batch, kept))
    map_a.scatter_(1, merged_a, kept + dst)
    local = torch.empty(batch, n, dtype=torch.long, device=x.device)
    local[:, ::2], local[:, 1::2] = map_a, kept + arange_b
    return out, new_size, _compose(rank.gather(1, local), source)


def prune_count(n: int, attrs: TokenPruneAttrs) -> int:
    """Unprotected tokens ``token_prune`` keeps of ``n``: ``ceil(keep * (n - protect))``."""
    candidates = max(0, n - attrs.protect)
    return min(candidates, max(1, math.ceil(attrs.keep * candidates - 1e-9)))


def _received(
    q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, scale: float, rank: str
) -> torch.Tensor:
    """Attention each key gets, averaged over heads: from query 0 (``cls``) or summed over every
    real query (``received``), ``[B, N]``; computed in chunks of queries (the fused attention
    never materialises probabilities)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    bias = torch.zeros(real.shape, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill(~real, -math.inf)[:, None, None, :]
    if rank == "cls":
        rows = q[:, :, :1].float()
        probs = torch.softmax(rows @ k.float().transpose(-1, -2) * scale + bias, dim=-1)
        return probs.mean(dim=1)[:, 0]
    total = torch.zeros(real.shape, dtype=torch.float32, device=q.device)
    chunk = 256
    for start in range(0, q.shape[2], chunk):
        rows = q[:, :, start : start + chunk].float()
        probs = torch.softmax(rows @ k.float().transpose(-1, -2) * scale + bias, dim=-1)
        weight = real[:, None, start : start + chunk, None].to(probs.dtype)
        total += (probs * weight).sum(dim=2).mean(dim=1)
    return total


def prune_tokens(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    size: torch.Tensor | None,
    valid: torch.Tensor | None,
    source: torch.Tensor | None,
    attrs: TokenPruneAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EViT's inattentive-token removal: keep the most attended tokens, fuse the rest.

    Args:
        x: token-wise states ``[B, N, C]``.
        q: the attention's queries ``[B, H, N, D]``.
        k: the attention's keys ``[B, Hkv, N, D]``.
        size: tokens per current token ``[B, N]`` (None: from ``valid`` or ones).
        valid: ``[B, N]`` bool (or ``[B, 1, 1, N]``) real tokens, read when ``size`` is None.
        source: original position -> current token ``[B, S0]`` (None: the identity).
        attrs: the pruning's attributes.

    Returns:
        ``(x', size', source')``: the protected prefix, the kept tokens in their original order,
        then (with ``fuse``) one token: the pruned tokens' mean weighted by their attention.
    """
    batch, n, channels = x.shape
    size = _start(x, size, valid)
    protect = min(attrs.protect, n)
    keep = prune_count(n, attrs)
    local = torch.arange(n, device=x.device).expand(batch, n)
    if keep >= n - protect:
        return x, size, _compose(local, source)
    real = size > 0
    attention = _received(q, k, real, attrs.scale, attrs.rank)
    ranking = torch.where(real, attention, torch.full_like(attention, -1.0))[:, protect:]
    order = ranking.argsort(dim=-1, descending=True, stable=True)
    kept = order[:, :keep].sort(dim=-1).values + protect
    pruned = order[:, keep:] + protect
    head = x[:, :protect]
    body = x.gather(1, kept[..., None].expand(batch, keep, channels))
    parts, sizes = [head, body], [size[:, :protect], size.gather(1, kept)]
    local = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    local[:, :protect] = torch.arange(protect, device=x.device)
    local.scatter_(1, kept, protect + torch.arange(keep, device=x.device).expand(batch, keep))
    if attrs.fuse:
        weight = attention.gather(1, pruned) * real.gather(1, pruned)
        rest = x.gather(1, pruned[..., None].expand(batch, pruned.shape[1], channels))
        fused = (rest.float() * weight[..., None]).sum(dim=1, keepdim=True)
        fused = fused / weight.sum(dim=1).clamp(min=1e-12)[:, None, None]
        parts.append(fused.to(x.dtype))
        sizes.append(size.gather(1, pruned).sum(dim=1, keepdim=True))
        local.scatter_(1, pruned, protect + keep)
    return torch.cat(parts, dim=1), torch.cat(sizes, dim=1), _compose(local, source)


class _Rows:
    """Packed tokens ``[T, ...]`` of rows given by ``segments`` (each row contiguous, in order)
    seen as a right-padded ``[B, L, ...]`` batch of rows, and back."""

    def __init__(self, segments: torch.Tensor) -> None:
        seg = segments.reshape(-1).long()
        counts = torch.bincount(seg)
        starts = counts.cumsum(0) - counts
        self.tokens = seg.shape[0]
        self.counts = counts
        self.batch = counts.shape[0]
        self.width = int(counts.max()) if self.tokens else 0
        self.slot = seg * self.width + (torch.arange(self.tokens, device=seg.device) - starts[seg])

    def view(self, x: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """``[T, *rest]`` -> ``[B, L, *rest]`` with ``fill`` in the padding."""
        out = x.new_full((self.batch * self.width, *x.shape[1:]), fill)
        out[self.slot] = x
        return out.view(self.batch, self.width, *x.shape[1:])

    def real(self) -> torch.Tensor:
        """``[B, L]`` bool: the slots that hold a token."""
        slots = torch.arange(self.width, device=self.counts.device)
        return slots[None, :] < self.counts[:, None]


def _pack_rows(
    keep: torch.Tensor, values: list[torch.Tensor], target: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The kept slots (``keep [B, W]``) of each ``[B, W, *rest]`` in ``values`` packed in order;
    their rows as ``[1, T']`` segments; and for each input token (``target``: the slot it ended
    up in) its packed index (-1: a slot that was not kept)."""
    flat = keep.reshape(-1)
    chosen = flat.nonzero().squeeze(1)
    width = keep.shape[1]
    packed = [v.reshape(-1, *v.shape[2:])[chosen] for v in values]
    index = flat.long().cumsum(0) - 1
    local = torch.where(flat[target], index[target], torch.full_like(target, -1))
    return packed, torch.div(chosen, width, rounding_mode="floor").unsqueeze(0), local


def merge_packed(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor | None,
    source: torch.Tensor | None,
    segments: torch.Tensor,
    attrs: TokenMergeAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe on packed tokens (padding removed): each row merges its own share of its tokens.

    Args:
        x: packed token states ``[T, C]``.
        metric: the attention keys ``[1, H, T, D]``.
        size: tokens per current token ``[T]`` (None: ones).
        source: original packed position -> current token ``[T0]`` (None: the identity).
        segments: the row of each token ``[1, T]`` (rows contiguous and in order).
        attrs: ``r`` tokens per row (capped at the row's mergeable half) or ``keep`` of each
            row's tokens.

    Returns:
        ``(x', size', source', segments')``: the tokens left, in their order.
    """
    tokens, channels = x.shape
    size = x.new_ones(tokens, dtype=torch.float32) if size is None else size
    local = torch.arange(tokens, device=x.device)
    if tokens == 0 or (attrs.r == 0 or (attrs.r is None and (attrs.keep or 1.0) >= 1.0)):
        return x, size, _compose(local, source), segments
    rows = _Rows(segments)
    real = rows.real()
    counts = rows.counts
    mergeable = ((counts + 1) // 2 - (attrs.protect + 1) // 2).clamp(min=0)
    if attrs.r is not None:
        wanted = torch.full_like(counts, attrs.r)
    else:
        wanted = counts - torch.ceil(counts.double() * attrs.keep - 1e-9).long()
    wanted = torch.minimum(wanted, mergeable).clamp(min=0)
    keys = rows.view(metric[0].float().mean(dim=0))
    best, partner = _match(keys, real, attrs.protect, pad_pairs=False)
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=x.device).expand_as(order)
    )
    merged = (rank < wanted[:, None]) & torch.isfinite(best)
    xv, sv = rows.view(x), rows.view(size)
    x_a, x_b, s_a, s_b = xv[:, ::2], xv[:, 1::2], sv[:, ::2], sv[:, 1::2]
    weight = s_a * merged
    total = s_b.scatter_add(1, partner, weight)
    summed = (x_b.float() * s_b[..., None]).scatter_add(
        1, partner[..., None].expand(*partner.shape, channels), x_a.float() * weight[..., None]
    )
    xv = xv.clone()
    sv = sv.clone()
    xv[:, 1::2] = (summed / total.clamp(min=1e-12)[..., None]).to(x.dtype)
    sv[:, 1::2] = total
    keep = real.clone()
    keep[:, ::2] &= ~merged
    width = rows.width
    row = torch.div(rows.slot, width, rounding_mode="floor")
    position = rows.slot - row * width
    a_index = torch.div(position, 2, rounding_mode="floor")
    is_merged = (position % 2 == 0) & merged[row, a_index.clamp(max=merged.shape[1] - 1)]
    target = torch.where(
        is_merged,
        row * width + 2 * partner[row, a_index.clamp(max=partner.shape[1] - 1)] + 1,
        rows.slot,
    )
    (x_new, s_new), new_segments, local = _pack_rows(keep, [xv, sv], target)
    return x_new, s_new, _compose(local, source), new_segments


def prune_packed(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    size: torch.Tensor | None,
    source: torch.Tensor | None,
    segments: torch.Tensor,
    attrs: TokenPruneAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EViT on packed tokens (padding removed): each row keeps ``keep`` of its own tokens.

    Args:
        x: packed token states ``[T, C]``.
        q: the attention's queries ``[1, H, T, D]``.
        k: the attention's keys ``[1, Hkv, T, D]``.
        size: tokens per current token ``[T]`` (None: ones).
        source: original packed position -> current token ``[T0]`` (None: the identity).
        segments: the row of each token ``[1, T]`` (rows contiguous and in order).
        attrs: the pruning's attributes.

    Returns:
        ``(x', size', source', segments')``: per row the protected prefix, the kept tokens in
        their order, then (with ``fuse``, when a row pruned any) the fused token.
    """
    tokens, channels = x.shape
    size = x.new_ones(tokens, dtype=torch.float32) if size is None else size
    local = torch.arange(tokens, device=x.device)
    if tokens == 0 or attrs.keep >= 1.0:
        return x, size, _compose(local, source), segments
    rows = _Rows(segments)
    real = rows.real()
    qv = rows.view(q[0].transpose(0, 1)).transpose(1, 2)  # [B, H, L, D]
    kv = rows.view(k[0].transpose(0, 1)).transpose(1, 2)
    attention = _received(qv, kv, real, attrs.scale, attrs.rank)
    protect = attrs.protect
    candidates = (rows.counts - protect).clamp(min=0)
    kept = torch.ceil(candidates.double() * attrs.keep - 1e-9).long().clamp(min=1)
    kept = torch.minimum(kept, candidates)
    ranking = attention.masked_fill(~real, -1.0)
    ranking[:, :protect] = math.inf
    order = ranking.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=x.device).expand_as(order)
    )
    keep = (rank < (protect + kept)[:, None]) & real
    pruned = real & ~keep
    xv, sv = rows.view(x), rows.view(size)
    extra = pruned.any(dim=1) & attrs.fuse
    weight = attention * pruned
    fused = (xv.float() * weight[..., None]).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-12)[
        :, None
    ]
    xv = torch.cat([xv, fused.to(x.dtype)[:, None]], dim=1)
    sv = torch.cat([sv, (sv * pruned).sum(dim=1, keepdim=True)], dim=1)
    keep = torch.cat([keep, extra[:, None]], dim=1)
    width = rows.width
    row = torch.div(rows.slot, width, rounding_mode="floor")
    slot = rows.slot + row  # the same slot in rows one wider
    gone = pruned.reshape(-1)[rows.slot]
    fused_slot = row * (width + 1) + width
    target = torch.where(gone, fused_slot if attrs.fuse else slot, slot)
    (x_new, s_new), new_segments, local = _pack_rows(keep, [xv, sv], target)
    if not attrs.fuse:
        local = torch.where(gone, torch.full_like(local, -1), local)
    return x_new, s_new, _compose(local, source), new_segments


def unmerge_tokens(
    x: torch.Tensor, source: torch.Tensor, axis: int = 1, batch: int | None = 0
) -> torch.Tensor:
    """Every original position gets the vector of the token it ended up in (zeros if dropped).

    Args:
        x: reduced values with the token axis at ``axis`` (``[B, N', ...]`` or ``[B, H, N', ...]``).
        source: original position -> current token, ``[B, S0]`` (``[T0]`` for packed tokens).
        axis: the token axis of ``x``.
        batch: the batch axis of ``x`` (None: packed tokens, no batch axis).

    Returns:
        ``x`` with ``S0`` tokens at ``axis``.
    """
    original = source.shape[-1]
    shape = [1] * x.dim()
    if batch is None:
        shape[axis] = source.shape[-1]
    else:
        shape[batch], shape[axis] = source.shape
        if batch > axis:  # [S0, B] order in x
            source = source.t()
    index = source.clamp(min=0).reshape(shape)
    expanded = list(x.shape)
    expanded[axis] = original
    out = x.gather(axis, index.expand(expanded))
    if bool((source < 0).any()):
        out = out.masked_fill((source < 0).reshape(shape), 0)
    return out


def reduced_tokens(n: int, attrs: TokenMergeAttrs | TokenPruneAttrs) -> int:
    """Tokens left after the reduction ``attrs`` describes, from ``n``.

    Args:
        n: tokens going in.
        attrs: a ``token_merge`` or ``token_prune`` op's attributes.

    Returns:
        The number of tokens coming out (the same for every row of a batch).
    """
    if isinstance(attrs, TokenMergeAttrs):
        return n - merge_count(n, attrs)
    protect = min(attrs.protect, n)
    kept = prune_count(n, attrs)
    if kept >= n - protect:
        return n
    return protect + kept + (1 if attrs.fuse else 0)


def _reduced_types(
    x: TensorType, source: TensorType | None, attrs: TokenMergeAttrs | TokenPruneAttrs
) -> list[Type]:
    original = source.shape[1] if source is not None else x.shape[1]
    n = x.shape[1]
    tokens = reduced_tokens(n, attrs) if isinstance(n, int) else attrs.symbol
    return [
        TensorType((x.shape[0], tokens, *x.shape[2:]), x.dtype),
        TensorType((x.shape[0], tokens), torch.float32),
        TensorType((x.shape[0], original), torch.int64),
    ]


def _merge_infer(types: list[Type | None], attrs: TokenMergeAttrs) -> list[Type]:
    x, source = types[0], types[4]
    assert isinstance(x, TensorType)
    return _reduced_types(x, source if isinstance(source, TensorType) else None, attrs)


def _prune_infer(types: list[Type | None], attrs: TokenPruneAttrs) -> list[Type]:
    x, source = types[0], types[5]
    assert isinstance(x, TensorType)
    return _reduced_types(x, source if isinstance(source, TensorType) else None, attrs)


def _unmerge_infer(types: list[Type | None], attrs: UnmergeAttrs) -> list[Type]:
    x, source = types[0], types[1]
    assert isinstance(x, TensorType) and isinstance(source, TensorType)
    shape = list(x.shape)
    shape[attrs.axis] = source.shape[-1]
    return [TensorType(tuple(shape), x.dtype)]


def _packed_types(x: TensorType, source: TensorType | None, symbol: str) -> list[Type]:
    original = source.shape[0] if source is not None else x.shape[0]
    return [
        TensorType((symbol, *x.shape[1:]), x.dtype),
        TensorType((symbol,), torch.float32),
        TensorType((original,), torch.int64),
        TensorType((1, symbol), torch.int64),
    ]


def _merge_packed_infer(types: list[Type | None], attrs: TokenMergeAttrs) -> list[Type]:
    x, source = types[0], types[3]
    assert isinstance(x, TensorType)
    return _packed_types(x, source if isinstance(source, TensorType) else None, attrs.symbol)


def _prune_packed_infer(types: list[Type | None], attrs: TokenPruneAttrs) -> list[Type]:
    x, source = types[0], types[4]
    assert isinstance(x, TensorType)
    return _packed_types(x, source if isinstance(source, TensorType) else None, attrs.symbol)


def _check_merge(node: Any) -> str | None:
    attrs = node.attrs
    if attrs.r is None and attrs.keep is None:
        return "token_merge needs r or keep"
    if attrs.keep is not None and not 0.0 < attrs.keep <= 1.0:
        return f"token_merge keep={attrs.keep} must be in (0, 1]"
    return None


def _calling(fn: Any) -> Any:
    """An op implementation that calls ``fn(*inputs, attrs)``."""
    return lambda inputs, attrs: fn(*inputs, attrs)


for _name, _attrs, _fn, _outputs, _infer, _verify in (
    ("token_merge", TokenMergeAttrs, merge_tokens, 3, _merge_infer, _check_merge),
    ("token_prune", TokenPruneAttrs, prune_tokens, 3, _prune_infer, None),
    ("token_merge_packed", TokenMergeAttrs, merge_packed, 4, _merge_packed_infer, _check_merge),
    ("token_prune_packed", TokenPruneAttrs, prune_packed, 4, _prune_packed_infer, None),
):
    register_op(
        OpDef(
            _name,
            _attrs,
            _calling(_fn),
            num_outputs=_outputs,
            infer=_infer,
            verify=_verify,
        )
    )
register_op(
    OpDef(
        "token_unmerge",
        UnmergeAttrs,
        lambda inputs, attrs: unmerge_tokens(inputs[0], inputs[1], attrs.axis, attrs.batch),
        infer=_unmerge_infer,
    )
)


@dataclass(frozen=True)
class SiteTapAttrs:
    """``site_tap(out, source?, indices?, valid?)``: the attention site whose output, on merged
    tokens (``source``) and/or packed tokens (``indices``, ``valid`` of ``token_index``), is
    restored to the model's ``[B, H, S, D]`` for validation.

    Attributes:
        site: the site index.
        axis: the token axis of ``out``.
        batch: its batch axis (None: packed tokens).
    """

    site: int = -1
    axis: int = 2
    batch: int | None = 0


def restore_site_output(
    out: torch.Tensor,
    source: torch.Tensor | None,
    indices: torch.Tensor | None,
    valid: torch.Tensor | None,
    attrs: SiteTapAttrs,
) -> torch.Tensor:
    """A site's output on merged and/or packed tokens as the model's ``[B, H, S, D]`` (merged
    tokens copied back to their positions, zeros at padded ones).

    Args:
        out: the site's output (``[B, H, N', D]``, or ``[1, H, T', D]`` on packed tokens).
        source: original position -> merged token (None: not merged).
        indices: the flat positions of the packed tokens (None: not packed).
        valid: the ``[B, S]`` real-token mask the tokens were packed with.
        attrs: the tap's attributes.

    Returns:
        The output in the model's layout.
    """
    if source is not None:
        out = unmerge_tokens(out, source, attrs.axis, attrs.batch)
    if indices is not None and valid is not None:
        from attnopt.ir.tokens import unpack_tokens

        tokens = out[0].transpose(0, 1)  # [T, H, D]
        out = unpack_tokens(tokens, indices, valid).transpose(1, 2)
    return out


def _site_tap_impl(inputs: list[Any], attrs: SiteTapAttrs) -> None:
    """Nothing: the runtime's ``K.site_tap`` records the restored output when validating."""
    return None


register_op(
    OpDef(
        "site_tap",
        SiteTapAttrs,
        _site_tap_impl,
        num_outputs=0,
        infer=lambda types, attrs: [],
        emit=lambda n, a: f"K.site_tap([{', '.join(n)}], {{attrs}})",
        pure=False,
    )
)
