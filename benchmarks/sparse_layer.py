"""One attention layer on CPU: dense SDPA vs the sparse kernels of issue 5.

Run: ``.venv/bin/python benchmarks/sparse_layer.py [--sizes 4096 8192] [--reps 5]``.

B=1, H=12, d=64, fp32. Times come from one process that runs all variants round-robin (so a
busy machine slows every variant alike), ``--reps`` rounds after a warm-up round; the table shows
the median and the speedup of the medians (and of the minima in the JSON). Peak memory comes from
a separate subprocess per variant that makes one call: its peak RSS (VmHWM, else ``ru_maxrss``)
minus that of the same process holding only the inputs. Block-sparse timings include the content routing
(:func:`route_blocks`), whose share is reported separately. Prints a rich table and writes
``benchmarks/results/sparse_layer.json``. Asserts nothing: the issue's targets (block-sparse
density 0.1 >= 5x and SlidingWindow(512) >= 6x faster than dense SDPA at N=8192) are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnopt.ir.block_routing import route_blocks
from attnopt.runtime.cpu.block_sparse import block_sparse_attention
from attnopt.runtime.cpu.sliding_window import sliding_window_attention

HEADS, HEAD_DIM = 12, 64
RESULTS = Path(__file__).resolve().parent / "results" / "sparse_layer.json"

#: name -> (description, causal)
VARIANTS: dict[str, tuple[str, bool]] = {
    "inputs_only": ("baseline process (inputs only)", False),
    "dense_sdpa": ("dense SDPA (CPU flash)", False),
    "dense_sdpa_causal": ("dense SDPA, is_causal", True),
    "block_sparse_0.1": ("BlockSparse density 0.1, 64x64, routing included", False),
    "block_sparse_0.1_causal": ("BlockSparse density 0.1 causal, routing included", True),
    "block_sparse_0.1_q128": ("BlockSparse density 0.1, 128x64 blocks, routing incl.", False),
    "window_512": ("SlidingWindow(512) causal: left 512", True),
    "window_256_256": ("SlidingWindow left 256 + right 256 (non-causal)", False),
    "window_1024_sinks_4": ("SlidingWindow(1024) causal + 4 sinks", True),
}


def _inputs(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (1, HEADS, seq, HEAD_DIM)
    return tuple(torch.randn(shape, generator=gen) for _ in range(3))


def _runner(name: str, q, k, v, stats: dict):
    """A zero-argument callable for one variant; it stores routing time in ``stats``."""
    if name == "dense_sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if name == "dense_sdpa_causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name.startswith("block_sparse"):
        causal = name.endswith("causal")
        block_q = 128 if name.endswith("q128") else 64

        def run():
            start = time.perf_counter()
            meta = route_blocks(q, k, block=64, block_q=block_q, density=0.1, causal=causal)
            stats.setdefault("routing_s", []).append(time.perf_counter() - start)
            return block_sparse_attention(q, k, v, meta, causal=causal, stats=stats)

        return run
    windows = {
        "window_512": (512, 0, 0),
        "window_256_256": (256, 256, 0),
        "window_1024_sinks_4": (1024, 0, 4),
    }
    left, right, sinks = windows[name]
    causal = VARIANTS[name][1]
    return lambda: sliding_window_attention(
        q, k, v, window_left=left, window_right=right, sinks=sinks, causal=causal, stats=stats
    )


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, so unlike
    ``ru_maxrss`` (which Linux carries over from the parent across fork + exec) it is the
    subprocess's own."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_worker(name: str, seq: int) -> dict:
    q, k, v = _inputs(seq)
    if name != "inputs_only":
        _runner(name, q, k, v, {})()
    return {"variant": name, "seq": seq, "maxrss_mb": _peak_rss_mb()}


def _peak_memory(name: str, seq: int) -> float:
    cmd = [sys.executable, __file__, "--memory-worker", name, "--sizes", str(seq)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["maxrss_mb"]


def _time_round_robin(names: list[str], seq: int, reps: int) -> list[dict]:
    q, k, v = _inputs(seq)
    stats = {name: {} for name in names}
    runners = {name: _runner(name, q, k, v, stats[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up round
        runners[name]()
        stats[name].pop("routing_s", None)
    for _ in range(reps):
        for name in names:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in names:
        row = {
            "variant": name,
            "seq": seq,
            "ms": 1e3 * statistics.median(times[name]),
            "ms_min": 1e3 * min(times[name]),
        }
        if "routing_s" in stats[name]:
            row["routing_ms"] = 1e3 * statistics.median(stats[name]["routing_s"])
        row["computed_fraction"] = stats[name].get("computed_fraction", 1.0)
        rows.append(row)
    return rows


def _report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"one attention layer, B=1 H={HEADS} d={HEAD_DIM} fp32, {torch.get_num_threads()} threads"
    )
    for col in (
        "N",
        "variant",
        "ms (median)",
        "vs dense SDPA",
        "routing",
        "computed",
        "peak extra MB",
    ):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for row in rows:
        routing = (
            f"{row['routing_ms']:.1f} ms ({100 * row['routing_ms'] / row['ms']:.1f}%)"
            if "routing_ms" in row
            else ""
        )
        table.add_row(
            str(row["seq"]),
            VARIANTS[row["variant"]][0],
            f"{row['ms']:.1f}",
            f"{row['speedup']:.2f}x",
            routing,
            f"{100 * row['computed_fraction']:.1f}%",
            f"{row['peak_extra_mb']:.0f}",
        )
    Console(width=150).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if v != "inputs_only"]
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, args.sizes[0])))
        return
    rows = []
    for seq in args.sizes:
        measured = _time_round_robin(args.variants, seq, args.reps)
        base = _peak_memory("inputs_only", seq)
        dense = next((r for r in measured if r["variant"] == "dense_sdpa"), None)
        for row in measured:
            row["speedup"] = dense["ms"] / row["ms"] if dense else float("nan")
            row["speedup_of_minima"] = dense["ms_min"] / row["ms_min"] if dense else float("nan")
            row["peak_extra_mb"] = _peak_memory(row["variant"], seq) - base
            rows.append(row)
    _report(rows)
    by_seq = {}
    for row in rows:
        by_seq.setdefault(row["variant"], {})[row["seq"]] = row["peak_extra_mb"]
    growth = {
        name: sizes[max(sizes)] / max(sizes[min(sizes)], 1.0)
        for name, sizes in by_seq.items()
        if len(sizes) > 1
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": {
            "batch": 1,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "float32",
            "reps": args.reps,
        },
        "load_average_at_end": list(os.getloadavg()),
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "targets_at_8192": {
            "block_sparse_0.1": ">= 5x dense SDPA",
            "window_512": ">= 6x dense SDPA",
        },
        "rows": rows,
        "peak_memory_growth_largest_over_smallest_size": growth,
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
