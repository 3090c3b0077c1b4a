"""One attention layer: eager, SDPA, torch.compile and attnopt (linear / hybrid), side by side.

The layer is ``softmax(q k^T / sqrt(d)) v``: written out (``eager``), as one SDPA call (``sdpa``),
SDPA under ``torch.compile``, and SDPA compiled by ``attnopt.compile`` with the ``linearize`` pass
(elu+1 linear, and the hybrid with a softmax window of 256: what a user runs; ``attnopt.compile``
also applies its malloc tuning, see ``attnopt.runtime.memory``). The kernels are also called
directly (``linear_elu``, ``favor_256``, ``hybrid_*``: no compile, no malloc tuning).
B=1, H=12, d=64, fp32, N in (4096, 8192), non-causal (``--causal`` adds the causal forms), at
torch's default thread count (``--threads 1 2`` runs each count). Each variant runs in its own
subprocess so its peak memory (``ru_maxrss`` after the runs minus after building the inputs) is
its own; times are medians of a few runs after one warm-up; the load average is recorded because
a busy machine slows many-op kernels more than one fused SDPA call. Prints a rich table and writes
``benchmarks/results/linear_layer.json``. Asserts nothing.

Run: ``.venv/bin/python benchmarks/linear_layer.py [--sizes 4096 8192] [--causal] [--threads 1 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
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
from rich.console import Console
from rich.table import Table

import attnopt
from attnopt.ir.linear_attention import make_feature_map
from attnopt.runtime.cpu.hybrid import hybrid_attention
from attnopt.runtime.cpu.linear import linear_attention

HEADS, HEAD_DIM, WINDOW, FAVOR_FEATURES = 12, 64, 256, 256
RESULTS = Path(__file__).resolve().parent / "results" / "linear_layer.json"


def _variants(causal: bool) -> dict[str, str]:
    """Variant name -> description (in table order)."""
    names = {
        "eager": "dense softmax(q k^T / sqrt(d)) v, as eager model code writes it",
        "sdpa": "dense F.scaled_dot_product_attention",
        "torch_compile": "torch.compile of the SDPA layer (inductor, first call excluded)",
        "attnopt_linear_elu": "attnopt.compile of the SDPA layer, linearize{feature_map=elu}",
        "attnopt_hybrid_elu_w256": (
            f"attnopt.compile of the SDPA layer, linearize{{feature_map=elu,local_window={WINDOW}}}"
        ),
        "linear_elu": "linear attention, elu+1",
        "favor_256": f"linear attention, FAVOR+ {FAVOR_FEATURES} features",
        "hybrid_elu_w256": f"hybrid: softmax window {WINDOW} + elu+1 linear",
        "hybrid_favor_w256": f"hybrid: softmax window {WINDOW} + FAVOR+ linear",
    }
    if causal:
        names |= {f"{name}_causal": f"{text}, causal" for name, text in names.items()}
    return names


class _Layer(torch.nn.Module):
    """The attention layer as model code writes it: SDPA, or explicit softmax (``eager``)."""

    def __init__(self, causal: bool, explicit: bool = False) -> None:
        super().__init__()
        self.causal, self.explicit = causal, explicit

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if self.causal:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def _make_call(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The zero-argument callable that runs ``variant`` once."""
    causal = variant.endswith("_causal")
    base = variant.removesuffix("_causal")
    if base == "eager":
        layer = _Layer(causal, explicit=True)
        return lambda: layer(q, k, v)
    if base == "torch_compile":
        compiled = torch.compile(_Layer(causal))
        return lambda: compiled(q, k, v)
    if base.startswith("attnopt_"):
        options = "feature_map=elu" + (f",local_window={WINDOW}" if "hybrid" in base else "")
        cm = attnopt.compile(
            _Layer(causal).eval(), (q, k, v), passes=f"fuse-attention,linearize{{{options}}}"
        )
        return lambda: cm(q, k, v)
    elu = make_feature_map("elu", HEAD_DIM)
    favor = make_feature_map("favor", HEAD_DIM, num_features=FAVOR_FEATURES, seed=0)
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "linear_elu": lambda: linear_attention(q, k, v, elu, causal=causal),
        "favor_256": lambda: linear_attention(q, k, v, favor, causal=causal),
        "hybrid_elu_w256": lambda: hybrid_attention(q, k, v, elu, window=WINDOW, causal=causal),
        "hybrid_favor_w256": lambda: hybrid_attention(q, k, v, favor, window=WINDOW, causal=causal),
    }
    return calls[base]


def _worker(variant: str, seq_len: int, repeats: int, threads: int) -> dict:
    """Time one variant in this process; report median ms and peak memory growth."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM) for _ in range(3))
    call = _make_call(variant, q, k, v)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "seq_len": seq_len,
        "threads": threads,
        "load_average_1min": os.getloadavg()[0],
        "median_ms": statistics.median(times),
        "times_ms": times,
        "peak_extra_mb": (peak_kb - baseline_kb) / 1024,
        "peak_rss_mb": peak_kb / 1024,
    }


def _run_subprocess(variant: str, seq_len: int, repeats: int, threads: int) -> dict:
    """Run :func:`_worker` in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, __file__, "--worker", variant, str(seq_len), str(repeats)]
    command.append(str(threads))
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> Table:
    """The results as a rich table (speed-ups against SDPA of the same threads, N, causality)."""
    dense = {(r["threads"], r["seq_len"], r["variant"].endswith("_causal")): r["median_ms"]
             for r in rows if r["variant"].startswith("sdpa")}  # fmt: skip
    table = Table(title=f"One attention layer, B=1 H={HEADS} d={HEAD_DIM} fp32 (CPU)")
    for column in ("threads", "N", "variant", "median ms", "vs SDPA", "peak extra MB", "load"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        key = (row["threads"], row["seq_len"], row["variant"].endswith("_causal"))
        row["speedup_vs_sdpa"] = dense[key] / row["median_ms"]
        table.add_row(
            str(row["threads"]),
            str(row["seq_len"]),
            row["variant"],
            f"{row['median_ms']:.1f}",
            f"{row['speedup_vs_sdpa']:.1f}x",
            f"{row['peak_extra_mb']:.0f}",
            f"{row['load_average_1min']:.1f}",
        )
    return table


def main(argv: list[str] | None = None) -> None:
    """Run every variant at every size, print the table, write the JSON results.

    Args:
        argv: command line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--causal", action="store_true", help="also run the causal forms")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--show", action="store_true", help="print the saved results, run nothing")
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "N", "REPEATS", "THREADS"))
    args = parser.parse_args(argv)
    if args.worker:
        variant, seq_len, repeats, threads = args.worker
        print(json.dumps(_worker(variant, int(seq_len), int(repeats), int(threads))))
        return
    console = Console(width=110)
    if args.show:
        console.print(_table(json.loads(RESULTS.read_text())["results"]))
        return
    variants = _variants(args.causal)
    console.print("variants: " + "; ".join(f"{name} = {text}" for name, text in variants.items()))
    rows = []
    for threads in args.threads:
        for seq_len in args.sizes:
            for variant in variants:
                dense = variant.startswith(("sdpa", "eager", "torch_compile"))
                repeats = 3 if dense else args.repeats
                rows.append(_run_subprocess(variant, seq_len, repeats, threads))
                console.log(
                    f"threads={threads} N={seq_len} {variant}: {rows[-1]['median_ms']:.1f} ms"
                )
    console.print(_table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "default_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "window": WINDOW,
        "favor_features": FAVOR_FEATURES,
        "variants": variants,
    }
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
