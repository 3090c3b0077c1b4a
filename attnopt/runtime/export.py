"""The ``K`` namespace for ONNX export: every kernel call as plain torch ops the exporter knows.

Entry points: :class:`ExportKernels`, :func:`export_program`.

The generated program of a compiled graph runs as it does at run time, except that its kernel
calls are traced by ``torch.onnx.export`` (the dynamo exporter) instead of running the CPU or
Triton kernels: dense attention becomes ``F.scaled_dot_product_attention`` (the exporter emits the
standard ``Attention`` op at opset 23: heads and key/value heads, scale, causal, a bool or
additive mask), every other attention variant its reference semantics in torch ops (the
exporter decomposes them into standard ops that compute the same thing), projections
``F.linear``. Variants whose kernels gather by data (padding removal, token merging) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnopt.errors import BackendError
from attnopt.ir import Graph, get_op
from attnopt.ir.attention import AttentionAttrs, AttentionOperands
from attnopt.runtime.cpu.dense import sdpa_mask
from attnopt.runtime.execute import load_program

__all__ = ["EXPORT_REFUSED_OPS", "ExportKernels", "export_program"]

#: Ops whose results depend on data-dependent gathers: not exported yet.
EXPORT_REFUSED_OPS = {
    "token_index": "padding removal (packed tokens of data-dependent count)",
    "pack": "padding removal (packed tokens of data-dependent count)",
    "token_merge": "token merging",
    "token_prune": "token pruning",
    "token_merge_packed": "token merging",
    "token_prune_packed": "token pruning",
}


def _dense_sdpa(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    """Dense attention as one SDPA call (the ONNX ``Attention`` op)."""
    q, k, v = ops.q, ops.k, ops.v
    mask, is_causal = sdpa_mask(q, k, ops.mask, ops.bias, attrs.causal)
    if mask is not None:
        # ONNX Runtime's Attention broadcasts a mask over batch and heads, not over queries.
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(*mask.shape[:2], q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=attrs.scale,
        enable_gqa=bool(q.shape[1] != k.shape[1]),
    )  # fmt: skip


class ExportKernels:
    """Kernel calls of a generated program as traceable torch ops (see the module doc)."""

    backend = "export"
    taps = None
    input_taps = None

    @staticmethod
    def run_op(op: str, inputs: list[Any], attrs: Any) -> Any:
        """Any registered op through its reference implementation."""
        return get_op(op).impl(inputs, attrs)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` (the exporter's MatMul/Gemm)."""
        return F.linear(x, weight, bias)

    @staticmethod
    def attention(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
        """Dense: one SDPA call; other variants: the op's reference semantics."""
        # Packed documents: their rule folded into the mask (exact, no data-dependent split).
        ops = AttentionOperands.of(inputs).without_segments()
        if attrs.variant == "dense" and ops.kv_counts is None and attrs.softcap is None:
            return _dense_sdpa(ops, attrs)
        return get_op("attention").impl(ops.as_list(), attrs)

    @staticmethod
    def site_tap(inputs: list[Any], attrs: Any) -> None:
        """Observers record nothing in an export."""
        return None


def export_program(graph: Graph) -> Any:
    """The program of ``graph`` with :class:`ExportKernels`, as a callable of the graph's inputs.

    Args:
        graph: a compiled graph.

    Returns:
        ``fn(*inputs) -> tuple of outputs``.

    Raises:
        BackendError: the graph holds an op that cannot be exported yet (named).
    """
    for node in graph.nodes:
        reason = EXPORT_REFUSED_OPS.get(node.op)
        if reason is not None:
            raise BackendError(
                f"cannot export to ONNX yet: the graph uses {reason} (op {node.op!r}); export a "
                "compile without that pass"
            )
    return load_program(graph, ExportKernels()).fn
