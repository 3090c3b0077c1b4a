"""Dense (non-attention) kernels of the CPU runtime: the ``linear`` op.

Entry point: :func:`linear`, which generated programs call as ``K.linear``.

On x86 CPUs torch's ``F.linear`` runs MKL's sgemm; oneDNN's matmul (shipped in the same torch
build, the kernel behind Inductor's CPU linear) is 1.1-1.7x faster for fp32 transformer shapes
on an AMD EPYC with AVX-512, e.g. 44-49 ms against 62 ms for a 2048 x 768 x 3072 projection
(``benchmarks/dense_linear.py``), and 1.1-1.5x *slower* on an AMD EPYC with AVX2 only (8 x 197
tokens through ViT-B's projections: 55-65 ms against 44-50 ms). Which one runs fp32 is therefore
measured, once per process, on this CPU (:func:`onednn_fp32_faster`: a 512 x 768 x 768 product,
interleaved, oneDNN must win by 5%); ``ATTNOPT_CPU_LINEAR=onednn`` or ``=mkl`` fixes the choice.
Below about a million multiply-adds (one token through a 768 x 768 projection) oneDNN's call
overhead loses, and ``F.linear`` runs those. The weight is passed as it is, unpacked, on every call: a prepacked copy
would go stale if the model's weights were changed after compiling. Both libraries compute the same fp32 product; only the summation order differs.

bf16 products (the ``precision`` pass gives bf16 activations, weights and biases) run oneDNN's
bf16 inner product, which accumulates in fp32, wherever oneDNN has a bf16 kernel for this CPU
(AVX-512 and newer); elsewhere ``F.linear`` runs them.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

__all__ = ["linear", "onednn_fp32_faster", "onednn_linear_available"]

#: Products smaller than this many multiply-adds stay with ``F.linear`` (lower call overhead).
_MIN_MACS = 1 << 20


#: Dtypes oneDNN's linear serves (activation, weight and bias all of the one dtype).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has a working oneDNN linear for ``dtype`` on this CPU (checked
    once per dtype, on a tiny product; oneDNN has no bf16 kernel on CPUs without AVX-512)."""
    if not torch.backends.mkldnn.is_available() or dtype not in _ONEDNN_DTYPES:
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    try:
        x, w, b = (torch.ones(2, 3, dtype=dtype), torch.ones(4, 3, dtype=dtype),
                   torch.zeros(4, dtype=dtype))  # fmt: skip
        out = op(x, w, b, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return out.shape == (2, 4) and out.dtype == dtype and bool(torch.all(out == 3))


@functools.cache
def onednn_fp32_faster() -> bool:
    """Whether oneDNN's fp32 linear beats ``F.linear`` (MKL) on this CPU: ``ATTNOPT_CPU_LINEAR``
    (``onednn`` / ``mkl``) when set, else measured once (about 0.1 s) on a transformer-sized
    product, the two interleaved, oneDNN taking it only when 5% faster."""
    choice = os.environ.get("ATTNOPT_CPU_LINEAR", "auto").strip().lower()
    if choice in ("onednn", "mkl"):
        return choice == "onednn"
    if not onednn_linear_available(torch.float32):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 768, generator=generator)
    weight = torch.randn(768, 768, generator=generator)
    bias = torch.randn(768, generator=generator)
    op = torch.ops.mkldnn._linear_pointwise
    calls = {
        "onednn": lambda: op(x, weight, bias, "none", [], ""),
        "mkl": lambda: F.linear(x, weight, bias),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up: primitive creation, first touch
        for _ in range(7):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    best = {name: sorted(samples)[len(samples) // 2] for name, samples in times.items()}
    return best["onednn"] < 0.95 * best["mkl"]


def _plain_inference(*tensors: torch.Tensor | None) -> bool:
    """No autograd (reverse or forward), autocast, functorch transform or tracing can see the call:
    oneDNN's op has no derivative formula and no autocast rule."""
    if torch.compiler.is_compiling() or forward_ad._current_level >= 0:  # noqa: SLF001
        return False
    if torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled:
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is None:
            continue
        if grad and tensor.requires_grad:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(tensor):  # noqa: SLF001
            return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: oneDNN for large fp32 or bf16 CPU products in plain inference,
    else ``F.linear`` (same results up to summation order).

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]``.
    """
    dtype = x.dtype
    if (
        dtype in _ONEDNN_DTYPES
        and weight.dtype == dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.dim() >= 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dtype == dtype and bias.shape == weight.shape[:1]))
        and x.numel() * weight.shape[0] >= _MIN_MACS
        and _plain_inference(x, weight, bias)
        and onednn_linear_available(dtype)
        and (dtype != torch.float32 or onednn_fp32_faster())
    ):
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            "none",
            [],
            "",
        )
    return F.linear(x, weight, bias)
