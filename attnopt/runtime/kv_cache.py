"""Static key/value caches for decoding: preallocated once, grown in place, never copied.

Entry points: :func:`static_cache` (a preallocated cache holding a prefix, returned as the
prefix view), :func:`append_kv` (the ``kv_append`` op's kernel, ``K.kv_append``).

A decoding step's graph says ``kv_append(past, new)``: the cache with the new positions after it
(``torch.cat`` along the sequence dim). When ``past`` is the prefix view ``buffer[:, :, :P]`` of a
buffer made by :func:`static_cache` and the buffer has room, :func:`append_kv` writes ``new`` into
``buffer[:, :, P:P+T]`` and returns ``buffer[:, :, :P+T]``: O(T) work instead of copying the whole
cache every step. Any other ``past`` (a plain tensor, a full buffer, another dtype) is
concatenated, which is what the op means; memory outside a tensor's view is written only when this
module allocated it.

The write mutates the buffer: a view handed out earlier that is longer than ``P`` sees the new
positions. The generation driver owns its buffers and only ever extends its latest view.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["append_kv", "static_cache"]

#: Buffers made by :func:`static_cache`, by ``id``: only these are written beyond a view.
_OWNED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def static_cache(prefix: torch.Tensor, capacity: int) -> torch.Tensor:
    """A cache of ``capacity`` positions holding ``prefix``, as the view of its filled part.

    Args:
        prefix: ``[batch, kv_heads, P, head_dim]``, the keys or values computed so far.
        capacity: positions to allocate (at least ``P``).

    Returns:
        ``buffer[:, :, :P]`` of a new ``[batch, kv_heads, capacity, head_dim]`` buffer, which
        :func:`append_kv` grows in place.

    Raises:
        ValueError: ``prefix`` is not 4-D or ``capacity`` is smaller than its length.
    """
    if prefix.dim() != 4:
        raise ValueError(f"a cache is [batch, kv_heads, seq, head_dim], not {list(prefix.shape)}")
    batch, heads, length, dim = prefix.shape
    if capacity < length:
        raise ValueError(f"capacity {capacity} is smaller than the prefix's {length} positions")
    buffer = torch.empty(batch, heads, capacity, dim, dtype=prefix.dtype, device=prefix.device)
    buffer[:, :, :length].copy_(prefix)
    _OWNED[id(buffer)] = buffer
    return buffer[:, :, :length]


def _owned_base(past: torch.Tensor) -> torch.Tensor | None:
    """The buffer ``past`` is the prefix view of, when :func:`static_cache` made it."""
    base = past._base  # noqa: SLF001 - a view's base is how its buffer is found
    if base is None or _OWNED.get(id(base)) is not base:
        return None
    if (
        past.dim() != 4
        or past.shape[:2] != base.shape[:2]
        or past.shape[3] != base.shape[3]
        or past.stride() != base.stride()
        or past.storage_offset() != base.storage_offset()
    ):
        return None
    return base


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, new], dim=2)``, in place into ``past``'s static buffer when it has one.

    Args:
        past: ``[B, H, P, D]``: a prefix view made by :func:`static_cache` (or any tensor).
        new: ``[B, H, T, D]``: the new positions.

    Returns:
        ``[B, H, P + T, D]``: the cache with ``new`` after ``past``.
    """
    base = _owned_base(past)
    length, extra = past.shape[2], new.shape[2]
    if base is None or new.dtype != base.dtype or length + extra > base.shape[2]:
        return torch.cat([past, new], dim=2)
    base[:, :, length : length + extra].copy_(new)
    return base[:, :, : length + extra]
