"""Linear attention kernels in torch, for CPU (issue 6), and the entry points of the family.

Entry point: :func:`linear_attention`; its reference is
:func:`attnopt.ir.linear_attention.linear_attention_reference`, the feature maps are in
:mod:`attnopt.ir.linear_attention`.

``out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) (sum_j phi(k_j)) + eps)``, computed in row
blocks (bounded temporaries, no ``N x N`` tensor): non-causal builds one state per kv head, then
maps query blocks through it; causal is the chunk form (quadratic inside a chunk, exclusive
prefix state across chunks) with the state carried from block to block. Query heads of a GQA
group share their kv head's state. Positions, masks and log-scales: see :mod:`attnopt.ir.linear_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.ir.linear_attention import FeatureMap, key_log_weight, zero_masked_keys
from attnopt.runtime.cpu.linear_features import KeyRows, block_rows, query_rows, row_eps

__all__ = ["linear_attention"]


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    return num / (den + eps)


def _noncausal(q, k, v, feature_map: FeatureMap, log_weight, eps: float) -> torch.Tensor:
    """One key/value state per kv head (O(N F Dv)), built and applied in row blocks."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    features = feature_map.feature_dim
    keys = KeyRows(k, v, feature_map, log_weight, max(q_len, kv_len), ones_column=False)
    state = torch.zeros(batch, kv_heads, features, dv, dtype=keys.compute, device=q.device)
    normaliser = torch.zeros(batch, kv_heads, features, 1, dtype=keys.compute, device=q.device)
    step = block_rows(batch * kv_heads, features)
    for start in range(0, kv_len, step):
        phi_k, value = keys.rows(start, min(kv_len, start + step), [state, normaliser])
        state.add_(torch.matmul(phi_k.transpose(-1, -2), value))
        normaliser.add_(phi_k.sum(-2).unsqueeze(-1))
    out = torch.empty(batch, q_heads, q_len, dv, dtype=keys.compute, device=q.device)
    step = block_rows(batch * q_heads, features)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        phi_q, log_q = query_rows(q, feature_map, start, stop, kv_heads, kv_len)
        eps_rows = row_eps(eps, log_q, keys.reference)
        if isinstance(eps_rows, torch.Tensor):
            eps_rows = eps_rows.expand(*phi_q.shape[:-1], 1).reshape(batch, kv_heads, -1, 1)
        phi_q = phi_q.reshape(batch, kv_heads, -1, features)  # the group's rows share a state
        phi_q.mul_(torch.matmul(phi_q, normaliser).add_(eps_rows).reciprocal_())
        out[:, :, start:stop] = torch.matmul(phi_q, state).view(batch, q_heads, stop - start, dv)
    return out


def _causal_block(phi_q, phi_k, value, init_state, chunk: int, eps):
    """Chunk form on one block of aligned rows: returns (out ``[B, Hkv, G, n, Dv]``, block sum).

    Args are ``phi_q [B, Hkv, G, n, F]``, ``phi_k [B, Hkv, n, F]``, ``value [B, Hkv, n, Dv + 1]``
    (last column ones), the state of all earlier keys ``[B, Hkv, F, Dv + 1]`` and ``eps`` (a
    float or per row ``[B, Hkv, G, n, 1]``).
    """
    batch, kv_heads, group, length, features = phi_q.shape
    width = value.shape[-1]
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k, value = F.pad(phi_k, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
    if isinstance(eps, torch.Tensor):
        eps = F.pad(eps.expand(*phi_q.shape[:3], length, 1), (0, 0, 0, pad))
        eps = eps.view(batch, kv_heads, group, num_chunks, chunk, 1).transpose(2, 3)
        eps = eps.reshape(batch, kv_heads, num_chunks, group * chunk, 1)
    # Rows of one chunk for every query head of the group: [B, Hkv, n, G * C, F].
    phi_q = phi_q.view(batch, kv_heads, group, num_chunks, chunk, features).transpose(2, 3)
    phi_q = phi_q.reshape(batch, kv_heads, num_chunks, group * chunk, features)
    phi_k = phi_k.view(batch, kv_heads, num_chunks, chunk, features)
    value = value.view(batch, kv_heads, num_chunks, chunk, width)
    inclusive = torch.matmul(phi_k.transpose(-1, -2), value).cumsum_(2)  # [B, Hkv, n, F, Dv + 1]
    exclusive = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    exclusive += init_state.unsqueeze(2)
    scores = torch.matmul(phi_q, phi_k.transpose(-1, -2))  # [B, Hkv, n, G * C, C]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=scores.device).tril()
    scores.masked_fill_(~lower.repeat(group, 1), 0.0)
    out = torch.matmul(phi_q, exclusive).add_(torch.matmul(scores, value))
    out = _normalise(out[..., :-1], out[..., -1:], eps)
    out = out.view(batch, kv_heads, num_chunks, group, chunk, width - 1).transpose(2, 3)
    out = out.reshape(batch, kv_heads, group, num_chunks * chunk, width - 1)[:, :, :, :length]
    return out, inclusive[:, :, -1]


def _causal(q, k, v, feature_map: FeatureMap, log_weight, chunk: int, eps: float):
    """Causal chunk form in row blocks, carrying the state of all earlier keys between blocks."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    offset = kv_len - q_len  # query i's diagonal key is i + offset
    features = feature_map.feature_dim
    keys = KeyRows(k, v, feature_map, log_weight, max(q_len, kv_len), ones_column=True)
    state = torch.zeros(batch, kv_heads, features, dv + 1, dtype=keys.compute, device=q.device)
    step = max(chunk, block_rows(batch * q_heads, features) // chunk * chunk)
    for start in range(0, max(offset, 0), step):  # keys before the diagonal: seen by every row
        phi_k, value = keys.rows(start, min(offset, start + step), [state])
        state.add_(torch.matmul(phi_k.transpose(-1, -2), value))
    out = torch.empty(batch, q_heads, q_len, dv, dtype=keys.compute, device=q.device)
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        phi_k, value = keys.rows(start + offset, stop + offset, [state])
        phi_q, log_q = query_rows(q, feature_map, start, stop, kv_heads, kv_len)
        eps_rows = row_eps(eps, log_q, keys.reference)
        block_out, block_state = _causal_block(phi_q, phi_k, value, state, chunk, eps_rows)
        state.add_(block_state)
        out[:, :, start:stop] = block_out.reshape(batch, q_heads, stop - start, dv)
    return out


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    chunk: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Kernelised linear attention ``phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1)``.

    Non-causal: O(N F Dv) time, no ``N x N`` tensor; features are made and consumed in row
    blocks, so temporaries stay a few MB beyond the output. Causal (bottom-right aligned): chunk
    form (quadratic within ``chunk`` keys, exclusive prefix state across chunks), per row block,
    with only ``chunk x chunk`` score tiles.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``[B, Hkv, Sk, Dv]``.
        feature_map: the kernel's feature map (:func:`make_feature_map`).
        causal: bottom-right aligned causal rule (query ``i`` sees ``j <= i + Sk - Sq``).
        mask: key padding mask broadcastable to ``[B, 1, 1, Sk]``: bool (True = keep) or additive
            float (key weights ``exp(mask)``, so large negative values drop the key).
        chunk: chunk length of the causal form.
        eps: added to the denominator in the kernel's true units (FAVOR+: ``eps exp(-(lq + lk))``
            on its stabilised features), so results do not depend on blocking; rows that see no
            key give zeros.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.
    """
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_weight = key_log_weight(mask, q_heads, kv_heads, compute)
    k, v = zero_masked_keys(k, v, log_weight)
    if causal:
        out = _causal(q, k, v, feature_map, log_weight, chunk, eps)
    else:
        out = _noncausal(q, k, v, feature_map, log_weight, eps)
    return out.to(q.dtype)
