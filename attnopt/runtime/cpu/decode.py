"""Decode attention on the CPU: a few queries against a long key/value cache (flash-decoding).

Entry points: :func:`decode_attention_cpu`, :func:`decode_applies`, :func:`decode_splits`.

In the decode phase of a generating decoder each step has ``Sq`` (1 to a few) queries and a cache of
``Sk`` keys: the work is a read of K and V, memory-bound. Three things make it fast here:

- GQA-aware: q ``[B, Hq, Sq, D]`` is viewed as ``[B, Hkv, G*Sq, D]`` (``G = Hq // Hkv``), so each
  key/value head is read once for its whole query group; K and V are never repeated per query head
  (Hugging Face's ``repeat_kv`` copies the whole cache ``G`` times every step).
- Split-K: when ``B * Hkv`` is too few work items for the threads, the cache length is cut into
  ``splits`` chunks that run as independent items of one fused flash call; each returns its
  normalised output and log-sum-exp, and the partial states are merged exactly (Lean Attention /
  flash-decoding, ../shared/METHODS.md).
- No copy of the cache: k and v may be strided views ``cache[:, :, :length]`` of a preallocated
  static cache; the fused kernel reads them in place (only the mask is ever materialised, and it is
  ``1/D`` the size of K).

The semantics are :func:`attnopt.runtime.cpu.dense.dense_attention_cpu`'s (and the reference's):
masks bool (True = attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``; bottom-right causal;
rows with no visible key give zeros; NaN in q/k/v propagates as in eager. Soft-capping and inputs
whose fast result is not finite run the exact grouped form (one matmul per K and V, the reference's
masking rules), still without repeating K/V.
"""

from __future__ import annotations

import math

import torch

from attnopt.ir.attention_reference import causal_mask, mask_is_inert, mask_to_4d
from attnopt.runtime.cpu.common import mask_empty_rows

__all__ = [
    "DECODE_KV_PER_QUERY",
    "DECODE_MAX_Q_LEN",
    "DECODE_MIN_KV_LEN",
    "MIN_SPLIT_KEYS",
    "decode_applies",
    "decode_attention_cpu",
    "decode_splits",
]

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Most queries per head a call may have to count as decode (speculative/chunked decoding).
DECODE_MAX_Q_LEN = 16
#: Fewest keys for the decode kernel to beat dense attention. Measured on 2 cores (D=64, min of
#: interleaved runs): at Sq=1 it is ahead from 128 keys (1.1x; 1.6-1.9x at 1024); at Sq=16 it
#: breaks even near 256 and is ahead from 512, hence also :data:`DECODE_KV_PER_QUERY`.
DECODE_MIN_KV_LEN = 256
#: Fewest keys per query for the decode kernel (16 queries: 512 keys).
DECODE_KV_PER_QUERY = 32
#: Fewest keys per split-K chunk: below it the merge costs more than the parallelism gains
#: (measured on 2 cores: one kv head at 4096 keys broke even in two splits, 8192 gained 1.4x).
MIN_SPLIT_KEYS = 2048
#: Masks up to this many elements are checked for hiding nothing (then dropped).
_INERT_CHECK_LIMIT = 1 << 16


def decode_applies(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
) -> bool:
    """Whether :func:`decode_attention_cpu` should run a call instead of dense attention.

    Decode shape (``1 <= Sq <= DECODE_MAX_Q_LEN`` queries, and at least ``DECODE_MIN_KV_LEN``
    and ``DECODE_KV_PER_QUERY * Sq`` keys), equal q/k and v head sizes, a dtype the fused CPU
    kernel takes, on the CPU.
    Soft-capped calls also qualify: dense attention runs them through the exact reference with
    K/V repeated per query head, the decode kernel without.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]`` (None: not checked).
        softcap: the call's soft-capping (any value qualifies).

    Returns:
        True when the decode kernel is the faster exact choice.
    """
    del softcap  # both paths serve it; the argument documents that it was considered
    if q.dim() != 4 or k.dim() != 4 or q.device.type != "cpu" or _FLASH_CPU is None:
        return False
    if q.dtype not in _FLASH_DTYPES or k.dtype != q.dtype:
        return False
    if v is not None and (v.dtype != q.dtype or v.shape[-1] != q.shape[-1]):
        return False
    q_len, kv_len = q.shape[2], k.shape[2]
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return False
    if not 1 <= q_len <= DECODE_MAX_Q_LEN:
        return False
    return kv_len >= max(DECODE_MIN_KV_LEN, DECODE_KV_PER_QUERY * q_len)


def decode_splits(work_items: int, kv_len: int, threads: int | None = None) -> int:
    """How many split-K chunks to cut the cache length into.

    The fused kernel runs one work item per (batch, kv head, split). Splitting pays only when
    ``B * Hkv`` leaves threads idle: measured on 2 cores, one kv head at 8192 keys ran 1.4x faster
    in two splits, while with at least one item per thread the merge only added time. Chunks keep
    at least :data:`MIN_SPLIT_KEYS` keys.

    Args:
        work_items: ``B * Hkv``.
        kv_len: ``Sk``.
        threads: intra-op threads (None: ``torch.get_num_threads()``).

    Returns:
        The split count, at least 1.
    """
    threads = torch.get_num_threads() if threads is None else threads
    if work_items >= threads:
        return 1
    wanted = -(-threads // max(work_items, 1))
    return max(1, min(wanted, kv_len // MIN_SPLIT_KEYS))


def decode_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float,
    causal: bool = False,
    softcap: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Exact attention for decode shapes: GQA-grouped, split-K over the cache, no K/V copies.

    Args:
        q: ``[B, Hq, Sq, D]`` (``Sq`` small).
        k: ``[B, Hkv, Sk, D]``, any strides with a contiguous last dim (a view of a static cache).
        v: ``[B, Hkv, Sk, D]``.
        mask: bool (True = attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale.
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping of the scaled scores (runs the exact grouped form).
        splits: split-K chunks (None: :func:`decode_splits`).

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    group = q_heads // kv_heads
    if q.numel() == 0 or kv_len == 0:  # nothing to compute (the fused kernel faults on 0 rows)
        return q.new_zeros(batch, q_heads, q_len, v.shape[-1])
    grouped_q = q.reshape(batch, kv_heads, group * q_len, head_dim)
    out = None
    if softcap is None and _fast_path_fits(q, k, v):
        if splits is None:
            splits = decode_splits(batch * kv_heads, kv_len)
        addend = _grouped_addend(mask, bias, causal, q, kv_heads, kv_len)
        out = _flash_decode(grouped_q, k, v, addend, scale, splits)
        if not math.isfinite(float(out.sum()) + float(q.sum())):
            out = None  # NaN/inf: the exact form decides what propagates (the reference's rules)
    if out is None:
        out = _exact_grouped(grouped_q, k, v, mask, bias, scale, causal, softcap, group)
    return out.reshape(batch, q_heads, q_len, v.shape[-1])


def _fast_path_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        _FLASH_CPU is not None
        and q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
        and q.dtype == k.dtype == v.dtype
        and k.shape[-1] == v.shape[-1]
    )


def _grouped5(t: torch.Tensor | None, name: str, kv_heads: int, group: int) -> torch.Tensor | None:
    """A mask or bias broadcastable to ``[B, Hq, Sq, Sk]`` as a 5-D view ``[B, Hkv, G, Sq, Sk]``
    (dims of size 1 kept for broadcasting)."""
    t4 = mask_to_4d(t, name)
    if t4 is None:
        return None
    b, heads, rows, keys = t4.shape
    if heads == 1:
        return t4.unsqueeze(2)
    if heads != kv_heads * group:
        raise ValueError(f"{name} has {heads} heads; expected 1 or {kv_heads * group}")
    return t4.reshape(b, kv_heads, group, rows, keys)


def _grouped_addend(
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    causal: bool,
    q: torch.Tensor,
    kv_heads: int,
    kv_len: int,
) -> torch.Tensor | None:
    """One additive mask in q's dtype for the grouped layout: 4-D ``[b, h, R, Sk]`` with ``b`` 1
    or B, ``h`` 1 or Hkv and ``R`` 1 or ``G*Sq`` (the fused kernel's accepted layouts)."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // kv_heads
    if mask is not None and mask.numel() <= _INERT_CHECK_LIMIT and mask_is_inert(mask):
        mask = None
    mask5 = _grouped5(mask, "mask", kv_heads, group)
    bias5 = _grouped5(bias, "bias", kv_heads, group)
    allowed = None
    if causal:
        allowed = causal_mask(q_len, kv_len, q.device).view(1, 1, 1, q_len, kv_len)
    if mask5 is not None and mask5.dtype == torch.bool:
        allowed = mask5 if allowed is None else allowed & mask5
        mask5 = None
    if allowed is None and mask5 is None and bias5 is None:
        return None
    if mask5 is None and bias5 is None:  # visibility only: one pass straight into q's dtype
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        addend = torch.where(allowed, zero, float("-inf"))
    else:
        # mask and bias summed in fp32 (fp64 for fp64 inputs), as the reference adds them
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        terms = [t.to(compute) for t in (bias5, mask5) if t is not None]
        addend = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        if allowed is not None:
            addend = addend.masked_fill(~allowed, float("-inf"))
        addend = addend.to(q.dtype)
    b, heads, groups, rows, keys = addend.shape
    if groups == 1 and rows == 1:
        return addend.reshape(b, heads, 1, keys)
    return addend.expand(b, heads, group, q_len, keys).reshape(b, heads, group * q_len, keys)


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, addend: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU flash kernel: ``(out, lse)``; lse is 0 on rows that saw no key."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=addend, scale=scale)[:2]
    return out, lse


def _flash_decode(
    grouped_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    addend: torch.Tensor | None,
    scale: float,
    splits: int,
) -> torch.Tensor:
    """Grouped attention ``[B, Hkv, R, D]``, split-K over the keys when ``splits > 1``."""
    batch, kv_heads, kv_len, head_dim = k.shape
    rows = grouped_q.shape[2]
    items = batch * kv_heads
    chunk = kv_len // max(splits, 1)
    if splits > 1 and chunk > 0:
        try:  # batch and heads merged as one dim: a view for any slice of a static cache
            k3, v3 = k.view(items, kv_len, head_dim), v.view(items, kv_len, head_dim)
        except RuntimeError:
            splits = 1
    if splits <= 1 or chunk == 0:
        out, _ = _flash(grouped_q, k, v, addend, scale)
        return out
    main = splits * chunk
    ks = k3[:, :main].view(items, splits, chunk, head_dim)
    vs = v3[:, :main].view(items, splits, chunk, head_dim)
    qs = grouped_q.reshape(items, 1, rows, head_dim).expand(items, splits, rows, head_dim)
    split_mask = _split_addend(addend, batch, kv_heads, splits, chunk)
    outs, lses = _flash(qs, ks, vs, split_mask, scale)
    lses = mask_empty_rows(lses, split_mask)
    if main < kv_len:  # the last keys (fewer than `splits`): one more partial state
        tail_mask = None if addend is None else addend[..., main:]
        tail_out, tail_lse = _flash(grouped_q, k[:, :, main:], v[:, :, main:], tail_mask, scale)
        tail_lse = mask_empty_rows(tail_lse, tail_mask)
        outs = torch.cat([outs, tail_out.reshape(items, 1, rows, head_dim)], dim=1)
        lses = torch.cat([lses, tail_lse.reshape(items, 1, rows)], dim=1)
    return _merge_splits(outs, lses).view(batch, kv_heads, rows, head_dim)


def _split_addend(
    addend: torch.Tensor | None, batch: int, kv_heads: int, splits: int, chunk: int
) -> torch.Tensor | None:
    """The grouped addend cut like the keys: ``[1 or B*Hkv, splits, R', chunk]``."""
    if addend is None:
        return None
    b, heads, rows, _ = addend.shape
    parts = addend[..., : splits * chunk].reshape(b, heads, rows, splits, chunk)
    parts = parts.permute(0, 1, 3, 2, 4)
    if b == 1 and heads == 1:
        return parts.reshape(1, splits, rows, chunk)
    parts = parts.expand(batch, kv_heads, splits, rows, chunk)
    return parts.reshape(batch * kv_heads, splits, rows, chunk)


def _merge_splits(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Exact log-sum-exp merge of partial attentions over disjoint key chunks.

    Args:
        outs: ``[N, S, R, D]`` normalised partial outputs.
        lses: ``[N, S, R]`` their log-sum-exps (``-inf`` for chunks with no visible key).

    Returns:
        ``[N, R, D]`` in ``outs``' dtype; zeros for rows no chunk saw a key of.
    """
    top = lses.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)
    total = weights.sum(dim=1).clamp_min(torch.finfo(weights.dtype).tiny)
    merged = torch.einsum("nsr,nsrd->nrd", weights, outs.to(weights.dtype))
    return (merged / total.unsqueeze(-1)).to(outs.dtype)


def _exact_grouped(
    grouped_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    softcap: float | None,
    group: int,
) -> torch.Tensor:
    """The reference's arithmetic and masking rules on the grouped layout (K/V read once per
    kv head, never repeated): soft-capping, and NaN/inf inputs."""
    batch, kv_heads, rows, _ = grouped_q.shape
    q_len, kv_len = rows // group, k.shape[2]
    compute = torch.float64 if grouped_q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(grouped_q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(batch, kv_heads, group, q_len, kv_len)
    bias5 = _grouped5(bias, "bias", kv_heads, group)
    if bias5 is not None:
        scores = scores + bias5.to(compute)
    allowed = torch.ones((), dtype=torch.bool, device=grouped_q.device)
    mask5 = _grouped5(mask, "mask", kv_heads, group)
    if mask5 is not None:
        if mask5.dtype == torch.bool:
            allowed = allowed & mask5
        else:
            scores = scores + mask5.to(compute)
    if causal:
        allowed = allowed & causal_mask(q_len, kv_len, grouped_q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(denom == 0, 0.0, weights / denom.clamp_min(torch.finfo(compute).tiny))
    probs = probs.view(batch, kv_heads, rows, kv_len)
    return torch.matmul(probs, v.to(compute)).to(grouped_q.dtype)
