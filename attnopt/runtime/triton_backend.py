"""Bridge between ``attention`` nodes and the generated Triton kernels.

Entry points: :func:`run_attention_triton` (used by the ``K`` namespace of generated programs),
:func:`kernel_sources_for` (``CompiledModule.kernels``), :func:`prepare_interpreter`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from attnopt.ir import Graph, TensorType
from attnopt.ir.attention import AttentionAttrs

#: Variants the Triton template family renders.
TRITON_VARIANTS = ("dense", "sliding_window", "block_sparse")


def prepare_interpreter() -> bool:
    """Make Triton's interpreter usable in this process, if it still can be.

    Triton fixes interpreter or compiled mode when it is first imported, so the environment
    switch must be set before that. Returns whether the interpreter is (or will be) active.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return True
    from attnopt.runtime.triton_launch import triton_interpreter_ready

    return triton_interpreter_ready()


def _window(attrs: AttentionAttrs) -> dict[str, Any]:
    if attrs.variant != "sliding_window":
        return {}
    return {
        "window_left": attrs.window_left,
        "window_right": attrs.window_right,
        "sinks": attrs.sinks,
    }


def _block_meta(inputs: list[Any], attrs: AttentionAttrs) -> Any:
    from attnopt.runtime.triton_launch import BlockSparseMeta
    from attnopt.runtime.variants import block_meta_for

    meta = block_meta_for(inputs, attrs)
    return BlockSparseMeta(
        block_q=meta.block_q,
        block_k=meta.block_k,
        kv_counts=meta.kv_counts,
        kv_indices=meta.kv_indices,
    )


def run_attention_triton(
    inputs: list[Any], attrs: AttentionAttrs, *, interpret: bool
) -> tuple[torch.Tensor | None, str | None]:
    """Run one attention node with its generated Triton kernel.

    Args:
        inputs: ``[q, k, v, mask, bias, *block_metadata]``.
        attrs: the node's attributes.
        interpret: run in Triton's interpreter (CPU tensors).

    Returns:
        ``(output, None)``, or ``(None, reason)`` when the kernel cannot serve this call (the
        caller then runs the torch kernel).
    """
    from attnopt.runtime.triton_launch import triton_attention, triton_can_run

    if attrs.variant not in TRITON_VARIANTS:
        return None, f"no Triton kernel for the {attrs.variant} variant"
    if attrs.heads and attrs.variant != "dense":
        return None, "per-head variants run on the torch path"
    if attrs.variant == "block_sparse" and attrs.permute_keys:
        return None, "key permutation runs on the torch path"
    padded = list(inputs) + [None] * (5 - len(inputs))
    q, k, v, mask, bias = padded[:5]
    if attrs.variant != "dense" and k.shape[2] < attrs.min_len:
        attrs_window: dict[str, Any] = {}
        block_meta = None
    else:
        attrs_window = _window(attrs)
        block_meta = _block_meta(inputs, attrs) if attrs.variant == "block_sparse" else None
    reason = triton_can_run(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        softcap=attrs.softcap,
        block_meta=block_meta,
        interpret=interpret,
        **attrs_window,
    )
    if reason is not None:
        return None, reason
    out = triton_attention(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        scale=attrs.scale,
        causal=attrs.causal,
        softcap=attrs.softcap,
        block_meta=block_meta,
        interpret=interpret,
        **attrs_window,
    )
    return out, None


def _meta_tensor(type_: Any) -> torch.Tensor | None:
    if not isinstance(type_, TensorType) or not type_.is_static:
        return None
    return torch.empty(type_.shape, dtype=type_.dtype, device="meta")


def kernel_sources_for(graph: Graph) -> dict[str, str]:
    """Triton sources of every attention node the template family renders, by kernel name.

    Args:
        graph: a compiled graph.

    Returns:
        ``{kernel name: source}`` (empty when Triton is not installed).
    """
    try:
        from attnopt.codegen.triton_attention import render_attention_kernel
        from attnopt.runtime.triton_launch import attention_kernel_config
    except ImportError:
        return {}
    sources: dict[str, str] = {}
    for node in graph.find("attention"):
        attrs: AttentionAttrs = node.attrs
        if attrs.variant not in TRITON_VARIANTS:
            continue
        tensors = [None if v is None else _meta_tensor(v.type) for v in node.inputs[:5]]
        tensors += [None] * (5 - len(tensors))
        q, k, v, mask, bias = tensors
        if q is None or k is None or v is None:
            continue
        try:
            config = attention_kernel_config(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                causal=attrs.causal,
                softcap=attrs.softcap,
                **_window(attrs),
            )
            if attrs.variant == "block_sparse":
                import dataclasses

                config = dataclasses.replace(
                    config,
                    sparsity="block_sparse",
                    block_q=attrs.query_block or attrs.block,
                    block_k=attrs.block,
                )
            kernel = render_attention_kernel(config)
        except (ValueError, TypeError):
            continue
        sources[kernel.name] = kernel.source
    return sources
