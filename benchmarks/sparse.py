"""Sparsification on CPU: one layer (via sparse_layer.py) and a whole LLaMA-style model.

Whole model: LlamaModel (random weights, hidden 512, 8 layers, 8 heads, no padding, fp32) at
``--seq`` tokens (8192 by default), side by side in one run: HF eager, HF sdpa, torch.compile of
the eager model, attnopt exact (dense) and attnopt with SlidingWindow(1024, sinks=4). Each variant
runs in its own subprocess (time = median, setup = capture/compile + first call, peak MB = growth
of peak RSS). Prints tables and writes benchmarks/results/sparse_model.json (and the layer part's
sparse_layer.json). Asserts nothing.

Run: ``.venv/bin/python benchmarks/sparse.py [--part all|layer|model] [--seq 8192]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import TIMINGS, measure, render, run_matrix, worker_main  # noqa: E402

VARIANTS = ["hf-eager", "hf-sdpa", "torch.compile", "attnopt-exact", "attnopt-window1024-sinks4"]
WINDOW = "canonicalize,fuse-attention,sliding-window{window=1024,sinks=4}"


def llama(impl: str, seq: int):
    """The LLaMA-style model of this benchmark."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=max(seq, 2048),
        use_cache=False,
        attn_implementation=impl,
    )
    return LlamaModel(config).eval()


def run(variant: str, config: dict) -> dict:
    """Build and time one variant."""
    import torch

    import attnopt

    seq = config["seq"]
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(0))

    def setup():
        model = llama("sdpa" if variant == "hf-sdpa" else "eager", seq)
        if variant in ("hf-eager", "hf-sdpa"):
            return lambda: model(input_ids=ids)
        if variant == "torch.compile":
            compiled = torch.compile(model)
            return lambda: compiled(input_ids=ids)
        passes = "exact" if variant == "attnopt-exact" else WINDOW
        start = time.perf_counter()
        cm = attnopt.compile(model, (), {"input_ids": ids}, passes=passes)
        TIMINGS["compile_s"] = time.perf_counter() - start
        return lambda: cm(input_ids=ids)

    return measure(setup, config["repeats"])


def main() -> None:
    """Run the requested parts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["all", "layer", "model"], default="all")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    ns = parser.parse_args()
    if ns.part in ("all", "layer"):
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("sparse_layer.py"))], check=False
        )
    if ns.part in ("all", "model"):
        rows = run_matrix(
            __file__,
            ns.variants,
            [{"seq": ns.seq, "batch": 1, "repeats": ns.repeats}],
            timeout=3600,
        )
        render(
            f"LLaMA-style model (hidden 512, 8 layers), seq {ns.seq}, CPU fp32: sliding window",
            rows,
            "hf-eager",
            ["seq", "batch"],
            "sparse_model.json",
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run)
    else:
        main()
