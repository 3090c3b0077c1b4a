"""Kernels the generated program calls, and their dispatch per backend and variant.

Entry points: :func:`attention_torch` (the fast torch path for every ``attention`` variant),
:data:`VARIANT_KERNELS`, :class:`KernelNamespace` (the ``K`` object of a generated program).

On the CPU the dense variant runs through SDPA's flash kernel with masks, bias and causality folded
into what SDPA accepts (:mod:`attnopt.runtime.cpu.dense`), and over packed documents (a
``segments`` operand) one SDPA call per run of equal-length documents
(:mod:`attnopt.runtime.cpu.varlen`); sparse and linear variants run the
kernels of :mod:`attnopt.runtime.cpu`, which skip the work they drop. Which variant a call runs
as (``min_len``, per-head subsets) is decided by :mod:`attnopt.ir.attention`, the same rules the
reference follows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

from attnopt.errors import BackendError
from attnopt.ir import get_op
from attnopt.ir.attention import (
    AttentionAttrs,
    AttentionOperands,
    block_meta_of,
    effective_variant,
    feature_map_of,
    reference_attention,
    variant_heads,
)
from attnopt.ir.block_routing import apply_permutation, permute_for_sparsity
from attnopt.runtime.cpu.block_sparse import block_sparse_attention
from attnopt.runtime.cpu.common import bookkeeping_threads
from attnopt.runtime.cpu.decode import decode_applies, decode_attention_cpu
from attnopt.runtime.cpu.dense import dense_attention_cpu
from attnopt.runtime.cpu.hybrid import hybrid_attention
from attnopt.runtime.cpu.linear import linear_attention
from attnopt.runtime.cpu.neighborhood import neighborhood_attention
from attnopt.runtime.cpu.projection import linear as projection_linear
from attnopt.runtime.cpu.sliding_window import sliding_window_attention
from attnopt.runtime.cpu.varlen import document_attention_cpu
from attnopt.runtime.kv_cache import append_kv

VariantKernel = Callable[[AttentionOperands, AttentionAttrs], torch.Tensor]


def _dense(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    # Decode shapes (a few queries, a long cache) take the GQA-grouped split-K decode kernel.
    kernel = decode_attention_cpu if decode_applies(ops.q, ops.k, ops.v) else dense_attention_cpu
    return kernel(
        ops.q, ops.k, ops.v, mask=ops.mask, bias=ops.bias, scale=attrs.scale,
        causal=attrs.causal, softcap=attrs.softcap,
    )  # fmt: skip


def _sliding_window(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    return sliding_window_attention(
        ops.q, ops.k, ops.v, window_left=attrs.window_left, window_right=attrs.window_right,
        sinks=attrs.sinks, scale=attrs.scale, causal=attrs.causal, mask=ops.mask, bias=ops.bias,
    )  # fmt: skip


def _block_sparse(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    if attrs.permute_keys:
        # Non-causal attention without masks is invariant to reordering keys with their values.
        perm, _ = permute_for_sparsity(ops.q, ops.k, ops.v, attrs.block, scale=attrs.scale)
        ops = ops._replace(k=apply_permutation(ops.k, perm), v=apply_permutation(ops.v, perm))
    meta = block_meta_of(ops, attrs, small_ops=bookkeeping_threads)
    return block_sparse_attention(
        ops.q, ops.k, ops.v, meta, scale=attrs.scale, causal=attrs.causal, mask=ops.mask,
        bias=ops.bias,
    )  # fmt: skip


def _neighborhood(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    return neighborhood_attention(
        ops.q, ops.k, ops.v, grid=attrs.grid, kernel=attrs.kernel, dilation=attrs.dilation,
        num_global=attrs.num_global, scale=attrs.scale, mask=ops.mask, bias=ops.bias,
    )  # fmt: skip


def _linear(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    fmap = feature_map_of(attrs, ops.q.shape[-1])
    return linear_attention(ops.q, ops.k, ops.v, fmap, causal=attrs.causal, mask=ops.mask)


def _hybrid(ops: AttentionOperands, attrs: AttentionAttrs) -> torch.Tensor:
    fmap = feature_map_of(attrs, ops.q.shape[-1])
    return hybrid_attention(
        ops.q, ops.k, ops.v, fmap, window=int(attrs.local_window or 0), causal=attrs.causal,
        mask=ops.mask, scale=attrs.scale,
    )  # fmt: skip


#: The torch kernel of every ``attention`` variant.
VARIANT_KERNELS: dict[str, VariantKernel] = {
    "dense": _dense,
    "sliding_window": _sliding_window,
    "block_sparse": _block_sparse,
    "neighborhood": _neighborhood,
    "linear": _linear,
    "hybrid": _hybrid,
}


def attention_torch(inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
    """Run one ``attention`` node with torch kernels (CPU or any device).

    Args:
        inputs: ``[q, k, v, mask, bias, *block_metadata]`` (absent ones None or missing).
        attrs: the node's attributes.

    Returns:
        The attention output.
    """
    ops = AttentionOperands.of(inputs)
    if attrs.nan_weights_zero and not _finite_operands(ops):
        return reference_attention(inputs, attrs)  # the kernels propagate NaN weights
    variant = effective_variant(attrs, ops.k.shape[2])
    if ops.segments is not None:
        ops = ops.single_documents()
    if ops.segments is not None:
        if variant in ("linear", "hybrid"):  # kernels that take key masks only: per document
            return ops.per_document(lambda part: attention_torch(part.as_list(), attrs))
        if variant == "dense" and _documents_fit(ops, attrs):
            return document_attention_cpu(
                ops.q, ops.k, ops.v, ops.segments, scale=attrs.scale, causal=attrs.causal,
                mask=ops.mask,
            )  # fmt: skip
        ops = ops.without_segments()  # exact, but computes the blocks between documents
    kernel = VARIANT_KERNELS.get(variant)
    if kernel is None:
        raise NotImplementedError(f"attention variant {variant!r} has no torch kernel")
    heads = None if variant == "dense" else variant_heads(attrs, ops.q.shape[1])
    if heads is not None:
        return _per_head(ops, attrs, kernel, heads)
    return kernel(ops, attrs)


def _finite_operands(ops: AttentionOperands) -> bool:
    """Whether q, k, v and a float mask or bias hold finite values only (one sum each)."""
    tensors = [ops.q, ops.k, ops.v] + [
        t for t in (ops.mask, ops.bias) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    # -inf in a mask hides keys: a mask is finite enough when no entry is NaN or +inf.
    return all(bool(torch.isfinite(t.sum())) for t in tensors[:3]) and all(
        not bool(torch.isnan(t).any() or torch.isposinf(t).any()) for t in tensors[3:]
    )


def _documents_fit(ops: AttentionOperands, attrs: AttentionAttrs) -> bool:
    """Whether the document kernel takes this call: no bias or softcap, a key mask at most."""
    mask = ops.mask
    key_mask = mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)
    return ops.bias is None and attrs.softcap is None and key_mask


def _per_head(
    ops: AttentionOperands, attrs: AttentionAttrs, kernel: VariantKernel, heads: tuple[int, ...]
) -> torch.Tensor:
    """``heads`` run the variant, the other query heads run dense attention."""
    q, k, v = ops.q, ops.k, ops.v
    num_heads = q.shape[1]
    group = num_heads // k.shape[1]
    if group > 1:  # align key/value heads with query heads so any subset can be taken
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    chosen = torch.tensor(heads, device=q.device)
    others = torch.tensor([h for h in range(num_heads) if h not in set(heads)], device=q.device)

    def take(t: Any, index: torch.Tensor) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] == 1:
            return t
        return t.index_select(1, index)

    full = AttentionOperands(q, k, v, *ops[3:])
    sparse = kernel(
        AttentionOperands(*(take(t, chosen) for t in full)), dataclasses.replace(attrs, heads=())
    )
    dense = _dense(AttentionOperands(*(take(t, others) for t in full)), attrs)
    out = sparse.new_empty((q.shape[0], num_heads, q.shape[2], sparse.shape[-1]))
    out[:, chosen] = sparse
    out[:, others] = dense
    return out


class KernelNamespace:
    """The ``K`` object a generated program calls; dispatches per backend and records taps.

    Args:
        backend: "torch", "triton" or "triton-interpret".
    """

    def __init__(self, backend: str = "torch", strict: bool = False):
        self.backend = backend
        #: Raise instead of falling back when a generated kernel fails at run time.
        self.strict = strict
        #: Sites whose generated kernel failed: they run the torch kernels from then on.
        self.failed_sites: dict[int, str] = {}
        self.taps: dict[int, torch.Tensor] | None = None
        self.input_taps: dict[int, list[list[Any]]] | None = None
        self.calls: dict[str, int] = {"triton": 0, "torch": 0}
        #: Launches per generated Triton kernel, by kernel name.
        self.triton_kernels: dict[str, int] = {}
        self._warned: set[str] = set()

    @staticmethod
    def run_op(op: str, inputs: list[Any], attrs: Any) -> Any:
        """Run any registered op through its reference implementation (ops without an emitter)."""
        return get_op(op).impl(inputs, attrs)

    @staticmethod
    def kv_append(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The ``kv_append`` op: in place into a static cache (:mod:`attnopt.runtime.kv_cache`)."""
        return append_kv(past, new)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The ``linear`` op: oneDNN on the CPU (see :mod:`attnopt.runtime.cpu.projection`)."""
        return projection_linear(x, weight, bias)

    def attention(self, inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor:
        """Run one attention node (see :func:`attention_torch`) on this namespace's backend."""
        if self.input_taps is not None and attrs.site >= 0:
            self.input_taps.setdefault(attrs.site, []).append(list(inputs))
        out = None
        if self.backend in ("triton", "triton-interpret") and not (
            # NaN weight rows: the torch path runs the reference (attention_torch checks)
            attrs.nan_weights_zero and not _finite_operands(AttentionOperands.of(inputs))
        ):
            out = self._try_triton(inputs, attrs)
        if out is None:
            out = attention_torch(inputs, attrs)
            self.calls["torch"] += 1
        else:
            self.calls["triton"] += 1
        if self.taps is not None and attrs.site >= 0:
            self.taps[attrs.site] = out.detach()
        return out

    def site_tap(self, inputs: list[Any], attrs: Any) -> None:
        """When taps are recorded, a site that runs on merged or packed tokens is recorded in the
        model's layout (each original position gets the output of the token it is in, padded
        positions zeros), so validation compares it with the reference's; a no-op otherwise."""
        if self.taps is not None and attrs.site >= 0:
            from attnopt.ir.token_reduce import restore_site_output

            out, *rest = list(inputs) + [None] * (4 - len(inputs))
            self.taps[attrs.site] = restore_site_output(out.detach(), *rest, attrs)

    def _try_triton(self, inputs: list[Any], attrs: AttentionAttrs) -> torch.Tensor | None:
        try:
            from attnopt.runtime.triton.backend import run_attention_triton
        except ImportError as err:
            self._warn_once("import", f"Triton backend unavailable ({err}); using torch kernels")
            return None
        if attrs.site in self.failed_sites:
            return None
        try:
            run = run_attention_triton(inputs, attrs, interpret=self.backend == "triton-interpret")
        except Exception as err:  # noqa: BLE001 - a failing kernel falls back, once, told
            where = f"attention site {attrs.site} (variant {attrs.variant})"
            error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if self.strict:
                raise BackendError(
                    f"the generated Triton kernel of {where} failed: {error} (strict=True; "
                    "without it this site falls back to the torch kernels)"
                ) from err
            self.failed_sites[attrs.site] = error
            self._warn_once(
                f"failed:{attrs.site}",
                f"the generated Triton kernel of {where} failed ({error}); this site runs the "
                "torch kernels from now on",
            )
            return None
        if run.output is None or run.kernel is None:
            self._warn_once(
                run.reason or "?",
                f"Triton kernel cannot serve this call: {run.reason}; using torch kernels",
            )
            return None
        self.triton_kernels[run.kernel] = self.triton_kernels.get(run.kernel, 0) + 1
        return run.output

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
