"""Roofline estimates of attention sites on a named GPU (an estimate, never a measurement).

Entry points: :data:`GPUS`, :func:`site_costs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnopt.ir import Graph, get_op


@dataclass(frozen=True)
class GPU:
    """Peak numbers of one GPU."""

    name: str
    tflops_bf16: float
    tbytes_per_s: float


GPUS = {
    "h100": GPU("H100 SXM", 989.0, 3.35),
    "a100": GPU("A100 SXM 80GB", 312.0, 2.04),
}


def site_costs(graph: Graph, gpu: str = "h100") -> list[dict[str, Any]]:
    """FLOPs, bytes and a roofline time per attention site.

    Args:
        graph: a graph after detection.
        gpu: a key of :data:`GPUS`.

    Returns:
        Rows ``{"site", "flops", "bytes", "seconds", "bound"}``.
    """
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    spec = GPUS[gpu]
    rows = []
    for node in graph.find("attention"):
        cost = get_op("attention").cost_of(
            [None if v is None else v.type for v in node.inputs], [node.output.type], node.attrs
        )
        compute = cost.flops / (spec.tflops_bf16 * 1e12)
        memory = cost.bytes / (spec.tbytes_per_s * 1e12)
        rows.append(
            {
                "site": node.attrs.site,
                "flops": cost.flops,
                "bytes": cost.bytes,
                "seconds": max(compute, memory),
                "bound": "compute" if compute >= memory else "memory",
            }
        )
    return rows
