"""Launch the generated Triton attention kernels.

Entry points: :class:`AttentionCall`, :func:`triton_attention`, :func:`triton_can_run`,
:func:`load_attention_kernel`.

An :class:`AttentionCall` is one call of the ``attention`` op as the kernel takes it; it says why
the template cannot serve it (:meth:`AttentionCall.unsupported`) or which kernel variant does
(:meth:`AttentionCall.kernel_config`). :func:`triton_attention` renders that variant, imports it
through the :class:`~attnopt.runtime.triton.cache.KernelCache` (once per process and config; see
:mod:`attnopt.runtime.triton.loader` for compiled versus interpreted) and launches it. With
``interpret=True`` the same kernel runs on CPU tensors in Triton's interpreter (tests).
Block-sparse calls carry :class:`attnopt.ir.block_sparse.BlockMeta`; the full-block list the
kernel can also walk is derived from it here (:func:`~attnopt.runtime.triton.blocks.split_full_blocks`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from attnopt.codegen.triton_attention import (
    MAX_HEAD_DIM,
    MIN_TILE,
    AttentionKernelConfig,
    render_attention_kernel,
)
from attnopt.errors import BackendError
from attnopt.ir.block_sparse import BlockMeta
from attnopt.runtime.triton.blocks import split_full_blocks
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.loader import device_capability, environment_reason, load_kernel_module

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_TUNED: dict[ModuleType, Callable] = {}
_TUNE_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One call of the ``attention`` op (docs/attention-op.md) as the Triton kernel takes it.

    Attributes:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: bool (True = may attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale (None = ``D ** -0.5``).
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping of the scaled scores.
        window_left: sliding window, keys visible before the aligned position.
        window_right: sliding window, keys visible after the aligned position.
        sinks: leading keys visible to every query (with a left window).
        block_meta: block-sparse metadata.
        split_full_blocks: launch the listed blocks that need no per-element check as a second
            list (see :func:`~attnopt.runtime.triton.blocks.split_full_blocks`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float | None = None
    causal: bool = False
    softcap: float | None = None
    window_left: int | None = None
    window_right: int | None = None
    sinks: int = 0
    block_meta: BlockMeta | None = None
    split_full_blocks: bool = False

    @property
    def windowed(self) -> bool:
        """Whether the call has a sliding window."""
        return self.window_left is not None or self.window_right is not None

    def unsupported(self, *, interpret: bool = False) -> str | None:
        """Why the kernel template cannot serve this call, or None when it can.

        Only the call itself is checked (works on ``meta`` tensors too); whether the process can
        run a kernel is :func:`~attnopt.runtime.triton.loader.environment_reason`.

        Args:
            interpret: the call would run in Triton's interpreter.

        Returns:
            A one-line reason, or None.
        """
        q, k, v = self.q, self.k, self.v
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return "q, k and v must be 4-d [batch, heads, seq, head_dim]"
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPE_NAMES:
            return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernel needs one of float16, bfloat16, float32"
        if interpret and q.dtype == torch.bfloat16:
            return "the Triton interpreter cannot run bfloat16 dots"
        if not (q.device == k.device == v.device):
            return "q, k and v are on different devices"
        batch, q_heads, q_len, head_dim = q.shape
        kv_batch, kv_heads, kv_len, _ = k.shape
        if k.shape[-1] != head_dim or v.shape[:3] != k.shape[:3] or kv_batch != batch:
            return f"shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} do not match"
        if head_dim > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
            return f"head_dim {head_dim}/{v.shape[-1]} is larger than {MAX_HEAD_DIM}"
        if kv_heads == 0 or q_heads % kv_heads != 0:
            return f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads"
        target = (batch, q_heads, q_len, kv_len)
        for name, extra in (("mask", self.mask), ("bias", self.bias)):
            reason = _check_scores_operand(name, extra, target, q.device)
            if reason:
                return reason
        if self.softcap is not None and not self.softcap > 0:
            return f"softcap={self.softcap} must be positive"
        if self.windowed and self.block_meta is not None:
            return "a sliding window and block-sparse metadata in one call are not supported"
        window = (self.window_left, self.window_right, self.sinks)
        if any(value is not None and value < 0 for value in window):
            return "window sizes and sinks must be >= 0"
        if self.block_meta is not None:
            return _check_block_meta(self.block_meta, batch, q_heads, q_len, q.device)
        return None

    def kernel_config(self) -> AttentionKernelConfig:
        """The kernel variant that serves this call (call :meth:`unsupported` first).

        Returns:
            The config; sinks without a window are dropped (every key is visible anyway).
        """
        mask = self.mask
        mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
        meta = self.block_meta
        sparsity = (
            "block_sparse" if meta is not None else "sliding_window" if self.windowed else "dense"
        )
        return AttentionKernelConfig(
            head_dim=self.q.shape[-1],
            head_dim_v=self.v.shape[-1],
            causal=self.causal,
            mask_kind=mask_kind,
            has_bias=self.bias is not None,
            gqa_group=self.q.shape[1] // self.k.shape[1],
            softcap=None if self.softcap is None else float(self.softcap),
            sparsity=sparsity,
            window_left=self.window_left if self.windowed else None,
            window_right=self.window_right if self.windowed else None,
            sinks=self.sinks if self.windowed and self.window_left is not None else 0,
            block_q=meta.block_q if meta is not None else None,
            block_k=meta.block_k if meta is not None else None,
            has_full_blocks=meta is not None and self.split_full_blocks,
            dtype=_DTYPE_NAMES[self.q.dtype],
        )


def _check_scores_operand(
    name: str, tensor: torch.Tensor | None, target: tuple[int, ...], device: torch.device
) -> str | None:
    if tensor is None:
        return None
    if name == "bias" and not tensor.is_floating_point():
        return f"bias dtype {tensor.dtype} is not floating"
    if tensor.dtype != torch.bool and not tensor.is_floating_point():
        return f"{name} dtype {tensor.dtype} is neither bool nor floating"
    if tensor.device != device:
        return f"{name} is on {tensor.device}, q on {device}"
    try:
        if torch.broadcast_shapes(tuple(tensor.shape), target) != torch.Size(target):
            return f"{name} shape {tuple(tensor.shape)} does not broadcast to {target}"
    except RuntimeError:
        return f"{name} shape {tuple(tensor.shape)} does not broadcast to {target}"
    return None


def _check_block_meta(
    meta: BlockMeta, batch: int, heads: int, q_len: int, device: torch.device
) -> str | None:
    for name in ("block_q", "block_k"):
        size = getattr(meta, name)
        if size < MIN_TILE or size & (size - 1):
            return f"block-sparse {name}={size} must be a power of two >= {MIN_TILE}"
    counts = meta.kv_counts
    if counts.device != device or meta.kv_indices.device != device:
        return "block-sparse metadata is on another device than q"
    if counts.shape[0] not in (1, batch) or counts.shape[1] not in (1, heads):
        return f"block-sparse metadata shape {tuple(counts.shape)} does not fit {batch}x{heads}"
    num_q_blocks = math.ceil(q_len / meta.block_q)
    if counts.shape[2] != num_q_blocks:
        return f"block-sparse metadata has {counts.shape[2]} query blocks, expected {num_q_blocks}"
    return None


def triton_can_run(call: AttentionCall, *, interpret: bool = False) -> str | None:
    """Say why the Triton kernel cannot serve a call in this process, or None when it can.

    Args:
        call: the call.
        interpret: run with the Triton interpreter (CPU tensors allowed).

    Returns:
        A one-line reason, or None.
    """
    return call.unsupported(interpret=interpret) or environment_reason(call.q.device, interpret)


def load_attention_kernel(
    config: AttentionKernelConfig, *, device: str, interpret: bool, cache: KernelCache | None = None
) -> Callable:
    """The launchable (autotuned) kernel for a config, imported through the cache once per process.

    Args:
        config: the kernel variant.
        device: the device capability string (see
            :func:`~attnopt.runtime.triton.loader.device_capability`).
        interpret: import with the Triton interpreter on.
        cache: the kernel cache; None uses the default directory.

    Returns:
        A Triton kernel object to index with a grid and call.
    """
    import triton

    module = load_kernel_module(
        config,
        lambda c: render_attention_kernel(c).source,
        device=device,
        interpret=interpret,
        cache=cache,
    )
    with _TUNE_LOCK:
        kernel = _TUNED.get(module)
        if kernel is None:
            configs = module.INTERPRETER_CONFIGS if interpret else module.AUTOTUNE_CONFIGS
            kernel = triton.autotune(
                configs=configs,
                key=["q_len", "kv_len"],
                prune_configs_by={"early_config_prune": _prune_tiles},
            )(module.KERNEL)
            _TUNED[module] = kernel
        return kernel


def _prune_tiles(configs: list, named_args: dict, **kwargs: object) -> list:
    # Short query sequences (decoding) do not need tall tiles.
    limit = max(MIN_TILE, 1 << max(int(named_args["q_len"]) - 1, 0).bit_length())
    kept = [config for config in configs if config.kwargs["BLOCK_M"] <= limit]
    return kept or [min(configs, key=lambda config: config.kwargs["BLOCK_M"])]


def _expand_scores_operand(
    tensor: torch.Tensor | None, target: tuple[int, int, int, int], fallback: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, ...]]:
    if tensor is None:
        return fallback, (0, 0, 0, 0)
    expanded = tensor.expand(target)  # broadcast dims get stride 0
    if expanded.dtype == torch.bool:
        expanded = expanded.view(torch.uint8)
    return expanded, tuple(expanded.stride())


def _block_list_operands(
    call: AttentionCall, fallback: torch.Tensor
) -> tuple[list[torch.Tensor], list[int]]:
    # Counts, indices, full counts, full indices (int32) and their strides, 0 on broadcast dims.
    lists: list[BlockMeta] = []
    if call.block_meta is not None and call.split_full_blocks:
        q_len, kv_len = call.q.shape[2], call.k.shape[2]
        lists += split_full_blocks(call.block_meta, q_len=q_len, kv_len=kv_len, causal=call.causal)
    elif call.block_meta is not None:
        lists.append(call.block_meta)
    tensors: list[torch.Tensor] = []
    strides: list[int] = []
    for slot in range(2):
        if slot >= len(lists):
            tensors += [fallback, fallback]
            strides += [0] * 7
            continue
        for tensor in (lists[slot].kv_counts, lists[slot].kv_indices):
            tensor = tensor.to(torch.int32)
            tensors.append(tensor)
            strides += [s if n > 1 else 0 for n, s in zip(tensor.shape, tensor.stride())]
    return tensors, strides


def triton_attention(
    call: AttentionCall, *, interpret: bool = False, cache: KernelCache | None = None
) -> torch.Tensor:
    """The ``attention`` op (docs/attention-op.md) with a generated fused Triton kernel.

    Args:
        call: the call's tensors and attributes.
        interpret: run in the Triton interpreter (CPU tensors, tests).
        cache: the kernel cache; None uses
            :func:`~attnopt.runtime.triton.cache.default_cache_dir`.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.

    Raises:
        BackendError: when :func:`triton_can_run` gives a reason.
    """
    reason = triton_can_run(call, interpret=interpret)
    if reason is not None:
        raise BackendError(f"the Triton attention kernel cannot run this call: {reason}")
    q, k, v = call.q, call.k, call.v
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    out = torch.empty(batch, q_heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    kernel = load_attention_kernel(
        call.kernel_config(),
        device=device_capability(q.device, interpret),
        interpret=interpret,
        cache=cache,
    )
    target = (batch, q_heads, q_len, kv_len)
    mask_arg, mask_strides = _expand_scores_operand(call.mask, target, q)
    bias_arg, bias_strides = _expand_scores_operand(call.bias, target, q)
    sparse_args, sparse_strides = _block_list_operands(call, q)
    scale = head_dim**-0.5 if call.scale is None else float(call.scale)

    def grid(tile: dict) -> tuple[int, int]:
        return (math.ceil(q_len / tile["BLOCK_M"]), batch * q_heads)

    kernel[grid](
        q, k, v, out, mask_arg, bias_arg, *sparse_args,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mask_strides, *bias_strides, *sparse_strides,
        q_heads, q_len, kv_len, scale,
    )  # fmt: skip
    return out
