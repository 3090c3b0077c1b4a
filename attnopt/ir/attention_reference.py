"""Naive torch reference for the `attention` op (see docs/attention-op.md).

Entry points: :func:`attention_reference`, :func:`reference_attention` (one ``attention`` node, any
variant), :func:`visible_keys_mask`, :func:`causal_mask`, :func:`mask_is_inert`, :func:`mask_to_4d`.
Every kernel (CPU fast path, sparse and linear variants, generated Triton) is tested against these.
They materialise the full score matrix: use them for checking, never for speed.
"""

from __future__ import annotations

import torch


def mask_is_inert(mask: torch.Tensor) -> bool:
    """Whether an attention mask hides nothing: bool all True, or an additive mask of zeros."""
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def mask_to_4d(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """View a mask or bias broadcastable to ``[B, H, Sq, Sk]`` as exactly 4-D.

    Args:
        t: the tensor (or None).
        name: its name for error messages.

    Returns:
        A 4-D view (leading dims of size 1 added), or None.
    """
    if t is None:
        return None
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims, got shape {tuple(t.shape)}")
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bottom-right aligned causal mask, ``True`` where query ``i`` may see key ``j``.

    Args:
        q_len: number of queries.
        kv_len: number of keys.
        device: device of the result.

    Returns:
        Bool tensor ``[q_len, kv_len]``.
    """
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    return cols <= rows


def visible_keys_mask(
    q_len: int,
    kv_len: int,
    *,
    window_left: int | None = None,
    window_right: int | None = None,
    sinks: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sliding-window visibility with sinks, ``True`` where query ``i`` may see key ``j``.

    Args:
        q_len: number of queries.
        kv_len: number of keys.
        window_left: keys visible before the aligned position (None: unlimited).
        window_right: keys visible after the aligned position (None: unlimited).
        sinks: the first ``sinks`` keys are visible to every query.
        device: device of the result.

    Returns:
        Bool tensor ``[q_len, kv_len]``.
    """
    pos = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if window_left is not None:
        keep &= cols >= pos - window_left
    if window_right is not None:
        keep &= cols <= pos + window_right
    if sinks > 0:
        keep |= cols < sinks
    return keep


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    softcap: float | None = None,
    visible: torch.Tensor | None = None,
    nan_weights_zero: bool = False,
) -> torch.Tensor:
    """The `attention` op computed naively in float32 (or float64 for float64 inputs).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: bool (True = may attend) or additive float, broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive float, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale; defaults to ``D ** -0.5``.
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping of the scaled scores.
        visible: extra bool visibility (sparsity), broadcastable to ``[B, Hq, Sq, Sk]``.
        nan_weights_zero: NaN weights count as 0 (``where(isnan(w), 0, w) @ v``).

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype. Rows with no visible key are zeros.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    _, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    group = q_heads // kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = head_dim**-0.5
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute)
    allowed = torch.ones((), dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            scores = scores + mask.to(compute)
    if causal:
        allowed = allowed & causal_mask(q_len, kv_len, q.device)
    if visible is not None:
        allowed = allowed & visible
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    # Rows with no visible key give zeros; NaN (from NaN in q/k/v) propagates as in eager.
    probs = torch.where(denom == 0, 0.0, weights / denom.clamp_min(torch.finfo(compute).tiny))
    if nan_weights_zero:
        probs = torch.where(torch.isnan(probs), 0.0, probs)
    out = torch.matmul(probs, v.to(compute))
    return out.to(q.dtype)
