"""Blocked key/query feature handling shared by the CPU linear and hybrid kernels.

Entry points: :class:`KeyRows`, :func:`query_rows`, :func:`block_rows`, :func:`rescale`,
:func:`row_eps`. Feature maps, masks and log-scales are defined in :mod:`attnopt.ir.linear_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KeyRows", "block_rows", "query_rows", "rescale", "row_eps", "row_log_scale"]


#: Bytes of feature rows a blocked loop materialises at a time. Fresh large buffers are costly
#: (page faults on first touch); blocks this size are reused by the allocator and stay in cache.
_BLOCK_BYTES = 4 << 20


def block_rows(heads: int, width: int, multiple: int = 64) -> int:
    """Rows per block so that ``heads x rows x width`` fp32 values fit in :data:`_BLOCK_BYTES`."""
    rows = _BLOCK_BYTES // (4 * heads * max(width, 1))
    return max(multiple, rows // multiple * multiple)


def rescale(reference, log_scale):
    """Move a running key log-scale reference to cover ``log_scale``: ``(new, old_f, block_f)``.

    Features of different calls carry different stabilisers; sums are kept in units of
    ``exp(reference)``: the old sum is multiplied by ``old_f`` and the new block by ``block_f``.
    """
    if log_scale is None:
        return reference, None, None
    new = log_scale if reference is None else torch.maximum(reference, log_scale)
    old = None if reference is None else torch.exp(reference - new)
    return new, old, torch.exp(log_scale - new)


class KeyRows:
    """Feature-mapped key rows on demand, in the units of one running key log-scale."""

    def __init__(self, k, v, feature_map, log_weight, max_len, ones_column):
        self.k, self.v, self.feature_map, self.log_weight = k, v, feature_map, log_weight
        self.max_len, self.ones_column, self.reference = max_len, ones_column, None
        self.compute = torch.float64 if k.dtype == torch.float64 else torch.float32

    def rows(self, start: int, stop: int, carried: list[torch.Tensor]):
        """``phi(K)``, ``V`` (``[V, 1]``) of keys ``[start, stop)``; zero rows outside ``[0, Sk)``.

        ``carried`` sums are rescaled in place when the reference moves.
        """
        kv_len = self.k.shape[2]
        lo, hi = min(max(start, 0), kv_len), min(max(stop, 0), kv_len)
        hi = max(lo, hi)
        if hi == lo:
            batch, kv_heads = self.k.shape[:2]
            shape = (batch, kv_heads, stop - start)
            width = self.v.shape[-1] + int(self.ones_column)
            zeros = self.k.new_zeros(*shape, self.feature_map.feature_dim, dtype=self.compute)
            return zeros, self.k.new_zeros(*shape, width, dtype=self.compute)
        log_weight = None
        if self.log_weight is not None:
            log_weight = self.log_weight[..., lo:hi].transpose(-1, -2)
        positions = torch.arange(lo, hi, device=self.k.device)
        features = self.feature_map(
            self.k[:, :, lo:hi].to(self.compute), is_query=False, positions=positions,
            max_len=self.max_len, log_weight=log_weight,
        )  # fmt: skip
        phi = features.values
        self.reference, old, block = rescale(self.reference, features.log_scale)
        if old is not None:
            for total in carried:
                total.mul_(old)
        if block is not None:
            phi = phi.mul_(block)
        value = self.v[:, :, lo:hi].to(self.compute)
        if self.ones_column:
            value = torch.cat([value, torch.ones_like(value[..., :1])], dim=-1)
        if lo > start or stop > hi:
            pad = (0, 0, lo - start, stop - hi)
            phi, value = F.pad(phi, pad), F.pad(value, pad)
        return phi, value


def query_rows(q, feature_map, start: int, stop: int, kv_heads: int, kv_len: int):
    """``phi(Q)`` ``[B, Hkv, G, n, F]`` of query rows ``[start, stop)`` and their log-scale."""
    batch, q_heads, q_len, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    positions = torch.arange(start, stop, device=q.device) + (kv_len - q_len)
    features = feature_map(
        q[:, :, start:stop].to(compute), is_query=True, positions=positions,
        max_len=max(q_len, kv_len),
    )  # fmt: skip
    shape = (batch, kv_heads, q_heads // kv_heads, stop - start, -1)
    log_scale = features.log_scale
    return features.values.reshape(shape), None if log_scale is None else log_scale.reshape(shape)


def row_log_scale(log_q, log_k):
    """``lq + lk`` per query row (``log_q [B, Hkv, G | n, ...]``, ``log_k [B, Hkv, 1, 1]``)."""
    if log_q is None and log_k is None:
        return None
    return (0.0 if log_q is None else log_q) + (0.0 if log_k is None else log_k.unsqueeze(2))


def row_eps(eps: float, log_q, log_k):
    """``eps`` in the kernel's true units: ``eps exp(-(lq + lk))`` per row (or the float)."""
    total = row_log_scale(log_q, log_k)
    return eps if total is None else torch.exp(-total).mul_(eps)
