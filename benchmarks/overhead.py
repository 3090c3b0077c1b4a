"""Runtime overhead of attnopt with passes="none" against eager, on BERT-base (random weights).

Side by side in one run: HF eager, HF sdpa, torch.compile (of the eager model) and attnopt with
passes="none" (same ops as eager, run by the generated program) and passes="exact".
Shapes: seq 128 batch 1 and seq 512 batch 8. Prints a table, writes
benchmarks/results/overhead.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/overhead.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    bert_variant,
    measure,
    render,
    run_matrix,
    worker_main,
)

VARIANTS = ["hf-eager", "hf-sdpa", "torch.compile", "attnopt-none", "attnopt-exact"]


def run(variant: str, config: dict) -> dict:
    """Build and time one variant."""
    return measure(
        lambda: bert_variant(variant, config["batch"], config["seq"], max_positions=512),
        config["repeats"],
    )


def main() -> None:
    """Run the matrix and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    ns = parser.parse_args()
    configs = [
        {"seq": 128, "batch": 1, "repeats": ns.repeats},
        {"seq": 512, "batch": 8, "repeats": max(2, ns.repeats // 2)},
    ]
    rows = run_matrix(__file__, ns.variants, configs)
    render(
        "BERT-base, CPU fp32: attnopt runtime overhead",
        rows,
        "hf-eager",
        ["seq", "batch"],
        "overhead.json",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run)
    else:
        main()
