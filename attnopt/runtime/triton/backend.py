"""Which generated Triton kernel serves an ``attention`` node, and running it there.

Entry points: :func:`triton_kernel_for` (the one decision), :func:`run_attention_triton` (used by
the ``K`` namespace of generated programs), :func:`kernel_sources_for` (``CompiledModule.kernels``).

:func:`triton_kernel_for` maps a node's operands and attributes to the kernel that serves them, or
to the reason none can; decode-shaped dense calls take the split-K decode kernels
(:mod:`attnopt.runtime.triton.decode`). It works on real tensors (running) and on ``meta``
tensors built from the graph's static types (listing), so ``cm.kernels`` names exactly the
kernels that run. Which variant a call runs as (``min_len``, per-head subsets) is decided by
:func:`attnopt.ir.attention.effective_variant` and :func:`~attnopt.ir.attention.variant_heads`,
as for the torch kernels. Whether the process can run a kernel at all (CUDA, the interpreter) is
:func:`~attnopt.runtime.triton.loader.environment_reason`, checked before a launch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from attnopt.codegen.triton_attention import render_attention_kernel
from attnopt.codegen.triton_linear import LinearKernelConfig, render_linear_kernel
from attnopt.ir import AttentionAttrs, AttentionOperands, Graph, TensorType
from attnopt.ir.attention import block_meta_of, effective_variant, feature_map_of, variant_heads
from attnopt.ir.block_sparse import BlockMeta
from attnopt.ir.linear_attention import prepare_features
from attnopt.ir.symbolic import evaluate_dim
from attnopt.runtime.cpu.linear_features import row_eps
from attnopt.runtime.triton.blocks import neighborhood_block_meta
from attnopt.runtime.triton.decode import DecodeKernel, decode_kernel_for
from attnopt.runtime.triton.launch import AttentionCall, triton_attention
from attnopt.runtime.triton.linear import linear_call_reason, triton_linear_attention
from attnopt.runtime.triton.loader import environment_reason

#: Variants the Triton templates render (neighbourhoods as block-sparse plus a mask).
TRITON_VARIANTS = ("dense", "sliding_window", "block_sparse", "neighborhood", "linear")
#: Block size used for neighbourhood block lists.
NEIGHBORHOOD_BLOCK = 32
#: Feature maps the linear kernels apply in-kernel; the others are computed in torch.
IN_KERNEL_FEATURE_MAPS = ("elu", "relu")


@dataclass(frozen=True, eq=False)
class AttentionKernel:
    """The attention template serving one call.

    Attributes:
        call: the call as the kernel takes it (neighbourhood visibility folded into the mask).
    """

    call: AttentionCall

    @property
    def name(self) -> str:
        """The kernel's name, ``_attn_fwd_<variant>``."""
        return self.call.kernel_config().kernel_name

    @property
    def source(self) -> str:
        """The rendered kernel module."""
        return render_attention_kernel(self.call.kernel_config()).source

    def run(self, *, interpret: bool) -> torch.Tensor:
        """Launch the kernel (the process must be able to: see ``environment_reason``)."""
        return triton_attention(self.call, interpret=interpret)


@dataclass(frozen=True, eq=False)
class LinearKernel:
    """The linear-attention kernels serving one ``linear`` call.

    Attributes:
        operands: the node's operands.
        attrs: the node's attributes.
        config: the rendered kernel family (``identity`` when features are computed in torch).
    """

    operands: AttentionOperands
    attrs: AttentionAttrs
    config: LinearKernelConfig

    @property
    def name(self) -> str:
        """The main kernel's name, ``_linattn_fwd_<variant>``."""
        return self.config.kernel_name

    @property
    def source(self) -> str:
        """The rendered kernel module."""
        return render_linear_kernel(self.config)

    def run(self, *, interpret: bool) -> torch.Tensor:
        """Launch the kernels: elu / relu in-kernel; FAVOR+ / cosFormer features computed in
        torch and passed with the identity map (``eps`` in the kernel's true units, as the
        reference adds it)."""
        q, k, v, mask = self.operands.q, self.operands.k, self.operands.v, self.operands.mask
        if self.config.feature_map != "identity":
            return triton_linear_attention(q, k, v, self.config, mask=mask, interpret=interpret)
        feature_map = feature_map_of(self.attrs, q.shape[-1])
        prep = prepare_features(q.float(), k.float(), v.float(), feature_map, None)
        rows = prep.phi_q.shape[:4]  # [B, Hkv, G, Sq]
        eps = row_eps(1e-6, prep.log_q, None)
        if isinstance(eps, torch.Tensor):
            eps = eps.expand(*rows, 1).reshape(q.shape[:3])
        out = triton_linear_attention(
            prep.phi_q.reshape(*q.shape[:3], -1), prep.phi_k, prep.value, self.config,
            mask=mask, eps=eps, interpret=interpret,
        )  # fmt: skip
        return out.to(q.dtype)


TritonKernel = AttentionKernel | LinearKernel | DecodeKernel


def triton_kernel_for(
    operands: AttentionOperands, attrs: AttentionAttrs, *, interpret: bool
) -> TritonKernel | str:
    """The generated kernel that serves one ``attention`` call, or why none does.

    Args:
        operands: the call's operands: tensors, or ``meta`` tensors of the graph's static types.
        attrs: the node's attributes.
        interpret: the kernel would run in Triton's interpreter.

    Returns:
        The kernel, or a one-line reason (the torch kernels then run the call).
    """
    q, k = operands.q, operands.k
    variant = effective_variant(attrs, k.shape[2])
    if variant not in TRITON_VARIANTS:
        return f"no Triton kernel for the {variant} variant"
    if operands.segments is not None:
        # Listing (meta tensors): the common case, one document per row, which is dropped.
        meta = operands.q.device.type == "meta"
        operands = operands._replace(segments=None) if meta else operands.single_documents()
    if operands.segments is not None:
        if variant in ("linear", "hybrid"):
            return "documents of linear attention run per document on the torch path"
        # the generated kernels take documents as a mask (exact; no block skipping yet)
        operands = operands.without_segments()
    if variant != "dense" and variant_heads(attrs, q.shape[1]) is not None:
        return "per-head variants run on the torch path"
    if variant == "linear":
        return _linear_kernel(operands, attrs)
    if variant == "block_sparse" and attrs.permute_keys:
        return "key permutation runs on the torch path"
    if variant == "dense":  # decode shapes: the split-K decode kernels (flash-decoding)
        decode = decode_kernel_for(operands, attrs, interpret=interpret)
        if not isinstance(decode, str):
            return decode
    call = AttentionCall(
        q, k, operands.v, mask=operands.mask, bias=operands.bias, scale=attrs.scale,
        causal=attrs.causal, softcap=attrs.softcap,
    )  # fmt: skip
    if variant == "sliding_window":
        call = dataclasses.replace(
            call,
            window_left=attrs.window_left,
            window_right=attrs.window_right,
            sinks=attrs.sinks,
        )
    elif variant == "block_sparse":
        call = dataclasses.replace(call, block_meta=_block_meta(operands, attrs))
    elif variant == "neighborhood":
        reason = _neighborhood_reason(q, k, attrs)
        if reason is not None:
            return reason
        call = _neighborhood_call(call, attrs)
    reason = call.unsupported(interpret=interpret)
    return AttentionKernel(call) if reason is None else reason


def _linear_kernel(operands: AttentionOperands, attrs: AttentionAttrs) -> TritonKernel | str:
    if operands.bias is not None:
        return "an additive bias runs on the torch path"
    reason = linear_call_reason(operands.q, operands.k, operands.v, operands.mask)
    if reason is not None:
        return reason
    in_kernel = attrs.feature_map if attrs.feature_map in IN_KERNEL_FEATURE_MAPS else "identity"
    return LinearKernel(operands, attrs, LinearKernelConfig(in_kernel, causal=attrs.causal))


def _block_meta(operands: AttentionOperands, attrs: AttentionAttrs) -> BlockMeta:
    if operands.q.device.type != "meta" or attrs.routing == "static":
        return block_meta_of(operands, attrs)
    # Listing: routing needs data; its lists are [B, Hq, nQB, *] of the attributes' block sizes.
    batch, heads, q_len = operands.q.shape[:3]
    block_q = attrs.query_block or attrs.block
    counts = torch.empty(batch, heads, -(-q_len // block_q), dtype=torch.int32, device="meta")
    indices = torch.empty(*counts.shape, 1, dtype=torch.int32, device="meta")
    return BlockMeta(block_q, attrs.block, counts, indices)


def _neighborhood_reason(q: torch.Tensor, k: torch.Tensor, attrs: AttentionAttrs) -> str | None:
    length = attrs.num_global + math.prod(attrs.grid)
    if q.shape[2] != length or k.shape[2] != length:
        return (
            f"neighbourhood grid {tuple(attrs.grid)} with {attrs.num_global} global tokens does "
            f"not match q/k lengths {q.shape[2]}/{k.shape[2]}"
        )
    return None


def _neighborhood_call(call: AttentionCall, attrs: AttentionAttrs) -> AttentionCall:
    """The neighbourhood as a block-sparse call: visibility folded into the mask, block lists
    that skip the key blocks no query of a block can see."""
    visible, meta = neighborhood_block_meta(
        tuple(attrs.grid), tuple(attrs.kernel), attrs.dilation, attrs.num_global, NEIGHBORHOOD_BLOCK
    )
    device = call.q.device
    visible = visible.to(device)
    meta = BlockMeta(
        meta.block_q, meta.block_k, meta.kv_counts.to(device), meta.kv_indices.to(device)
    )
    mask = call.mask
    if mask is not None and mask.is_floating_point():
        mask = mask.masked_fill(~visible, float("-inf"))
    else:
        mask = visible if mask is None else mask & visible
    return dataclasses.replace(call, mask=mask, block_meta=meta)


class TritonRun(NamedTuple):
    """What :func:`run_attention_triton` did.

    Attributes:
        output: the attention output, or None when no kernel could serve the call.
        kernel: the name of the kernel that ran, or None.
        reason: why no kernel ran, or None.
    """

    output: torch.Tensor | None
    kernel: str | None
    reason: str | None


def run_attention_triton(inputs: list[Any], attrs: AttentionAttrs, *, interpret: bool) -> TritonRun:
    """Run one attention node with its generated Triton kernel.

    Args:
        inputs: the node's operands (see :class:`~attnopt.ir.attention.AttentionOperands`).
        attrs: the node's attributes.
        interpret: run in Triton's interpreter (CPU tensors).

    Returns:
        The output and the kernel's name, or the reason the kernel cannot serve this call (the
        caller then runs the torch kernel).
    """
    operands = AttentionOperands.of(inputs)
    reason = environment_reason(operands.q.device, interpret)
    if reason is not None:
        return TritonRun(None, None, reason)
    kernel = triton_kernel_for(operands, attrs, interpret=interpret)
    if isinstance(kernel, str):
        return TritonRun(None, None, kernel)
    return TritonRun(kernel.run(interpret=interpret), kernel.name, None)


def _meta_tensor(type_: Any, hints: dict[str, int]) -> torch.Tensor | None:
    """A meta tensor of the type; symbolic dims take their example values (the kernel choice
    depends on head sizes, dtypes and mask layouts, not on lengths)."""
    if not isinstance(type_, TensorType):
        return None
    try:
        shape = [evaluate_dim(d, hints) for d in type_.shape]
    except KeyError:
        return None
    return torch.empty(shape, dtype=type_.dtype, device="meta")


def kernel_sources_for(graph: Graph, *, interpret: bool = False) -> dict[str, str]:
    """Sources of the generated kernels the graph's attention nodes run on a Triton backend.

    The same decision as :func:`run_attention_triton` (:func:`triton_kernel_for`), on the
    graph's types (symbolic dims at their example values).

    Args:
        graph: a compiled graph.
        interpret: list what the interpreter runs (``backend="triton-interpret"``).

    Returns:
        ``{kernel name: module source}``.
    """
    sources: dict[str, str] = {}
    for node in graph.find("attention"):
        present = [value for value in node.inputs if value is not None]
        hints = graph.meta.get("symbol_hints", {})
        tensors = [
            None if value is None else _meta_tensor(value.type, hints) for value in node.inputs
        ]
        if sum(tensor is not None for tensor in tensors) != len(present):
            continue
        kernel = triton_kernel_for(AttentionOperands.of(tensors), node.attrs, interpret=interpret)
        if not isinstance(kernel, str):
            sources[kernel.name] = kernel.source
    return sources
