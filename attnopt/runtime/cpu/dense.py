"""Exact dense attention on the CPU: SDPA's flash kernel with masks, bias and causality folded in.

Entry point: :func:`dense_attention_cpu` (the ``dense`` variant, and the dense fallback of every
sparse kernel at degenerate settings). Soft-capping, which SDPA cannot express, runs the exact
reference over query chunks (never the full score matrix at once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.ir.attention_reference import attention_reference, causal_mask, mask_is_inert

__all__ = ["dense_attention_cpu", "sdpa_mask"]


def _combine_additive(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype):
    """One additive (or bool) mask equivalent to ``bias`` then ``mask`` for SDPA."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.to(dtype)


#: A float mask row whose largest entry is at most this hides every key with a finite fill.
_HIDDEN_ROW = -1.0e3


def _hidden_row_beside_bias(mask: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether a float mask hides a whole row with a finite fill while a bias is added too.

    SDPA takes one sum, ``bias + mask``; eager adds the bias to the scores first. Where a row
    has a visible key the fill's weights underflow to zero either way, but on a row the fill
    hides entirely every weight comes from the rounded sum, and ``bias + -1e9`` rounds the
    bias to multiples of 64: such calls run eager's order (the exact reference)."""
    if mask is None or bias is None or mask.dtype == torch.bool:
        return False
    return bool((mask.amax(dim=-1) <= _HIDDEN_ROW).any())


#: Masks up to this many elements are checked at run time for being all-visible.
_INERT_CHECK_LIMIT = 1 << 16


def _drop_if_inert(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a small mask that hides nothing (an all-ones padding mask): SDPA is faster
    without one and the result is identical."""
    if mask is None or mask.numel() > _INERT_CHECK_LIMIT:
        return mask
    return None if mask_is_inert(mask) else mask


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite: one reduction per tensor (a sum is non-finite when an
    element is, or when finite values overflow, which then only takes the slower exact path)."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def dense_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float,
    causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact dense attention with the fastest exact torch kernel (SDPA's CPU flash path).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: bool (True = attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale.
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping (runs the exact chunked form: SDPA cannot express it).

    Returns:
        ``[B, Hq, Sq, Dv]``.
    """
    mask = _drop_if_inert(mask)
    if softcap is not None or not _all_finite(q, k, v) or _hidden_row_beside_bias(mask, bias):
        # SDPA's CPU flash kernel loses NaN from q at some lengths (torch 2.13: a NaN query
        # row gives finite outputs at length 7, NaN at 8); eager propagates it, so must we.
        # Rows hidden entirely beside a bias take eager's order of additions.
        return _chunked_exact(
            q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, cap=softcap
        )
    attn_mask, is_causal = sdpa_mask(q, k, mask, bias, causal)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def sdpa_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor | None, bool]:
    """SDPA's ``(attn_mask, is_causal)`` for a mask, a bias and the bottom-right causal rule:
    one bool or additive mask in q's dtype (None when nothing is masked)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    attn_mask = _combine_additive(mask, bias, q.dtype)
    is_causal = False
    if causal:
        if attn_mask is None and q_len == kv_len:
            is_causal = True
        else:
            tri = causal_mask(q_len, kv_len, q.device)
            if attn_mask is None:
                attn_mask = tri
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & tri
            else:
                attn_mask = attn_mask.masked_fill(~tri, float("-inf"))
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    return attn_mask, is_causal


def _chunked_exact(q, k, v, *, mask, bias, scale, causal, cap, chunk: int = 256):  # noqa: ANN001, ANN202
    """Exact attention over query chunks (never the full score matrix at once)."""
    outs = []
    q_len, kv_len = q.shape[2], k.shape[2]
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)

        def rows(
            t: torch.Tensor | None, start: int = start, stop: int = stop
        ) -> torch.Tensor | None:
            if t is None or t.dim() < 2 or t.shape[-2] == 1:
                return t
            return t[..., start:stop, :]

        visible = None
        if causal:
            full = causal_mask(q_len, kv_len, q.device)
            visible = full[start:stop]
        outs.append(
            attention_reference(
                q[:, :, start:stop],
                k,
                v,
                mask=rows(mask),
                bias=rows(bias),
                scale=scale,
                softcap=cap,
                visible=visible,
            )
        )
    return torch.cat(outs, dim=2)
