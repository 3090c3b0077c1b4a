"""Dense (non-attention) kernels of the CPU runtime: the ``linear`` op.

Entry point: :func:`linear`, which generated programs call as ``K.linear``.

On x86 CPUs torch's ``F.linear`` runs MKL's sgemm; oneDNN's matmul (shipped in the same torch
build, the kernel behind Inductor's CPU linear) is 1.1-1.7x faster for fp32 transformer shapes
on the AMD EPYC (AVX-512) this runtime is measured on, e.g. 44-49 ms against 62 ms for a
2048 x 768 x 3072 projection (``benchmarks/dense_linear.py``); below about a million
multiply-adds (one token through a 768 x 768 projection) its call overhead loses, and
``F.linear`` runs those. The weight is passed as it
is, unpacked, on every call: a prepacked copy would go stale if the model's weights were changed
after compiling. Both libraries compute the same fp32 product; only the summation order differs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["linear", "onednn_linear_available"]

#: Products smaller than this many multiply-adds stay with ``F.linear`` (lower call overhead).
_MIN_MACS = 1 << 20


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has a working oneDNN linear (checked once, on a tiny product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4)
        out = op(x, w, b, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return out.shape == (2, 4) and bool(torch.all(out == 3))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: oneDNN for fp32 CPU tensors outside autograd, else ``F.linear``.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]``.
    """
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.dim() >= 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
        and x.numel() * weight.shape[0] >= _MIN_MACS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and onednn_linear_available()
    ):
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), weight.contiguous(), bias, "none", [], ""
        )
    return F.linear(x, weight, bias)
