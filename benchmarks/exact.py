"""Exact attention fusion on BERT-base (random weights, max_position_embeddings=2048), CPU fp32.

Side by side in one run: HF "eager", HF "sdpa", torch.compile of the eager model, and attnopt
passes="exact" compiled from the eager model; batch 1, seq 512 and 2048. attnopt's runtime tunes
glibc malloc to keep freed activations mapped (attnopt.runtime.memory); the row
"hf-sdpa+retain-memory" gives HF's sdpa path the same tuning so the two can be compared fairly. Time is the median of a
few calls; setup is capture+compile including the first call; peak MB is the growth of the
process's peak RSS. Prints a table, writes benchmarks/results/exact.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/exact.py [--repeats 3] [--compare-tree ../attnopt-old]``
(``--compare-tree``: also run attnopt-exact from another checkout, e.g. ``git worktree add
../attnopt-old <commit>``, side by side in the same run).
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

VARIANTS = ["hf-eager", "hf-sdpa", "hf-sdpa+retain-memory", "torch.compile", "attnopt-exact"]


def run(variant: str, config: dict) -> dict:
    """Build and time one variant."""
    return measure(
        lambda: bert_variant(variant, config["batch"], config["seq"], max_positions=2048),
        config["repeats"],
    )


def main() -> None:
    """Run the matrix and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seqs", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument(
        "--compare-tree",
        default=None,
        help="another attnopt checkout (e.g. a git worktree of an older commit): its "
        "attnopt-exact runs too, in the same matrix",
    )
    ns = parser.parse_args()
    configs = [{"seq": s, "batch": 1, "repeats": ns.repeats} for s in ns.seqs]
    rows = run_matrix(
        __file__,
        ns.variants,
        configs,
        compare_tree=ns.compare_tree,
        compare_variants=("attnopt-exact",),
    )
    render(
        "BERT-base (HF eager model), CPU fp32: exact attention fusion",
        rows,
        "hf-eager",
        ["seq", "batch"],
        "exact.json",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run)
    else:
        main()
