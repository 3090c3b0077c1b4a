"""Linearization on CPU: one layer (B=1, H=12, d=64, fp32, N=8192) side by side with dense SDPA,
then the quality of linearised MiniLM.

Runs ``linear_layer.py`` (dense SDPA vs elu+1 linear vs FAVOR+ vs hybrid window 256: time and
peak memory per variant, benchmarks/results/linear_layer.json) and, with ``--quality``,
``quality_minilm.py`` (cosine of sentence embeddings for full, hybrid and selective
linearization, benchmarks/results/quality_minilm.json). Asserts nothing.

Run: ``.venv/bin/python benchmarks/linear.py [--quality]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Run the parts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quality", action="store_true", help="also the MiniLM quality table")
    ns, rest = parser.parse_known_args()
    subprocess.run([sys.executable, str(HERE / "linear_layer.py"), *rest], check=False)
    if ns.quality:
        subprocess.run([sys.executable, str(HERE / "quality_minilm.py")], check=False)


if __name__ == "__main__":
    main()
