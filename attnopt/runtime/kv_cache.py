"""Static key/value caches for decoding: preallocated once, grown in place, never copied.

Entry points: :func:`static_cache` (a preallocated cache buffer holding a prefix),
:func:`append_kv` (the ``kv_append`` op's kernel, ``K.kv_append``).

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

#: Buffers made by :func:`static_cache`, by the address of their storage: only these are
#: written beyond a view. (Not found through ``view._base``: views made under
#: ``torch.inference_mode()`` do not keep it.) The caller keeps its buffers alive; an entry
#: whose buffer is gone is dropped.
_OWNED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def static_cache(prefix: torch.Tensor, capacity: int) -> torch.Tensor:
    """A cache buffer of ``capacity`` positions whose first ``P`` hold ``prefix``.

    Keep the buffer while its views are in use and pass ``buffer[:, :, :P]`` as the cache:
    :func:`append_kv` grows such views in place (a buffer no one holds is forgotten, and its
    views are then concatenated like any tensor).

    Args:
        prefix: ``[batch, kv_heads, P, head_dim]``, the keys or values computed so far.
        capacity: positions to allocate (at least ``P``).

    Returns:
        The new ``[batch, kv_heads, capacity, head_dim]`` buffer.

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
    _OWNED[buffer.untyped_storage().data_ptr()] = buffer
    return buffer


def _owned_base(past: torch.Tensor) -> torch.Tensor | None:
    """The buffer ``past`` is the prefix view of, when :func:`static_cache` made it."""
    base = _OWNED.get(past.untyped_storage().data_ptr())
    if base is None or base.device != past.device:
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
