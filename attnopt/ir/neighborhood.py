"""The ``neighborhood`` variant's rule: which keys a query sees on a 2-D or 3-D token grid (NATTEN).

Entry points: :func:`neighborhood_visible`, :func:`axis_starts`, :func:`axis_visible`, :func:`per_axis`.

Tokens are ``num_global`` leading tokens (CLS, registers) followed by a row-major grid ``(H, W)`` or
``(T, H, W)``. Along each axis of length ``L`` with kernel ``K`` and dilation ``d``, position ``i``
belongs to the dilation class ``r = i % d`` (the ``ceil((L - r) / d)`` positions ``r, r + d, ...``);
inside its class, at class index ``c = i // d``, its window starts at
``clamp(c - K // 2, 0, len_r - K)`` and holds ``K`` consecutive class members: the window is shifted
inward at the borders, so every token has exactly ``K`` neighbours per axis (NATTEN's rule; it
needs ``K * d <= L``). A grid token sees the product of its per-axis windows plus every global
token; global tokens see every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["axis_starts", "axis_visible", "neighborhood_visible", "per_axis"]


def per_axis(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """``value`` as one positive int per axis (an int applies to every axis)."""
    values = (value,) * dims if isinstance(value, int) else tuple(int(x) for x in value)
    if len(values) != dims or any(x < 1 for x in values):
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {value}")
    return values


def axis_starts(length: int, kernel: int, dilation: int) -> torch.Tensor:
    """First neighbour of every position along one axis, ``[length]`` (neighbours step by d)."""
    if kernel * dilation > length:
        raise ValueError(f"kernel {kernel} * dilation {dilation} exceeds the axis length {length}")
    pos = torch.arange(length)
    residue, index = pos % dilation, pos // dilation
    class_len = (length - residue + dilation - 1) // dilation
    start = torch.minimum(torch.clamp(index - kernel // 2, min=0), class_len - kernel)
    return residue + dilation * start


def axis_visible(length: int, kernel: int, dilation: int) -> torch.Tensor:
    """Bool ``[length, length]``: query position sees key position along one axis."""
    start = axis_starts(length, kernel, dilation).unsqueeze(1)
    keys = torch.arange(length).unsqueeze(0)
    offset = keys - start
    return (offset >= 0) & (offset < kernel * dilation) & (offset % dilation == 0)


def neighborhood_visible(
    grid: Sequence[int],
    kernel: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    num_global: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Dense bool visibility of neighbourhood attention (the reference semantics; the kernel never builds it).

    Args:
        grid: ``(H, W)`` or ``(T, H, W)``.
        kernel: window size per axis (int or one per axis).
        dilation: dilation per axis (int or one per axis).
        num_global: leading global tokens.
        device: device of the result.

    Returns:
        Bool ``[S, S]`` with ``S = num_global + prod(grid)``, True where query may see key.
    """
    grid = tuple(int(g) for g in grid)
    kernels = per_axis(kernel, len(grid), "kernel")
    dilations = per_axis(dilation, len(grid), "dilation")
    vis = torch.ones(1, 1, dtype=torch.bool)
    for length, k, d in zip(grid, kernels, dilations):
        axis = axis_visible(length, k, d)
        size = vis.shape[0] * length
        vis = (vis[:, None, :, None] & axis[None, :, None, :]).reshape(size, size)
    total = num_global + math.prod(grid)
    out = torch.ones(total, total, dtype=torch.bool)
    out[num_global:, num_global:] = vis
    return out.to(device)
