"""The runtime's ``linear`` kernel: torch's ``F.linear`` (MKL sgemm) against oneDNN, CPU fp32.

Transformer projection shapes (BERT-base: 768 -> 768, 768 -> 3072, 3072 -> 768) at 1 to 4096
rows, plus a prepacked-weight oneDNN row (what a frozen graph could use; the runtime does not,
since a packed copy would go stale when the model's weights change). Medians of several calls
after a warm-up; the largest absolute difference to ``F.linear`` is reported. Prints a rich table
and writes ``benchmarks/results/dense_linear.json``. Asserts nothing.

Run: ``.venv/bin/python benchmarks/dense_linear.py [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from attnopt.runtime.cpu.projection import linear, onednn_linear_available
from attnopt.runtime.memory import retain_freed_memory

RESULTS = Path(__file__).resolve().parent / "results" / "dense_linear.json"
SHAPES = [(768, 768), (768, 3072), (3072, 768)]
ROWS = [1, 17, 128, 512, 2048, 4096]


def _median_ms(fn, inputs: tuple, repeats: int) -> float:
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Time every shape, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    retain_freed_memory()  # as attnopt.compile does; both kernels get it
    console = Console(width=110)
    if not onednn_linear_available():
        console.print("oneDNN linear is not available in this torch build: nothing to compare")
        return
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for m in ROWS:
            for k, n in SHAPES:
                x, w, b = torch.randn(m, k), torch.randn(n, k) * k**-0.5, torch.randn(n)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
                mkl = _median_ms(F.linear, (x, w, b), args.repeats)
                onednn = _median_ms(linear, (x, w, b), args.repeats)
                pointwise = torch.ops.mkldnn._linear_pointwise
                prepacked = _median_ms(pointwise, (x, packed, b, "none", [], ""), args.repeats)
                diff = (linear(x, w, b) - F.linear(x, w, b)).abs().max().item()
                rows.append({"rows": m, "in": k, "out": n, "mkl_ms": mkl, "onednn_ms": onednn,
                             "onednn_prepacked_ms": prepacked, "max_abs_diff": diff})  # fmt: skip
    table = Table(
        title="linear, CPU fp32: F.linear (MKL) vs attnopt.runtime.cpu.projection.linear (oneDNN)"
    )
    for column in ("rows", "in -> out", "F.linear ms", "oneDNN ms", "speed-up", "prepacked ms",
                   "max |diff|"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["rows"]),
            f"{row['in']} -> {row['out']}",
            f"{row['mkl_ms']:.3f}",
            f"{row['onednn_ms']:.3f}",
            f"{row['mkl_ms'] / row['onednn_ms']:.2f}x",
            f"{row['onednn_prepacked_ms']:.3f}",
            f"{row['max_abs_diff']:.1e}",
        )
    console.print(table)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
