"""Launch the generated Triton linear-attention kernels.

Entry points: :func:`triton_linear_attention`, :func:`linear_call_reason`.

The kernels are rendered by :mod:`attnopt.codegen.triton_linear` and imported through the one
:class:`~attnopt.runtime.triton.cache.KernelCache` (``ATTNOPT_CACHE_DIR``), keyed like the
attention kernels (source, config, Triton version, device).
"""

from __future__ import annotations

from typing import Any

import torch

from attnopt.codegen.triton_linear import LinearKernelConfig, render_linear_kernel
from attnopt.errors import BackendError
from attnopt.runtime.triton.cache import KernelCache
from attnopt.runtime.triton.loader import device_capability, environment_reason, load_kernel_module

#: Dtypes of q, k and v the linear kernels load (they accumulate in fp32).
LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_call_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> str | None:
    """Why the linear kernels cannot serve a call, or None (works on ``meta`` tensors too).

    Args:
        q: ``[B, Hq, Sq, F]`` queries or their features.
        k: ``[B, Hkv, Sk, F]`` keys or their features.
        v: ``[B, Hkv, Sk, Dv]``.
        mask: optional key padding mask.

    Returns:
        A one-line reason, or None.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-d [batch, heads, seq, head_dim]"
    if q.dtype != k.dtype or q.dtype not in LINEAR_DTYPES:
        return f"dtype {q.dtype} runs on the torch path"
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0 or k.shape[-1] != q.shape[-1]:
        return f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}"
    if mask is not None:
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        if mask.dim() > 4 or shape[-2] != 1 or shape[1] not in (1, kv_heads):
            return "only key padding masks ([B, 1, 1, Sk]) are supported"
    return None


def _load_kernels(
    config: LinearKernelConfig, device: str, interpret: bool, cache: KernelCache | None
) -> tuple[Any, Any]:
    """``(main kernel, state kernel or None)`` of ``config``, imported through the cache."""
    module = load_kernel_module(
        config, render_linear_kernel, device=device, interpret=interpret, cache=cache
    )
    name = config.kernel_name
    return getattr(module, name), None if config.causal else getattr(module, f"{name}_kvstate")


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _key_weights(mask: torch.Tensor | None, batch: int, kv_heads: int, kv_len: int, device):
    """A key padding mask as multiplicative weights ``[B, Hkv, Sk]`` (fp32), or None."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    weights = mask.float() if mask.dtype == torch.bool else mask.float().exp()
    return weights[:, :, 0, :].expand(batch, kv_heads, kv_len).contiguous().to(device)


def triton_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: LinearKernelConfig,
    *,
    mask: torch.Tensor | None = None,
    eps: float | torch.Tensor = 1e-6,
    chunk: int = 32,
    block_m: int = 32,
    interpret: bool = False,
    cache: KernelCache | None = None,
) -> torch.Tensor:
    """Linear attention ``phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1)`` with the Triton kernels.

    Args:
        q: ``[B, Hq, Sq, F]`` queries (or, with ``"identity"``, their features).
        k: ``[B, Hkv, Sk, F]`` keys (or their features), ``Hq % Hkv == 0``.
        v: ``[B, Hkv, Sk, Dv]``.
        config: the feature map (``"elu"``, ``"relu"``, or ``"identity"`` for features computed
            in torch: FAVOR+, cosFormer; see :mod:`attnopt.codegen.triton_linear`) and causality
            (bottom-right aligned, chunked kernel).
        mask: key padding mask ``[B, 1, 1, Sk]``, bool (True = keep) or additive (weights
            ``exp(mask)``), as :func:`attnopt.ir.linear_attention.linear_attention_reference`.
        eps: added to the denominator; a float, or per query row (broadcastable to
            ``[B, Hq, Sq]``) — with precomputed FAVOR+ features pass ``eps exp(-(lq + lk))`` (the
            kernel's true units), since their scale is arbitrary.
        chunk: causal chunk length (power of two, >= 16).
        block_m: query rows per program of the non-causal output kernel (power of two, >= 16).
        interpret: run in Triton's interpreter (CPU tensors).
        cache: the kernel cache; None uses the default directory (``ATTNOPT_CACHE_DIR``).

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype.

    Raises:
        BackendError: when the call or this process cannot run the kernels.
    """
    reason = linear_call_reason(q, k, v, mask) or environment_reason(q.device, interpret)
    if reason is not None:
        raise BackendError(f"the Triton linear-attention kernels cannot run this call: {reason}")
    device = device_capability(q.device, interpret)
    main_kernel, state_kernel = _load_kernels(config, device, interpret, cache)
    batch, q_heads, q_len, feature_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = q_heads // kv_heads
    weights = _key_weights(mask, batch, kv_heads, kv_len, q.device)
    weight_arg = weights if weights is not None else k  # unused placeholder pointer
    row_eps = None
    if isinstance(eps, torch.Tensor):
        row_eps = eps.to(torch.float32).expand(batch, q_heads, q_len).contiguous()
    row_eps_arg = row_eps if row_eps is not None else k
    scalar_eps = 0.0 if row_eps is not None else float(eps)
    block_f = max(16, _next_power_of_2(feature_dim))
    block_dv = max(16, _next_power_of_2(value_dim))
    out = torch.empty(batch, q_heads, q_len, value_dim, dtype=q.dtype, device=q.device)
    if config.causal:
        main_kernel[(batch * q_heads,)](
            q, k, v, weight_arg, row_eps_arg, out,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            q_heads, group, q_len, kv_len, feature_dim, value_dim, scalar_eps,
            HAS_KEY_WEIGHT=weights is not None, HAS_ROW_EPS=row_eps is not None, CHUNK=chunk,
            BLOCK_F=block_f, BLOCK_DV=block_dv,
        )  # fmt: skip
        return out
    state = torch.empty(batch * kv_heads, block_f, block_dv, dtype=torch.float32, device=q.device)
    normaliser = torch.empty(batch * kv_heads, block_f, dtype=torch.float32, device=q.device)
    state_kernel[(batch * kv_heads,)](
        k, v, weight_arg, state, normaliser,
        *k.stride(), *v.stride(),
        kv_heads, kv_len, feature_dim, value_dim,
        HAS_KEY_WEIGHT=weights is not None, BLOCK_N=chunk, BLOCK_F=block_f, BLOCK_DV=block_dv,
    )  # fmt: skip
    grid = ((q_len + block_m - 1) // block_m, batch * q_heads)
    main_kernel[grid](
        q, state, normaliser, row_eps_arg, out,
        *q.stride(), *out.stride(),
        q_heads, group, q_len, feature_dim, value_dim, scalar_eps,
        HAS_ROW_EPS=row_eps is not None, BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_DV=block_dv,
    )  # fmt: skip
    return out
