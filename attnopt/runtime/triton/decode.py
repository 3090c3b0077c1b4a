"""Launch the generated split-K decode kernels (flash-decoding) for decode-shaped dense calls.

Entry points: :func:`decode_shape`, :func:`decode_kernel_for`, :class:`DecodeKernel`,
:func:`triton_decode_attention`, :func:`decode_num_splits`.

A dense ``attention`` call with a few queries against a long cache (:func:`decode_shape`) runs the
kernel pair of :mod:`attnopt.codegen.triton_decode` instead of the flash template: one program per
(cache split, batch * kv head) over the grouped query rows, then one merge program per row. The
pair is imported through the one :class:`~attnopt.runtime.triton.cache.KernelCache` like every
generated kernel. Validation of shapes, dtypes and masks is the flash template's
(:meth:`~attnopt.runtime.triton.launch.AttentionCall.unsupported`), plus the row limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnopt.codegen.triton_decode import (
    MAX_DECODE_ROWS,
    DecodeKernelConfig,
    decode_tile,
    render_decode_kernel,
)
from attnopt.errors import BackendError
from attnopt.ir import AttentionAttrs, AttentionOperands
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.launch import AttentionCall
from attnopt.runtime.triton.loader import device_capability, environment_reason, load_kernel_module

#: Most queries per head for a call to count as decode.
TRITON_DECODE_MAX_Q_LEN = 16
#: Fewest keys for the decode kernels; below it the flash template's programs already cover the
#: cache in a few blocks (a design choice: not measured here, there is no GPU in this setup).
TRITON_DECODE_MIN_KV_LEN = 256
#: Fewest key blocks per split on a GPU (shorter splits spend more on the merge than they gain).
MIN_BLOCKS_PER_SPLIT = 4
#: Programs per streaming multiprocessor the split count aims for.
PROGRAMS_PER_SM = 2
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def decode_shape(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a dense call is decode-shaped: ``1 <= Sq <= 16``, ``Sk >= 256`` and more keys than
    queries, and the grouped rows ``G * Sq`` fit one tile (works on ``meta`` tensors).

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.

    Returns:
        True when the decode kernels should serve it.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    q_len, kv_len = q.shape[2], k.shape[2]
    rows = q.shape[1] // k.shape[1] * q_len
    return (
        1 <= q_len <= TRITON_DECODE_MAX_Q_LEN
        and kv_len >= max(TRITON_DECODE_MIN_KV_LEN, q_len + 1)
        and rows <= MAX_DECODE_ROWS
    )


@dataclass(frozen=True, eq=False)
class DecodeCall:
    """One decode-shaped ``attention`` call as the decode kernels take it.

    Attributes:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]`` (any strides: a view of a static cache is read in place).
        v: ``[B, Hkv, Sk, Dv]``.
        mask: bool (True = may attend) or additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: additive, broadcastable to ``[B, Hq, Sq, Sk]``.
        scale: score scale (None = ``D ** -0.5``).
        causal: bottom-right aligned causal rule.
        softcap: tanh soft-capping of the scaled scores.
        splits: cache splits (None: :func:`decode_num_splits`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float | None = None
    causal: bool = False
    softcap: float | None = None
    splits: int | None = None

    def unsupported(self, *, interpret: bool = False) -> str | None:
        """Why the decode kernels cannot serve this call, or None (works on ``meta`` tensors).

        Args:
            interpret: the call would run in Triton's interpreter.

        Returns:
            A one-line reason, or None.
        """
        call = AttentionCall(
            self.q, self.k, self.v, mask=self.mask, bias=self.bias, scale=self.scale,
            causal=self.causal, softcap=self.softcap,
        )  # fmt: skip
        reason = call.unsupported(interpret=interpret)
        if reason is not None:
            return reason
        rows = self.q.shape[1] // self.k.shape[1] * self.q.shape[2]
        if not 1 <= rows <= MAX_DECODE_ROWS:
            return f"{rows} grouped query rows: the decode kernels hold 1..{MAX_DECODE_ROWS}"
        if self.splits is not None and self.splits < 1:
            return f"splits={self.splits} must be >= 1"
        return None

    def kernel_config(self) -> DecodeKernelConfig:
        """The kernel pair serving this call (call :meth:`unsupported` first)."""
        mask = self.mask
        mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
        return DecodeKernelConfig(
            head_dim=self.q.shape[-1],
            head_dim_v=self.v.shape[-1],
            causal=self.causal,
            mask_kind=mask_kind,
            has_bias=self.bias is not None,
            gqa_group=self.q.shape[1] // self.k.shape[1],
            softcap=None if self.softcap is None else float(self.softcap),
            dtype=_DTYPE_NAMES[self.q.dtype],
        )


def decode_num_splits(work_items: int, kv_len: int, block_n: int, programs: int) -> int:
    """How many cache splits to launch: enough programs to fill the device, each split at least
    :data:`MIN_BLOCKS_PER_SPLIT` key blocks.

    Args:
        work_items: ``B * Hkv``.
        kv_len: ``Sk``.
        block_n: keys per block.
        programs: programs that keep the device busy (SMs x :data:`PROGRAMS_PER_SM`).

    Returns:
        The split count, at least 1.
    """
    wanted = -(-programs // max(work_items, 1))
    most = max(1, kv_len // (block_n * MIN_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, most))


def _device_programs(device: torch.device, interpret: bool) -> int:
    if interpret or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM


def _scores_operand(
    tensor: torch.Tensor | None, target: tuple[int, int, int, int], fallback: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A mask or bias broadcast to the score shape (stride 0 on broadcast dims), bools as bytes."""
    if tensor is None:
        return fallback, (0, 0, 0, 0)
    expanded = tensor.expand(target)
    if expanded.dtype == torch.bool:
        expanded = expanded.view(torch.uint8)
    return expanded, tuple(expanded.stride())


def triton_decode_attention(
    call: DecodeCall, *, interpret: bool = False, cache: KernelCache | None = None
) -> torch.Tensor:
    """The ``attention`` op for decode shapes with the generated split-K kernels.

    Args:
        call: the call's tensors and attributes.
        interpret: run in the Triton interpreter (CPU tensors, tests).
        cache: the kernel cache; None uses the default directory.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.

    Raises:
        BackendError: when the call or the process cannot run the kernels.
    """
    q, k, v = call.q, call.k, call.v
    reason = call.unsupported(interpret=interpret) or environment_reason(q.device, interpret)
    if reason is not None:
        raise BackendError(f"the Triton decode kernels cannot run this call: {reason}")
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or kv_len == 0:  # no key: rows with no visible key are zeros
        return out.zero_()
    config = call.kernel_config()
    module = load_kernel_module(
        config,
        render_decode_kernel,
        device=device_capability(q.device, interpret),
        interpret=interpret,
        cache=cache,
    )
    block_n, num_warps, num_stages = decode_tile(config, interpret=interpret)
    items, rows = batch * kv_heads, q_heads // kv_heads * q_len
    splits = call.splits or decode_num_splits(
        items, kv_len, block_n, _device_programs(q.device, interpret)
    )
    keys_per_split = math.ceil(math.ceil(kv_len / splits) / block_n) * block_n
    splits = math.ceil(kv_len / keys_per_split)
    part_out = torch.empty(items, splits, rows, head_dim_v, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(items, splits, rows, dtype=torch.float32, device=q.device)
    target = (batch, q_heads, q_len, kv_len)
    mask_arg, mask_strides = _scores_operand(call.mask, target, q)
    bias_arg, bias_strides = _scores_operand(call.bias, target, q)
    scale = head_dim**-0.5 if call.scale is None else float(call.scale)
    block_r = max(16, 1 << (rows - 1).bit_length())
    module.SPLIT_KERNEL[(splits, items)](
        q, k, v, mask_arg, bias_arg, part_out, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *bias_strides,
        *part_out.stride(), *part_lse.stride(),
        kv_heads, q_len, kv_len, keys_per_split, scale,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    module.MERGE_KERNEL[(rows, items)](
        part_out, part_lse, out, *part_out.stride(), *part_lse.stride(), *out.stride(),
        kv_heads, q_len, splits, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
    )  # fmt: skip
    return out


@dataclass(frozen=True, eq=False)
class DecodeKernel:
    """The decode kernel pair serving one call.

    Attributes:
        call: the call.
    """

    call: DecodeCall

    @property
    def name(self) -> str:
        """The split kernel's name, ``_attn_decode_<variant>``."""
        return self.call.kernel_config().kernel_name

    @property
    def source(self) -> str:
        """The rendered module (split and merge kernels)."""
        return render_decode_kernel(self.call.kernel_config())

    def run(self, *, interpret: bool) -> torch.Tensor:
        """Launch the kernels (the process must be able to: see ``environment_reason``)."""
        return triton_decode_attention(self.call, interpret=interpret)


def decode_kernel_for(
    operands: AttentionOperands, attrs: AttentionAttrs, *, interpret: bool
) -> DecodeKernel | str:
    """The decode kernels for a dense call, or why they do not serve it.

    Args:
        operands: the call's operands (tensors or ``meta`` tensors), segments already resolved.
        attrs: the node's attributes (the dense variant).

    Returns:
        The kernel, or a one-line reason (the flash template is then considered).
    """
    if not decode_shape(operands.q, operands.k):
        return "not a decode shape"
    call = DecodeCall(
        operands.q, operands.k, operands.v, mask=operands.mask, bias=operands.bias,
        scale=attrs.scale, causal=attrs.causal, softcap=attrs.softcap,
    )  # fmt: skip
    reason = call.unsupported(interpret=interpret)
    return DecodeKernel(call) if reason is None else reason
