"""Exact variable-length ("varlen") attention on the CPU: packed documents and padding removal.

Entry points: :func:`varlen_attention` (runs of a packed ``[H, N, D]`` sequence, each attending
only to itself), :func:`document_attention_cpu` (the ``[B, H, S, D]`` layout with a segment id per
token: the block-diagonal "document mask"), :func:`segment_offsets` (segment ids to run
boundaries) and :func:`pack_offsets` (a padded batch's valid tokens to a packed index and run
boundaries).

Work is saved by never forming the ``N x N`` mask: each run is an independent self-attention, so
the kernel calls SDPA's CPU flash kernel on the runs alone. Runs of one length are batched into
one call (``[m, H, L, D]``): a pure strided view when the runs lie back to back in one row (packed
documents of equal length), one index gather otherwise. Runs of close lengths share one call too
(:class:`RunBuckets`), gathered right-padded to the longest with a key mask on the padding: each
SDPA call has a fixed cost that many small calls pay many times over, most on a busy machine.
Outside the runs nothing is computed, so the cost is ``sum(L_r ** 2)`` instead of ``N ** 2``
(at most a bucket's padding more).

Invariants:

- every token belongs to exactly one run (``offsets[0] == 0``, ``offsets[-1] == N``, runs in
  order), so the output is written everywhere and needs no initialisation;
- ``causal`` is the bottom-right aligned rule of each run; runs are square (self-attention), so it
  is the plain lower triangle of the run; in a padded bucket, the lower triangle of the padded
  square hides every padded key from every real query, and padded query rows are discarded;
- rows whose every key is masked come out as SDPA's flash kernel (and so
  :func:`~attnopt.runtime.cpu.dense.dense_attention_cpu`) gives them: zeros for bool or ``-inf``
  masks, the uniform average of the run's values for a finite fill such as ``finfo.min``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnopt.ir.attention_reference import mask_is_inert, mask_to_4d
from attnopt.runtime.cpu.common import SMALL_TENSOR, bookkeeping_threads, check_qkv
from attnopt.runtime.cpu.dense import dense_attention_cpu

__all__ = [
    "DEFAULT_BUCKETS",
    "RunBuckets",
    "document_attention_cpu",
    "pack_offsets",
    "segment_offsets",
    "varlen_attention",
]

#: One run: (batch row, first token, length).
Run = tuple[int, int, int]


@dataclass(frozen=True)
class RunBuckets:
    """Which runs of different lengths share one SDPA call, padded to the bucket's longest run.

    Every SDPA call has a fixed cost (on a busy machine, mostly waiting for its slowest OpenMP
    thread), so 32 runs of 32 lengths are far slower as 32 calls than as a few padded ones. Run
    lengths are taken longest first; a length joins the current bucket while the bucket's longest
    run is at most ``max_ratio`` times it and the bucket's padded tokens exceed its real ones by
    at most ``max_waste``. Runs shorter than ``min_length`` count as ``min_length`` long in both
    rules: their cost is mostly the call's, so short runs of any lengths share one call.

    Attributes:
        max_ratio: largest longest/shortest length ratio in a bucket (>= 1).
        max_waste: largest padded/real token excess in a bucket, as a fraction (>= 0).
        min_length: the length below which runs count as this long (>= 1).
    """

    max_ratio: float = 1.25
    max_waste: float = 0.2
    min_length: int = 64

    def __post_init__(self) -> None:
        if self.max_ratio < 1 or self.max_waste < 0 or self.min_length < 1:
            raise ValueError(
                f"RunBuckets needs max_ratio >= 1, max_waste >= 0 and min_length >= 1, got {self}"
            )

    def plan(self, counts: dict[int, int]) -> list[list[int]]:
        """Group run lengths into buckets.

        Args:
            counts: run length -> number of runs of that length (lengths > 0).

        Returns:
            The buckets, each a list of lengths, longest first; every length in exactly one.
        """
        buckets: list[list[int]] = []
        padded_to = count = real = 0  # of the current bucket, lengths raised to min_length
        for length in sorted(counts, reverse=True):
            cost = max(length, self.min_length)
            joined = count + counts[length], real + counts[length] * cost
            if (
                buckets
                and padded_to <= self.max_ratio * cost
                and joined[0] * padded_to <= (1 + self.max_waste) * joined[1]
            ):
                buckets[-1].append(length)
                count, real = joined
            else:
                buckets.append([length])
                padded_to, count, real = cost, counts[length], counts[length] * cost
        return buckets


#: The bucketing of :func:`varlen_attention` and :func:`document_attention_cpu` by default.
DEFAULT_BUCKETS = RunBuckets()


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    buckets: RunBuckets | None = DEFAULT_BUCKETS,
) -> torch.Tensor:
    """Exact attention within each run of a packed sequence (block-diagonal, without the mask).

    Args:
        q: ``[Hq, N, D]``.
        k: ``[Hkv, N, D]`` (``Hq`` a multiple of ``Hkv``: grouped-query heads share k and v).
        v: ``[Hkv, N, Dv]``.
        offsets: integer ``[R + 1]`` run boundaries: ``offsets[0] == 0``, ``offsets[-1] == N``,
            non-decreasing (empty runs are allowed). Query rows of run ``r`` see only the keys of
            run ``r``.
        scale: score scale.
        causal: the causal rule within each run (lower triangular: runs are self-attention).
        key_mask: optional per-key mask ``[N]``, bool (True = attend) or additive float.
        buckets: how runs of different lengths share SDPA calls; None for one call per length.

    Returns:
        ``[Hq, N, Dv]`` in q's dtype.

    Raises:
        ValueError: on malformed shapes or offsets.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention takes q, k, v as [H, N, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    tokens = q.shape[1]
    if k.shape[1] != tokens:
        raise ValueError(f"q has {tokens} tokens but k and v have {k.shape[1]}")
    bounds = _check_offsets(offsets, tokens)
    runs = [(0, start, stop - start) for start, stop in zip(bounds, bounds[1:])]
    if key_mask is not None:
        if key_mask.shape != (tokens,):
            raise ValueError(f"key_mask must be [N] = [{tokens}], got {tuple(key_mask.shape)}")
        key_mask = key_mask.unsqueeze(0)
    out = q.new_empty(1, q.shape[0], tokens, v.shape[-1])
    _attend_runs(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), out, runs, key_mask, scale, causal, buckets
    )
    return out[0]


def _check_offsets(offsets: torch.Tensor, tokens: int) -> list[int]:
    """Validate run boundaries over ``tokens`` tokens.

    Args:
        offsets: integer 1-D ``[R + 1]`` tensor.
        tokens: ``N``, the number of packed tokens.

    Returns:
        The boundaries as a Python list.

    Raises:
        ValueError: when ``offsets`` is not 1-D integer, does not start at 0, does not end at
            ``N`` or decreases somewhere.
    """
    if offsets.dim() != 1 or offsets.dtype.is_floating_point or offsets.dtype.is_complex:
        raise ValueError(
            f"offsets must be a 1-D integer tensor, got {offsets.dtype} {tuple(offsets.shape)}"
        )
    bounds = [int(b) for b in offsets.tolist()]
    if not bounds:
        raise ValueError("offsets must hold at least one boundary (offsets[0] == 0)")
    if bounds[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {bounds[0]}")
    if bounds[-1] != tokens:
        raise ValueError(
            f"offsets[-1] must equal the number of tokens N={tokens}, got {bounds[-1]}"
        )
    drops = [i for i in range(1, len(bounds)) if bounds[i] < bounds[i - 1]]
    if drops:
        i = drops[0]
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{i}]={bounds[i]} < "
            f"offsets[{i - 1}]={bounds[i - 1]}"
        )
    return bounds


def segment_offsets(segments: torch.Tensor) -> torch.Tensor | None:
    """Run boundaries of one row of segment ids, when every segment is one contiguous run.

    Args:
        segments: integer ``[S]`` segment ids (any values; equal ids = same segment).

    Returns:
        int64 ``[R + 1]`` boundaries of the ``R`` runs, or None when some id reappears after a
        different one (the segment is not contiguous: the caller needs a dense mask).

    Raises:
        ValueError: when ``segments`` is not a 1-D integer tensor.
    """
    if segments.dim() != 1 or segments.dtype.is_floating_point or segments.dtype.is_complex:
        raise ValueError(
            f"segments must be a 1-D integer tensor, got {segments.dtype} {tuple(segments.shape)}"
        )
    length = segments.shape[0]
    segments = segments.cpu()
    if length == 0:
        return torch.zeros(1, dtype=torch.long)
    changes = torch.nonzero(segments[1:] != segments[:-1]).squeeze(1) + 1
    starts = torch.cat([changes.new_zeros(1), changes])
    if torch.unique(segments[starts]).numel() != starts.numel():
        return None
    return torch.cat([starts, starts.new_full((1,), length)])


def pack_offsets(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding removal: where a padded batch's real tokens go in a packed ``[N, ...]`` tensor.

    Each row's valid tokens form one run, in their order (they need not be contiguous: right,
    left or any padding pattern). ``x.flatten(0, 1)[indices]`` packs a ``[B, S, ...]`` tensor;
    ``out.new_zeros(B * S, ...).index_copy_(0, indices, packed)`` unpacks a result.

    Args:
        valid: bool ``[B, S]``, True for a real token.

    Returns:
        ``(indices, offsets)``: int64 ``[N]`` positions of the real tokens in the flattened
        ``B * S`` order, and int64 ``[B + 1]`` run boundaries (row ``b`` is run ``b``, possibly
        empty).

    Raises:
        ValueError: when ``valid`` is not a 2-D bool tensor.
    """
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a [B, S] bool tensor, got {valid.dtype} {tuple(valid.shape)}"
        )
    indices = torch.nonzero(valid.reshape(-1)).squeeze(1)
    counts = valid.sum(dim=1)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])
    return indices, offsets


def document_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    buckets: RunBuckets | None = DEFAULT_BUCKETS,
) -> torch.Tensor:
    """Exact attention under a document mask: query ``i`` sees key ``j`` iff their segments match.

    Rows whose segments are contiguous runs go through the varlen kernel (all such rows batched
    together, runs of close lengths in one call); the others fall back to
    :func:`~attnopt.runtime.cpu.dense.dense_attention_cpu` with the explicit mask
    ``segments[b, :, None] == segments[b, None, :]``.

    Args:
        q: ``[B, Hq, S, D]``.
        k: ``[B, Hkv, S, D]``.
        v: ``[B, Hkv, S, Dv]``.
        segments: integer ``[B, S]`` segment ids (a ``[1, S]`` row is shared by the batch).
        scale: score scale.
        causal: the causal rule (within each document, since other documents are hidden).
        mask: optional key padding mask broadcastable to ``[B, 1, 1, S]``, bool (True = attend)
            or additive float.
        buckets: how runs of different lengths share SDPA calls; None for one call per length.

    Returns:
        ``[B, Hq, S, Dv]`` in q's dtype.

    Raises:
        ValueError: on malformed shapes.
    """
    check_qkv(q, k, v)
    batch, _, seq, _ = q.shape
    if k.shape[2] != seq:
        raise ValueError(
            f"document attention is self-attention: q has {seq} tokens, k {k.shape[2]}"
        )
    if segments.dim() != 2 or segments.shape[1] != seq or segments.shape[0] not in (1, batch):
        raise ValueError(f"segments must be [B, S] = [{batch}, {seq}], got {tuple(segments.shape)}")
    segments = segments.expand(batch, seq)
    key_mask = _key_mask_rows(mask, batch, seq, q.dtype)
    runs: list[Run] = []
    dense_rows: list[int] = []
    for row in range(batch):
        bounds = segment_offsets(segments[row])
        if bounds is None:
            dense_rows.append(row)
            continue
        edges = bounds.tolist()
        runs += [(row, start, stop - start) for start, stop in zip(edges, edges[1:])]
    out = q.new_empty(batch, q.shape[1], seq, v.shape[-1])
    _attend_runs(q, k, v, out, runs, key_mask, scale, causal, buckets)
    if dense_rows:
        rows = torch.tensor(dense_rows, device=q.device)
        same = segments[rows][:, None, :, None] == segments[rows][:, None, None, :]
        dense_mask = same if key_mask is None else _and_masks(same, key_mask[rows][:, None, None])
        out[rows] = dense_attention_cpu(
            q[rows], k[rows], v[rows], mask=dense_mask, scale=scale, causal=causal
        )
    return out


def _key_mask_rows(
    mask: torch.Tensor | None, batch: int, seq: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """A key padding mask as ``[B, S]`` (a broadcast view), additive masks in ``dtype``."""
    if mask is None:
        return None
    mask4 = mask_to_4d(mask, "mask")
    if mask4.shape[1] != 1 or mask4.shape[2] != 1:
        raise ValueError(f"mask must be a key padding mask [B, 1, 1, S], got {tuple(mask.shape)}")
    try:
        rows = mask4[:, 0, 0].expand(batch, seq)
    except RuntimeError as err:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not broadcast to [B, 1, 1, S] = [{batch}, 1, 1, {seq}]"
        ) from err
    if rows.dtype != torch.bool and rows.dtype != dtype:
        rows = rows.to(dtype)
    return rows


def _and_masks(allowed: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """``allowed`` (bool) and a bool or additive ``user`` mask as one mask for SDPA."""
    if user.dtype == torch.bool:
        return allowed & user
    shape = torch.broadcast_shapes(allowed.shape, user.shape)
    return user.expand(shape).masked_fill(~allowed, float("-inf"))


def _attend_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    runs: list[Run],
    key_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    buckets: RunBuckets | None,
) -> None:
    """Write the self-attention of every run into ``out``, one SDPA call per bucket of runs.

    ``q``, ``k``, ``v`` and ``out`` are ``[B, H, S, *]``; ``key_mask`` is ``[B, S]`` or None.
    """
    gqa = q.shape[1] != k.shape[1]
    for members in _group_runs(runs, buckets):
        place = _Placement(members, q.device)
        # gathers and the copy back are small memory-bound ops: on a busy machine waking every
        # OpenMP thread for each costs more than the copy (see bookkeeping_threads)
        small = place.count * place.length * q.shape[1] * q.shape[-1] < SMALL_TENSOR
        with bookkeeping_threads() if small else contextlib.nullcontext():
            q_runs, k_runs, v_runs = place.read(q), place.read(k), place.read(v)
            bucket_mask = None if key_mask is None else place.read(key_mask)
            attn_mask = _bucket_mask(bucket_mask, place.keep, place.length, causal)
        result = F.scaled_dot_product_attention(
            q_runs,
            k_runs,
            v_runs,
            attn_mask=attn_mask,
            is_causal=causal and attn_mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        with bookkeeping_threads() if small else contextlib.nullcontext():
            place.write(out, result)


def _group_runs(runs: list[Run], buckets: RunBuckets | None) -> list[list[Run]]:
    """The non-empty runs in SDPA calls: one per length, then lengths merged by ``buckets``."""
    by_length: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        if run[2] > 0:
            by_length[run[2]].append(run)
    if buckets is None:
        return list(by_length.values())
    groups = [
        [run for length in bucket for run in by_length[length]]
        for bucket in buckets.plan({length: len(group) for length, group in by_length.items()})
    ]
    return groups


def _bucket_mask(
    key_mask: torch.Tensor | None, keep: torch.Tensor | None, length: int, causal: bool
) -> torch.Tensor | None:
    """The SDPA mask of one bucket (None when ``is_causal`` or nothing is needed).

    Args:
        key_mask: the bucket's gathered ``[m, L]`` key mask, or None.
        keep: bool ``[m, L]``, False at the padding of runs shorter than ``L``; None when every
            run is ``L`` long.
        length: ``L``.
        causal: the causal rule within each run.
    """
    if key_mask is not None and mask_is_inert(key_mask):
        key_mask = None
    if key_mask is None:
        # right-padded self-attention: every padded key lies after the diagonal of every real
        # query, so the plain causal rule already hides it
        if keep is None or causal:
            return None
        return keep[:, None, None, :]
    if keep is not None:
        key_mask = _and_masks(keep, key_mask)
    mask = key_mask[:, None, None, :]
    if causal:
        lower = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        mask = _and_masks(lower, mask)
    return mask


class _Placement:
    """Where the ``m`` runs of one bucket sit in a ``[B, H, S, *]`` tensor, and how to read
    them as ``[m, H, L, *]`` (``L`` the longest run) and write results back.

    Runs of one length: one run is a slice; runs back to back in one row are a strided view of
    that row (no copy). Otherwise the runs are gathered: with one ``index_select`` along the
    tokens when they share a row (packed sequences), one advanced-index gather otherwise, and
    written back the same way. Runs of different lengths are gathered right-padded to ``L`` (the
    padding repeats a run's last token, so it stays finite and in bounds) and ``keep`` marks their
    real tokens; only those are written back.
    """

    def __init__(self, members: list[Run], device: torch.device) -> None:
        lengths = [length for _, _, length in members]
        starts = [start for _, start, _ in members]
        self.length = length = max(lengths)
        self.count = len(members)
        self.row = members[0][0]
        self.first = min(starts)
        self.one_row = all(row == self.row for row, _, _ in members)
        self.keep: torch.Tensor | None = None
        uniform = min(lengths) == length
        self.contiguous = (
            uniform
            and self.one_row
            and sorted(starts) == list(range(self.first, self.first + length * self.count, length))
        )
        if self.contiguous:
            return
        span = torch.arange(length, device=device)
        run_lengths = torch.tensor(lengths, device=device)[:, None]
        self.rows = torch.tensor([row for row, _, _ in members], device=device)[:, None]
        offsets = span if uniform else torch.minimum(span, run_lengths - 1)
        self.positions = torch.tensor(starts, device=device)[:, None] + offsets
        if not uniform:
            self.keep = span < run_lengths
            self.real_rows = self.rows.expand(-1, length)[self.keep]
            self.real_positions = self.positions[self.keep]
            self.real_slots = torch.nonzero(self.keep.reshape(-1)).squeeze(1)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """``[m, H, L, *]`` of a ``[B, H, S, *]`` tensor, or ``[m, L]`` of a ``[B, S]`` one."""
        shape = (self.count, self.length)
        if self.contiguous:
            stop = self.first + self.length * self.count
            if t.dim() == 2:
                return t[self.row, self.first : stop].unflatten(0, shape)
            return t[self.row, :, self.first : stop].unflatten(1, shape).transpose(0, 1)
        if self.one_row:
            gathered = _select_tokens(t[self.row], self.positions.reshape(-1))
            if gathered is not None and t.dim() == 2:
                return gathered.unflatten(0, shape)
            if gathered is not None:
                return gathered.unflatten(1, shape).transpose(0, 1)
        if t.dim() == 2:
            return t[self.rows, self.positions]
        return t[self.rows, :, self.positions].transpose(1, 2)

    def write(self, out: torch.Tensor, result: torch.Tensor) -> None:
        """Store a ``[m, H, L, Dv]`` result into the runs' places of ``out``."""
        if self.contiguous:
            self.read(out).copy_(result)
        elif self.one_row:
            tokens = result.transpose(0, 1).flatten(1, 2)  # [H, m * L, Dv]
            if self.keep is None:
                out[self.row].index_copy_(1, self.positions.reshape(-1), tokens)
            else:
                real = tokens.index_select(1, self.real_slots)
                out[self.row].index_copy_(1, self.real_positions, real)
        elif self.keep is None:
            out[self.rows, :, self.positions] = result.transpose(1, 2)
        else:
            out[self.real_rows, :, self.real_positions] = result.transpose(1, 2)[self.keep]


def _select_tokens(row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """``row[..., positions, :]`` of an ``[H, S, D]`` row as ``[H, P, D]`` (or of an ``[S]`` row
    as ``[P]``) by one ``index_select``, which copies whole token rows where advanced indexing
    goes element by element; None when the row's layout would make index_select copy it first.
    """
    if row.dim() == 1:
        return row.index_select(0, positions)
    by_token = row.transpose(0, 1)
    if by_token.is_contiguous():  # token-major, as projections and packing leave q, k and v
        return by_token.index_select(0, positions).transpose(0, 1)
    if row.is_contiguous():
        return row.index_select(1, positions)
    return None
