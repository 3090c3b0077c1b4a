"""Benchmark the generated Triton attention kernels, one row per variant.

On a CUDA GPU each variant is timed against ``torch.nn.functional.scaled_dot_product_attention``
(given the equivalent dense mask where SDPA has no native form) and reported as TFLOP/s over the
visible (query, key) pairs and as a fraction of the H100 SXM roofline (989 TFLOP/s bf16 dense,
3.35 TB/s). Without a GPU there is nothing to time: the script says so and instead checks every
variant for correctness in Triton's interpreter at small sizes. Either way it prints a table and
writes JSON (default ``benchmarks/results/kernels.json``). It asserts nothing.

Usage: ``python benchmarks/kernels.py [--json PATH] [--seq N]``
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The interpreter must be chosen before triton is first imported (attnopt imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from attnopt.ir.attention_reference import attention_reference, visible_keys_mask  # noqa: E402
from attnopt.ir.block_sparse import BlockMeta, block_meta_visible  # noqa: E402
from attnopt.runtime.triton.blocks import block_meta_from_block_mask  # noqa: E402
from attnopt.runtime.triton.launch import (  # noqa: E402
    AttentionCall,
    triton_attention,
    triton_can_run,
)
from attnopt.tolerances import exact_tolerance  # noqa: E402

H100_PEAK_TFLOPS = 989.0  # bf16 dense tensor-core peak, H100 SXM
H100_PEAK_TBPS = 3.35  # HBM3 bandwidth, H100 SXM
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "kernels.json"


@dataclass(frozen=True)
class Shape:
    """Problem size of one run."""

    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int


@dataclass(frozen=True)
class Variant:
    """One attention variant: the op's keyword arguments built for a shape."""

    name: str
    build: Callable[[Shape, torch.device], dict]
    gqa: bool = False


def _padding_mask(shape: Shape, device: torch.device, additive: bool) -> torch.Tensor:
    lengths = torch.tensor([shape.seq - 7 * b for b in range(shape.batch)], device=device)
    allowed = (torch.arange(shape.seq, device=device)[None, :] < lengths[:, None])[:, None, None]
    if not additive:
        return allowed
    zero = torch.zeros((), device=device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), device=device))


def _block_meta(shape: Shape, device: torch.device) -> BlockMeta:
    block = 64 if shape.seq >= 256 else 16
    num_blocks = math.ceil(shape.seq / block)
    gen = torch.Generator().manual_seed(0)
    block_mask = torch.rand(num_blocks, num_blocks, generator=gen) < 0.5
    block_mask |= torch.eye(num_blocks, dtype=torch.bool)
    block_mask[:, 0] = True
    return block_meta_from_block_mask(block_mask.to(device), block, block)


VARIANTS = [
    Variant("dense", lambda s, d: {}),
    Variant("causal", lambda s, d: {"causal": True}),
    Variant("gqa4-causal", lambda s, d: {"causal": True}, gqa=True),
    Variant("bool-padding", lambda s, d: {"mask": _padding_mask(s, d, additive=False)}),
    Variant("additive-padding", lambda s, d: {"mask": _padding_mask(s, d, additive=True)}),
    Variant("bias-causal", lambda s, d: {"bias": _bias(s, d), "causal": True}),
    Variant("softcap-causal", lambda s, d: {"softcap": 30.0, "causal": True}),
    Variant(
        "window-sinks",
        lambda s, d: {"causal": True, "window_left": s.seq // 8, "window_right": 0, "sinks": 4},
    ),
    Variant(
        "block-sparse",
        lambda s, d: {"block_meta": _block_meta(s, d), "split_full_blocks": True},
    ),
]


def _bias(shape: Shape, device: torch.device) -> torch.Tensor:
    return 0.1 * torch.randn(1, shape.q_heads, shape.seq, shape.seq, device=device)


def make_qkv(shape: Shape, gqa: bool, dtype: torch.dtype, device: torch.device) -> tuple:
    """Random q, k, v for a shape (k/v heads divided by 4 for GQA variants)."""
    kv_heads = shape.kv_heads // 4 if gqa else shape.kv_heads
    q = torch.randn(shape.batch, shape.q_heads, shape.seq, shape.head_dim, device=device)
    k = torch.randn(shape.batch, kv_heads, shape.seq, shape.head_dim, device=device)
    v = torch.randn(shape.batch, kv_heads, shape.seq, shape.head_dim, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def visibility(shape: Shape, options: dict, device: torch.device) -> torch.Tensor | None:
    """The extra dense visibility (window or block-sparse) the reference and SDPA need."""
    if options.get("block_meta") is not None:
        return block_meta_visible(options["block_meta"], shape.seq, shape.seq)
    if "window_left" in options:
        return visible_keys_mask(
            shape.seq,
            shape.seq,
            window_left=options["window_left"],
            window_right=options["window_right"],
            sinks=options["sinks"],
            device=device,
        )
    return None


def visible_pairs(shape: Shape, options: dict, device: torch.device) -> float:
    """Visible (query, key) pairs per (batch, head), the work a sparse kernel really does."""
    visible = torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=device)
    if options.get("causal"):
        visible = visible.tril()
    extra = visibility(shape, options, device)
    if extra is not None:
        visible = visible & extra.reshape(-1, shape.seq, shape.seq)[0]
    return float(visible.sum().item())


def sdpa_call(q, k, v, options: dict, extra: torch.Tensor | None) -> Callable | None:
    """A torch SDPA call computing the same thing, or None when SDPA has no equivalent."""
    if options.get("softcap") is not None:
        return None
    mask = options.get("mask")
    if options.get("bias") is not None:
        mask = options["bias"] if mask is None else options["bias"] + mask
    causal = options.get("causal", False)
    if extra is not None or (causal and mask is not None):
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        allowed = allowed.tril() if causal else allowed
        allowed = allowed & extra if extra is not None else allowed
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
        causal = False
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
    )


def time_gpu(shape: Shape, dtype: torch.dtype) -> list[dict]:
    """Time every variant and SDPA on the current GPU."""
    from triton.testing import do_bench

    device = torch.device("cuda")
    rows = []
    for variant in VARIANTS:
        q, k, v = make_qkv(shape, variant.gqa, dtype, device)
        options = variant.build(shape, device)
        row: dict = {"variant": variant.name, "shape": shape.__dict__, "dtype": str(dtype)}
        call = AttentionCall(q, k, v, **options)
        reason = triton_can_run(call)
        if reason is not None:
            rows.append({**row, "skipped": reason})
            continue
        kernel_ms = do_bench(functools.partial(triton_attention, call))
        flops = 2.0 * shape.batch * shape.q_heads * visible_pairs(shape, options, device)
        flops *= 2 * shape.head_dim
        operands = [q, k, v, q] + [t for t in options.values() if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in operands)  # q twice: the output
        roofline_ms = 1e3 * max(flops / (H100_PEAK_TFLOPS * 1e12), moved / (H100_PEAK_TBPS * 1e12))
        sdpa = sdpa_call(q, k, v, options, visibility(shape, options, device))
        sdpa_ms = do_bench(sdpa) if sdpa is not None else None
        rows.append(
            {
                **row,
                "kernel_ms": kernel_ms,
                "sdpa_ms": sdpa_ms,
                "tflops": flops / (kernel_ms * 1e-3) / 1e12,
                "roofline_fraction": roofline_ms / kernel_ms,
                "speedup_vs_sdpa": None if sdpa_ms is None else sdpa_ms / kernel_ms,
            }
        )
    return rows


def check_interpreter(shape: Shape, dtypes: tuple[torch.dtype, ...]) -> list[dict]:
    """Correctness of every variant in Triton's interpreter against the torch reference."""
    device = torch.device("cpu")
    rows = []
    for dtype in dtypes:
        for variant in VARIANTS:
            torch.manual_seed(0)
            q, k, v = make_qkv(shape, variant.gqa, dtype, device)
            options = variant.build(shape, device)
            row: dict = {"variant": variant.name, "shape": shape.__dict__, "dtype": str(dtype)}
            call = AttentionCall(q, k, v, **options)
            reason = triton_can_run(call, interpret=True)
            if reason is not None:
                rows.append({**row, "skipped": reason})
                continue
            start = time.perf_counter()
            out = triton_attention(call, interpret=True)
            seconds = time.perf_counter() - start
            reference_options = {
                key: options[key] for key in ("mask", "bias", "causal", "softcap") if key in options
            }
            expected = attention_reference(
                q, k, v, visible=visibility(shape, options, device), **reference_options
            )
            error = (out.float() - expected.float()).abs().max().item()
            tol = exact_tolerance(dtype)
            within = bool(
                torch.allclose(out.float(), expected.float(), atol=tol.atol, rtol=tol.rtol)
            )
            rows.append(
                {**row, "max_abs_error": error, "within_tolerance": within, "seconds": seconds}
            )
    return rows


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Print rows as a rich table."""
    table = Table(title=title)
    for column in ["variant", "dtype", *columns]:
        table.add_column(column)
    for row in rows:
        cells = [row["variant"], row["dtype"].replace("torch.", "")]
        for column in columns:
            value = row.get(column)
            if "skipped" in row and value is None:
                cells.append("skipped: " + row["skipped"] if column == columns[0] else "")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}")
            else:
                cells.append("-" if value is None else str(value))
        table.add_row(*cells)
    Console().print(table)


def main() -> None:
    """Run the benchmark (GPU timing, or interpreter correctness on CPU) and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--seq", type=int, default=None, help="sequence length")
    args = parser.parse_args()
    result: dict = {"torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        shape = Shape(batch=4, q_heads=16, kv_heads=16, seq=args.seq or 4096, head_dim=128)
        result.update(
            mode="gpu-timing",
            device=torch.cuda.get_device_name(),
            roofline={"name": "H100 SXM", "tflops": H100_PEAK_TFLOPS, "tbps": H100_PEAK_TBPS},
            rows=time_gpu(shape, torch.bfloat16),
        )
        columns = ["kernel_ms", "sdpa_ms", "speedup_vs_sdpa", "tflops", "roofline_fraction"]
        print_table(f"Triton attention vs SDPA on {result['device']}", result["rows"], columns)
    else:
        print("No CUDA GPU: timing needs a GPU. Checking correctness in the Triton interpreter.")
        shape = Shape(batch=2, q_heads=4, kv_heads=4, seq=args.seq or 97, head_dim=64)
        result.update(
            mode="interpreter-correctness",
            device="cpu (Triton interpreter)",
            rows=check_interpreter(shape, (torch.float32, torch.float16)),
        )
        columns = ["max_abs_error", "within_tolerance", "seconds"]
        print_table(
            "Triton attention in the interpreter vs torch reference", result["rows"], columns
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
