"""One decode step's attention on the CPU: Hugging Face's SDPA path against attnopt's decode kernel.

LLaMA-style config (hidden 1024, 16 query heads, 4 KV heads, head_dim 64), one new token (``Sq = 1``)
against a cache of 1024 / 4096 / 8192 tokens, batch 1 and 4, fp32. Per layer, the time of the
attention call alone (projections, rotary and the cache update are the same for everyone):

- ``hf_sdpa``: ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` called as a
  LLaMA layer calls it in ``generate`` with its default dynamic cache: K/V exactly the cache length,
  contiguous, and no mask (transformers drops the mask of an unpadded decode step), so it runs
  SDPA with ``enable_gqa``.
- ``hf_sdpa_masked``: the same with a bool key-padding mask (left-padded batches, or a static
  cache): transformers then packs the query group of each KV head (``pack_gqa``).
- ``dense``: attnopt's dense CPU kernel (:func:`attnopt.runtime.cpu.dense.dense_attention_cpu`).
- ``attnopt_decode``: :func:`attnopt.runtime.cpu.decode.decode_attention_cpu` on
  ``cache[:, :, :length]`` views of a preallocated static cache (what a compiled decode step
  passes), without a mask; ``attnopt_decode_masked`` with the same key-padding mask.

Each sample runs one call per layer over ``--layers`` distinct caches (a decode step touches every
layer's cache once, so nothing stays warm in the caches between calls of one layer), and the
variants are interleaved sample by sample, so load from other processes hits them alike. The
table reports the median per-layer time and the speed-up of each variant over ``hf_sdpa``; JSON
goes to ``benchmarks/results/decode.json``. It asserts nothing.

Usage: ``.venv/bin/python benchmarks/decode.py [--repeats N] [--layers N] [--lengths 1024 4096 8192]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnopt.runtime.cpu.decode import decode_attention_cpu, decode_splits  # noqa: E402
from attnopt.runtime.cpu.dense import dense_attention_cpu  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

HIDDEN, HEADS, KV_HEADS = 1024, 16, 4
HEAD_DIM = HIDDEN // HEADS
SCALE = HEAD_DIM**-0.5
#: Spare static-cache slots beyond the current length (the cache is preallocated).
SPARE = 128
VARIANTS = ("hf_sdpa", "hf_sdpa_masked", "dense", "attnopt_decode", "attnopt_decode_masked")


def _layer_calls(batch: int, length: int, layers: int) -> dict[str, Callable[[], None]]:
    """For each variant, a function running one decode step's attention over every layer."""
    generator = torch.Generator().manual_seed(length + batch)
    module = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    cache_shape = (batch, KV_HEADS, length + SPARE, HEAD_DIM)
    static = [
        (
            torch.randn(cache_shape, generator=generator),
            torch.randn(cache_shape, generator=generator),
        )
        for _ in range(layers)
    ]
    views = [(k[:, :, :length], v[:, :, :length]) for k, v in static]
    dynamic = [(k.contiguous(), v.contiguous()) for k, v in views]  # HF's cat-grown cache
    queries = [torch.randn(batch, HEADS, 1, HEAD_DIM, generator=generator) for _ in range(layers)]
    padding = torch.ones(batch, 1, 1, length, dtype=torch.bool)

    def hf(mask: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            for q, (k, v) in zip(queries, dynamic):
                sdpa_attention_forward(module, q, k, v, mask, scaling=SCALE)

        return run

    def dense() -> None:
        for q, (k, v) in zip(queries, views):
            dense_attention_cpu(q, k, v, scale=SCALE)

    def decode(mask: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            for q, (k, v) in zip(queries, views):
                decode_attention_cpu(q, k, v, mask=mask, scale=SCALE)

        return run

    return {
        "hf_sdpa": hf(None),
        "hf_sdpa_masked": hf(padding),
        "dense": dense,
        "attnopt_decode": decode(None),
        "attnopt_decode_masked": decode(padding),
    }


def _time(calls: dict[str, Callable[[], None]], repeats: int, layers: int) -> dict[str, dict]:
    """Interleaved samples; per-layer median and minimum in milliseconds."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1e3 / layers)
    return {
        name: {"ms": statistics.median(times), "min_ms": min(times)}
        for name, times in samples.items()
    }


def main() -> None:
    """Time every (batch, length, variant), print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="interleaved samples per variant")
    parser.add_argument("--layers", type=int, default=4, help="distinct layer caches per sample")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            calls = _layer_calls(batch, length, args.layers)
            timings = _time(calls, args.repeats, args.layers)
            base = timings["hf_sdpa"]["ms"]
            splits = decode_splits(batch * KV_HEADS, length)
            for name in VARIANTS:
                rows.append(
                    {
                        "variant": name,
                        "batch": batch,
                        "cache_len": length,
                        **timings[name],
                        "vs_hf_sdpa": base / timings[name]["ms"],
                        "splits": splits if name.startswith("attnopt_decode") else None,
                    }
                )
            print(f"  batch {batch} cache {length}: done", flush=True)
    table = Table(
        title=f"Decode-step attention per layer (hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} KV "
        f"heads, Sq=1, fp32, {torch.get_num_threads()} threads)"
    )
    for column in ("batch", "cache", "variant", "ms (median)", "ms (min)", "vs hf_sdpa"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        table.add_row(
            str(row["batch"]), str(row["cache_len"]), row["variant"], f"{row['ms']:.3f}",
            f"{row['min_ms']:.3f}", f"{row['vs_hf_sdpa']:.2f}x",
        )  # fmt: skip
    Console(width=120).print(table)
    write_results("decode.json", rows)


if __name__ == "__main__":
    main()
