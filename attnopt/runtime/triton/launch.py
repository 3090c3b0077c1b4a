"""Launch the generated Triton attention kernels.

Entry points: :func:`triton_attention`, :func:`triton_can_run`, :func:`attention_kernel_config`,
:func:`load_attention_kernel`, :func:`triton_interpreter_ready`, :class:`BlockSparseMeta`.

A call builds an :class:`~attnopt.codegen.triton_attention.AttentionKernelConfig` from the
tensors, renders the kernel module, stores it in the :class:`~attnopt.runtime.kernel_cache.KernelCache`
and imports it from there (once per process and config), then launches it. With
``interpret=True`` the same kernel runs on CPU tensors in Triton's interpreter (for tests); that
needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported, and once triton
is imported that way every kernel in the process is interpreted. :func:`triton_can_run`
says why a call cannot be served; the caller then runs the torch reference.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnopt.codegen.triton_attention import (
    MAX_HEAD_DIM,
    MIN_TILE,
    AttentionKernelConfig,
    render_attention_kernel,
)
from attnopt.errors import BackendError
from attnopt.runtime.triton.cache import KernelCache, kernel_cache_key

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_LOADED: dict[tuple[AttentionKernelConfig, str, str], Callable] = {}
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class BlockSparseMeta:
    """Block-sparse metadata of the `attention` op (docs/attention-op.md).

    Query block ``m`` (rows ``m*block_q ..``) sees the key blocks listed in ``kv_indices`` (the
    first ``kv_counts`` entries, ascending) plus those in ``full_kv_indices``. Listed "full" blocks
    must lie inside the key sequence and be causally visible to every row of the query block:
    the kernel skips those per-element checks there. Mask and bias tensors apply everywhere.

    Attributes:
        block_q: query rows per block (a power of two >= 16).
        block_k: keys per block (a power of two >= 16).
        kv_counts: int ``[B or 1, H or 1, num_q_blocks]``.
        kv_indices: int ``[B or 1, H or 1, num_q_blocks, max_kv_blocks]``.
        full_kv_counts: like ``kv_counts`` for full blocks, or None.
        full_kv_indices: like ``kv_indices`` for full blocks, or None.
    """

    block_q: int
    block_k: int
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_counts: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None

    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        block_q: int,
        block_k: int,
        *,
        q_len: int,
        kv_len: int,
        causal: bool = False,
        split_full: bool = True,
    ) -> BlockSparseMeta:
        """Build metadata from a dense block mask.

        Args:
            block_mask: bool ``[..., num_q_blocks, num_kv_blocks]`` with 0 to 2 leading dims
                (batch or 1, heads or 1); True = the query block sees the key block.
            block_q: query rows per block.
            block_k: keys per block.
            q_len: number of queries.
            kv_len: number of keys.
            causal: whether the call is causal (decides which blocks are "full").
            split_full: list blocks that need no per-element check separately.

        Returns:
            The metadata, int32 tensors on ``block_mask``'s device.
        """
        blocks = block_mask.to(torch.bool)
        while blocks.dim() < 4:
            blocks = blocks.unsqueeze(0)
        full = torch.zeros_like(blocks)
        if split_full:
            num_q_blocks, num_kv_blocks = blocks.shape[-2:]
            first_row = torch.arange(num_q_blocks, device=blocks.device) * block_q
            key_end = (torch.arange(num_kv_blocks, device=blocks.device) + 1) * block_k
            inside = (key_end <= kv_len).expand(num_q_blocks, num_kv_blocks)
            if causal:
                inside = inside & (key_end[None, :] - 1 <= first_row[:, None] + (kv_len - q_len))
            full = blocks & inside
        counts, indices = _block_lists(blocks & ~full)
        if not split_full:
            return cls(block_q, block_k, counts, indices)
        return cls(block_q, block_k, counts, indices, *_block_lists(full))

    def visible_mask(self, q_len: int, kv_len: int) -> torch.Tensor:
        """The equivalent dense visibility (for the torch reference and fallbacks).

        Args:
            q_len: number of queries.
            kv_len: number of keys.

        Returns:
            Bool ``[B or 1, H or 1, q_len, kv_len]``.
        """
        num_kv_blocks = math.ceil(kv_len / self.block_k)
        blocks = _blocks_from_lists(self.kv_counts, self.kv_indices, num_kv_blocks)
        if self.full_kv_counts is not None and self.full_kv_indices is not None:
            full = _blocks_from_lists(self.full_kv_counts, self.full_kv_indices, num_kv_blocks)
            blocks = blocks | full
        dense = blocks.repeat_interleave(self.block_q, dim=-2)
        dense = dense.repeat_interleave(self.block_k, dim=-1)
        return dense[..., :q_len, :kv_len]


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not listed" puts listed block indices first, in ascending order.
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    return counts, order[..., :width].to(torch.int32).contiguous()


def _blocks_from_lists(
    counts: torch.Tensor, indices: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = (slots < counts[..., None]) & (indices < num_blocks)
    blocks = indices.new_zeros(*indices.shape[:-1], num_blocks + 1, dtype=torch.bool)
    # Invalid slots scatter into a spare last column that is dropped.
    target = torch.where(valid, indices.long(), num_blocks)
    blocks.scatter_(-1, target, True)
    return blocks[..., :num_blocks]


def triton_interpreter_ready() -> bool:
    """Whether Triton was imported in interpreter mode, which the interpreter needs.

    Triton decides interpreter or compiler for its own library functions (``tl.sum``,
    ``tl.zeros``, ...) when ``triton.language`` is first imported, so ``TRITON_INTERPRET=1`` must
    be in the environment before anything imports triton (``import torch._dynamo`` does).

    Returns:
        True when triton is installed and its library functions are interpreted.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def device_capability(device: torch.device, interpret: bool) -> str:
    """The device part of the kernel cache key.

    Args:
        device: the tensors' device.
        interpret: whether the Triton interpreter runs the kernel.

    Returns:
        ``"interpreter"``, or e.g. ``"cuda-sm90"`` / ``"hip-gfx942"``.
    """
    if interpret:
        return "interpreter"
    if torch.version.hip is not None:
        return "hip-" + torch.cuda.get_device_properties(device).gcnArchName
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


def triton_can_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    sinks: int = 0,
    block_meta: BlockSparseMeta | None = None,
    interpret: bool = False,
) -> str | None:
    """Say why the Triton kernel cannot serve a call, or None when it can.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: optional bool or additive mask broadcastable to ``[B, Hq, Sq, Sk]``.
        bias: optional additive bias broadcastable to ``[B, Hq, Sq, Sk]``.
        softcap: optional soft-capping value.
        window_left: sliding window, keys before the aligned position.
        window_right: sliding window, keys after the aligned position.
        sinks: sliding window sink tokens.
        block_meta: block-sparse metadata.
        interpret: run with the Triton interpreter (CPU tensors allowed). Only explicit: a
            process where triton was imported in interpreter mode still refuses
            ``interpret=False``, so automatic dispatch never picks the slow interpreter.

    Returns:
        A one-line reason, or None.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-d [batch, heads, seq, head_dim]"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPE_NAMES:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernel needs one of float16, bfloat16, float32"
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
    for name, extra in (("mask", mask), ("bias", bias)):
        reason = _check_scores_operand(name, extra, target, q.device)
        if reason:
            return reason
    if softcap is not None and not softcap > 0:
        return f"softcap={softcap} must be positive"
    windowed = window_left is not None or window_right is not None
    if windowed and block_meta is not None:
        return "a sliding window and block-sparse metadata in one call are not supported"
    if any(value is not None and value < 0 for value in (window_left, window_right, sinks)):
        return "window sizes and sinks must be >= 0"
    if block_meta is not None:
        reason = _check_block_meta(block_meta, batch, q_heads, q_len, q.device)
        if reason:
            return reason
    return _check_environment(q, interpret)


def _check_environment(q: torch.Tensor, interpret: bool) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not interpret:
        if q.device.type != "cuda":
            return (
                f"tensors are on {q.device.type}: the Triton kernel needs CUDA (or interpret=True)"
            )
        if triton_interpreter_ready():
            return "triton was imported with TRITON_INTERPRET=1: only interpret=True can run"
        return None
    if not triton_interpreter_ready():
        return "the Triton interpreter needs TRITON_INTERPRET=1 set before triton is imported"
    if q.dtype == torch.bfloat16:
        return "the Triton interpreter cannot run bfloat16 dots"
    return None


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
    meta: BlockSparseMeta, batch: int, heads: int, q_len: int, device: torch.device
) -> str | None:
    for name in ("block_q", "block_k"):
        size = getattr(meta, name)
        if size < MIN_TILE or size & (size - 1):
            return f"block-sparse {name}={size} must be a power of two >= {MIN_TILE}"
    num_q_blocks = math.ceil(q_len / meta.block_q)
    lists = [(meta.kv_counts, meta.kv_indices)]
    if meta.full_kv_counts is not None or meta.full_kv_indices is not None:
        lists.append((meta.full_kv_counts, meta.full_kv_indices))
    for counts, indices in lists:
        if counts is None or indices is None:
            return "block-sparse full-block counts and indices must be given together"
        if counts.device != device or indices.device != device:
            return "block-sparse metadata is on another device than q"
        if counts.dim() != 3 or indices.dim() != 4 or counts.shape != indices.shape[:3]:
            return "block-sparse counts must be [B|1, H|1, Mq] and indices [B|1, H|1, Mq, K]"
        if counts.shape[0] not in (1, batch) or counts.shape[1] not in (1, heads):
            return f"block-sparse metadata shape {tuple(counts.shape)} does not fit {batch}x{heads}"
        if counts.shape[2] != num_q_blocks:
            return (
                f"block-sparse metadata has {counts.shape[2]} query blocks, expected {num_q_blocks}"
            )
    return None


def attention_kernel_config(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softcap: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    sinks: int = 0,
    block_meta: BlockSparseMeta | None = None,
) -> AttentionKernelConfig:
    """The kernel variant that serves a call (arguments as in :func:`triton_attention`).

    Returns:
        The config; sinks without a window are dropped (every key is visible anyway).
    """
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    windowed = window_left is not None or window_right is not None
    sparsity = (
        "block_sparse" if block_meta is not None else "sliding_window" if windowed else "dense"
    )
    return AttentionKernelConfig(
        head_dim=q.shape[-1],
        head_dim_v=v.shape[-1],
        causal=causal,
        mask_kind=mask_kind,
        has_bias=bias is not None,
        gqa_group=q.shape[1] // k.shape[1],
        softcap=None if softcap is None else float(softcap),
        sparsity=sparsity,
        window_left=window_left if windowed else None,
        window_right=window_right if windowed else None,
        sinks=sinks if windowed and window_left is not None else 0,
        block_q=block_meta.block_q if block_meta is not None else None,
        block_k=block_meta.block_k if block_meta is not None else None,
        has_full_blocks=block_meta is not None and block_meta.full_kv_counts is not None,
        dtype=_DTYPE_NAMES[q.dtype],
    )


def load_attention_kernel(
    config: AttentionKernelConfig, *, device: str, interpret: bool, cache: KernelCache | None = None
) -> Callable:
    """The launchable (autotuned) kernel for a config, imported through the cache once per process.

    Args:
        config: the kernel variant.
        device: the device capability string (see :func:`device_capability`).
        interpret: import with the Triton interpreter on.
        cache: the kernel cache; None uses the default directory.

    Returns:
        A Triton kernel object to index with a grid and call.
    """
    import triton

    cache = cache if cache is not None else KernelCache()
    memo_key = (config, device, str(cache.directory))
    with _LOAD_LOCK:
        kernel = _LOADED.get(memo_key)
        if kernel is not None:
            return kernel
        rendered = render_attention_kernel(config)
        key = kernel_cache_key(rendered.source, config.to_json(), triton.__version__, device)
        metadata = {
            "kernel": rendered.name,
            "config": config.to_json(),
            "triton": triton.__version__,
            "device": device,
        }
        with triton.knobs.runtime.scope():
            # @triton.jit picks interpreter or compiler when the module is executed.
            triton.knobs.runtime.interpret = interpret
            module = cache.load_module(key, rendered.source, metadata)
        configs = module.INTERPRETER_CONFIGS if interpret else module.AUTOTUNE_CONFIGS
        kernel = triton.autotune(
            configs=configs,
            key=["q_len", "kv_len"],
            prune_configs_by={"early_config_prune": _prune_tiles},
        )(module.KERNEL)
        _LOADED[memo_key] = kernel
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


def _sparse_operands(
    block_meta: BlockSparseMeta | None, fallback: torch.Tensor
) -> tuple[list[torch.Tensor], list[int]]:
    # Counts, indices, full counts, full indices (int32) and their strides, 0 on broadcast dims.
    tensors: list[torch.Tensor] = []
    strides: list[int] = []
    lists = [] if block_meta is None else [block_meta.kv_counts, block_meta.kv_indices]
    if block_meta is not None and block_meta.full_kv_counts is not None:
        lists += [block_meta.full_kv_counts, block_meta.full_kv_indices]
    for rank, tensor in zip((3, 4, 3, 4), lists + [None] * (4 - len(lists))):
        if tensor is None:
            tensors.append(fallback)
            strides += [0] * rank
            continue
        tensor = tensor.to(torch.int32)
        tensors.append(tensor)
        strides += [s if n > 1 else 0 for n, s in zip(tensor.shape, tensor.stride())]
    return tensors, strides


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None,
    causal: bool = False,
    softcap: float | None = None,
    window_left: int | None = None,
    window_right: int | None = None,
    sinks: int = 0,
    block_meta: BlockSparseMeta | None = None,
    interpret: bool = False,
    cache: KernelCache | None = None,
) -> torch.Tensor:
    """The `attention` op (docs/attention-op.md) with a generated fused Triton kernel.

    Args:
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
        interpret: run in the Triton interpreter (CPU tensors, tests).
        cache: the kernel cache; None uses :func:`~attnopt.runtime.kernel_cache.default_cache_dir`.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.

    Raises:
        BackendError: when :func:`triton_can_run` gives a reason.
    """
    options = dict(softcap=softcap, window_left=window_left, window_right=window_right, sinks=sinks)
    reason = triton_can_run(
        q, k, v, mask=mask, bias=bias, block_meta=block_meta, interpret=interpret, **options
    )
    if reason is not None:
        raise BackendError(f"the Triton attention kernel cannot run this call: {reason}")
    config = attention_kernel_config(
        q, k, v, mask=mask, bias=bias, causal=causal, block_meta=block_meta, **options
    )
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    out = torch.empty(batch, q_heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    kernel = load_attention_kernel(
        config,
        device=device_capability(q.device, interpret),
        interpret=interpret,
        cache=cache,
    )
    target = (batch, q_heads, q_len, kv_len)
    mask_arg, mask_strides = _expand_scores_operand(mask, target, q)
    bias_arg, bias_strides = _expand_scores_operand(bias, target, q)
    sparse_args, sparse_strides = _sparse_operands(block_meta, q)
    scale = head_dim**-0.5 if scale is None else float(scale)

    def grid(tile: dict) -> tuple[int, int]:
        return (math.ceil(q_len / tile["BLOCK_M"]), batch * q_heads)

    kernel[grid](
        q, k, v, out, mask_arg, bias_arg, *sparse_args,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mask_strides, *bias_strides, *sparse_strides,
        q_heads, q_len, kv_len, scale,
    )  # fmt: skip
    return out
