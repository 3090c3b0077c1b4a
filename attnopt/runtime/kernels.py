"""Kernels the generated program calls, and their dispatch per backend.

Entry points: :func:`attention_torch` (the fast torch path for every ``attention`` variant),
:func:`dense_attention_cpu`, :class:`KernelNamespace` (the ``K`` object of a generated program).

On the CPU the dense variant runs through SDPA's flash kernel with masks, bias and causality folded
into what SDPA accepts; soft-capping (which SDPA cannot express) runs the chunked exact form.
Sparse and linear variants run kernels that skip the work they drop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnopt.ir.attention import AttentionAttrs
from attnopt.runtime.dense import linear as dense_linear
from attnopt.runtime.reference import attention_reference, causal_mask, mask_is_inert


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


#: Masks up to this many elements are checked at run time for being all-visible.
_INERT_CHECK_LIMIT = 1 << 16


def _drop_if_inert(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a small mask that hides nothing (an all-ones padding mask): SDPA is faster
    without one and the result is identical."""
    if mask is None or mask.numel() > _INERT_CHECK_LIMIT:
        return mask
    return None if mask_is_inert(mask) else mask


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
    if softcap is not None:
        return _chunked_exact(
            q, k, v, mask=mask, bias=bias, scale=scale, causal=causal, cap=softcap
        )
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
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


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


def attention_torch(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """Run one ``attention`` node with torch kernels (CPU or any device).

    Args:
        inputs: ``[q, k, v, mask, bias, *block_metadata]`` (absent ones None or missing).
        attrs: the node's attributes.

    Returns:
        The attention output.
    """
    q, k, v = inputs[0], inputs[1], inputs[2]
    mask = inputs[3] if len(inputs) > 3 else None
    bias = inputs[4] if len(inputs) > 4 else None
    variant = attrs.variant
    if variant != "dense" and k.shape[2] < attrs.min_len:
        variant = "dense"
    if variant == "dense":
        return dense_attention_cpu(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=attrs.scale,
            causal=attrs.causal,
            softcap=attrs.softcap,
        )
    runner = _VARIANT_RUNNERS.get(variant)
    if runner is None:
        import attnopt.runtime.variants  # noqa: F401 - registers the sparse and linear runners

        runner = _VARIANT_RUNNERS.get(variant)
    if runner is None:
        raise NotImplementedError(f"attention variant {variant!r} has no torch kernel")
    if attrs.heads and len(set(attrs.heads)) < q.shape[1]:
        return _per_head(inputs, attrs, runner)
    return runner(inputs, attrs)


def _per_head(
    inputs: list[Any],
    attrs: AttentionAttrs,
    runner: Callable[[list[Any], AttentionAttrs], torch.Tensor],
) -> torch.Tensor:
    """``attrs.heads`` run the variant, the other query heads run dense attention."""
    import dataclasses

    q, k, v = inputs[0], inputs[1], inputs[2]
    heads = q.shape[1]
    group = heads // k.shape[1]
    if group > 1:  # align key/value heads with query heads so any subset can be taken
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    chosen = torch.tensor(sorted(set(attrs.heads)), device=q.device)
    others = torch.tensor([h for h in range(heads) if h not in set(attrs.heads)], device=q.device)

    def take(t: Any, index: torch.Tensor) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] == 1:
            return t
        return t.index_select(1, index)

    rest = list(inputs[3:])
    sparse = runner(
        [take(q, chosen), take(k, chosen), take(v, chosen), *[take(t, chosen) for t in rest]],
        dataclasses.replace(attrs, heads=()),
    )
    dense = dense_attention_cpu(
        take(q, others),
        take(k, others),
        take(v, others),
        mask=take(rest[0], others) if rest else None,
        bias=take(rest[1], others) if len(rest) > 1 else None,
        scale=attrs.scale,
        causal=attrs.causal,
        softcap=attrs.softcap,
    )
    out = sparse.new_empty((q.shape[0], heads, q.shape[2], sparse.shape[-1]))
    out[:, chosen] = sparse
    out[:, others] = dense
    return out


_VARIANT_RUNNERS: dict[str, Callable[[list[Any], AttentionAttrs], torch.Tensor]] = {}


def register_variant_runner(
    variant: str, runner: Callable[[list[Any], AttentionAttrs], torch.Tensor]
) -> None:
    """Register the torch kernel of a sparse or linear ``attention`` variant.

    Args:
        variant: the variant name.
        runner: ``runner(inputs, attrs) -> Tensor``.
    """
    _VARIANT_RUNNERS[variant] = runner


class KernelNamespace:
    """The ``K`` object a generated program calls; dispatches per backend and records taps.

    Args:
        backend: "torch", "triton" or "triton-interpret".
    """

    def __init__(self, backend: str = "torch"):
        self.backend = backend
        self.taps: dict[int, torch.Tensor] | None = None
        self.input_taps: dict[int, list[list[Any]]] | None = None
        self.calls: dict[str, int] = {"triton": 0, "torch": 0}
        self._warned: set[str] = set()

    @staticmethod
    def run_op(op: str, inputs: list[Any], attrs: Any) -> Any:
        """Run any registered op through its reference implementation (ops without an emitter)."""
        from attnopt.ir import get_op

        return get_op(op).impl(inputs, attrs)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The ``linear`` op: oneDNN on the CPU (see :mod:`attnopt.runtime.dense`)."""
        return dense_linear(x, weight, bias)

    def attention(self, inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
        """Run one attention node (see :func:`attention_torch`) on this namespace's backend."""
        if self.input_taps is not None and attrs.site >= 0:
            self.input_taps.setdefault(attrs.site, []).append(list(inputs))
        out = None
        if self.backend in ("triton", "triton-interpret"):
            out = self._try_triton(inputs, attrs)
        if out is None:
            out = attention_torch(inputs, attrs)
            self.calls["torch"] += 1
        else:
            self.calls["triton"] += 1
        if self.taps is not None and attrs.site >= 0:
            self.taps[attrs.site] = out.detach()
        return out

    def _try_triton(self, inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor | None:
        try:
            from attnopt.runtime.triton_backend import run_attention_triton
        except ImportError as err:
            self._warn_once("import", f"Triton backend unavailable ({err}); using torch kernels")
            return None
        result, reason = run_attention_triton(
            inputs, attrs, interpret=self.backend == "triton-interpret"
        )
        if result is None:
            self._warn_once(
                reason or "?",
                f"Triton kernel cannot serve this call: {reason}; using torch kernels",
            )
        return result

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
