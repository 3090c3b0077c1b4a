"""Bridge between ``attention`` nodes and the generated Triton kernels.

Entry points: :func:`run_attention_triton` (used by the ``K`` namespace of generated programs),
:func:`kernel_sources_for` (``CompiledModule.kernels``), :func:`prepare_interpreter`.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch

from attnopt.ir import Graph, TensorType
from attnopt.ir.attention import AttentionAttrs, AttentionOperands, block_meta_of, feature_map_of

#: Variants the Triton template family renders (neighbourhoods as block-sparse plus a mask).
TRITON_VARIANTS = ("dense", "sliding_window", "block_sparse", "neighborhood")
#: Block size used for neighbourhood block lists.
NEIGHBORHOOD_BLOCK = 32


def prepare_interpreter() -> bool:
    """Make Triton's interpreter usable in this process, if it still can be.

    Triton fixes interpreter or compiled mode when it is first imported, so the environment
    switch must be set before that. Returns whether the interpreter is (or will be) active.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return True
    from attnopt.runtime.triton.launch import triton_interpreter_ready

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
    from attnopt.runtime.triton.launch import BlockSparseMeta

    meta = block_meta_of(AttentionOperands.of(inputs), attrs)
    return BlockSparseMeta(
        block_q=meta.block_q,
        block_k=meta.block_k,
        kv_counts=meta.kv_counts,
        kv_indices=meta.kv_indices,
    )


@functools.lru_cache(maxsize=16)
def _neighborhood_plan(
    grid: tuple[int, ...], kernel: tuple[int, ...], dilation: int, num_global: int, kv_len: int
) -> tuple[torch.Tensor, Any]:
    """Visibility and the block lists that skip key blocks no query of a block can see."""
    from attnopt.ir.neighborhood import neighborhood_visible
    from attnopt.runtime.triton.launch import BlockSparseMeta

    visible = neighborhood_visible(grid, kernel, dilation, num_global)
    block = NEIGHBORHOOD_BLOCK
    padded = -(-kv_len // block) * block
    grid_mask = torch.zeros(padded, padded, dtype=torch.bool)
    grid_mask[:kv_len, :kv_len] = visible
    blocks = grid_mask.reshape(padded // block, block, padded // block, block).any(dim=(1, 3))
    meta = BlockSparseMeta.from_block_mask(
        blocks, block, block, q_len=kv_len, kv_len=kv_len, split_full=False
    )
    return visible, meta


def _neighborhood_inputs(q: torch.Tensor, mask: Any, attrs: AttentionAttrs) -> tuple[Any, Any]:
    visible, meta = _neighborhood_plan(
        tuple(attrs.grid), tuple(attrs.kernel), attrs.dilation, attrs.num_global, q.shape[2]
    )
    visible = visible.to(q.device)
    if mask is None:
        return visible, meta
    if mask.dtype == torch.bool:
        return mask & visible, meta
    return mask.masked_fill(~visible, float("-inf")), meta


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
    from attnopt.runtime.triton.launch import triton_attention, triton_can_run

    if attrs.variant == "linear":
        return _run_linear(inputs, attrs, interpret=interpret)
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
    elif attrs.variant == "neighborhood":
        attrs_window = {}
        mask, block_meta = _neighborhood_inputs(q, mask, attrs)
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


def _run_linear(
    inputs: list[Any], attrs: AttentionAttrs, *, interpret: bool
) -> tuple[torch.Tensor | None, str | None]:
    """A ``linear`` node through the Triton linear-attention kernels: elu / relu in-kernel,
    FAVOR+ / cosFormer features computed in torch and passed with the identity map (``eps`` in
    the kernel's true units, as :func:`attnopt.runtime.cpu_linear.linear_attention` adds it)."""
    from attnopt.codegen.triton_linear import triton_linear_attention
    from attnopt.ir.linear_attention import prepare_features
    from attnopt.runtime.cpu.linear_features import row_eps

    padded = list(inputs) + [None] * (5 - len(inputs))
    q, k, v, mask, bias = padded[:5]
    if bias is not None:
        return None, "an additive bias runs on the torch path"
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"dtype {q.dtype} runs on the torch path"
    name = attrs.feature_map
    try:
        if name in ("elu", "relu"):
            out = triton_linear_attention(
                q, k, v, name, causal=attrs.causal, mask=mask, interpret=interpret
            )
        else:
            prep = prepare_features(
                q.float(), k.float(), v.float(), feature_map_of(attrs, q.shape[-1]), None
            )
            rows = prep.phi_q.shape[:4]  # [B, Hkv, G, Sq]
            eps = row_eps(1e-6, prep.log_q, None)  # FAVOR+: in the kernel's true units
            if isinstance(eps, torch.Tensor):
                eps = eps.expand(*rows, 1).reshape(q.shape[:3])
            out = triton_linear_attention(
                prep.phi_q.reshape(*q.shape[:3], -1), prep.phi_k, prep.value, "identity",
                causal=attrs.causal, mask=mask, eps=eps, interpret=interpret,
            ).to(q.dtype)  # fmt: skip
    except ValueError as err:
        return None, str(err)
    return out, None


def kernel_sources_for(graph: Graph) -> dict[str, str]:
    """Triton sources of every attention node the template family renders, by kernel name.

    Args:
        graph: a compiled graph.

    Returns:
        ``{kernel name: source}`` (empty when Triton is not installed).
    """
    try:
        from attnopt.codegen.triton_attention import render_attention_kernel
        from attnopt.runtime.triton.launch import attention_kernel_config
    except ImportError:
        return {}
    sources: dict[str, str] = {}
    for node in graph.find("attention"):
        attrs: AttentionAttrs = node.attrs
        if attrs.variant == "linear":
            from attnopt.codegen.triton_linear import LinearKernelConfig, render_linear_kernel

            in_kernel = attrs.feature_map if attrs.feature_map in ("elu", "relu") else "identity"
            config = LinearKernelConfig(feature_map=in_kernel, causal=attrs.causal)
            sources[f"_linattn_fwd_{config.variant}"] = render_linear_kernel(config)
            continue
        if attrs.variant not in TRITON_VARIANTS or attrs.variant == "neighborhood":
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
