"""Packed documents on CPU: dense SDPA with the block-diagonal document mask vs the varlen kernel.

Run: ``.venv/bin/python benchmarks/documents.py [--reps 5] [--cases documents padding]
[--threads N]``.

Cases (fp32):

- ``documents``: 8 documents of 512 tokens packed into one 4096-token sequence, B=1, 12 heads,
  head_dim 64. Dense SDPA gets the explicit ``[4096, 4096]`` bool mask (block-diagonal, and
  causal in the second pair of rows); :func:`document_attention_cpu` gets the segment ids and
  runs one batched flash call over the 8 runs (``8 * 512**2`` scores instead of ``4096**2``).
- ``padding``: padding removal, 32 sequences of 10..256 tokens (seeded), 12 heads, head_dim 32.
  Dense SDPA over the padded ``[32, 12, 256, 32]`` batch with the key padding mask vs
  :func:`varlen_attention` on the packed tokens (packed once beforehand, as a model packs once
  for all its layers; the pack itself is not timed): runs of close lengths bucketed into a few
  padded SDPA calls (the default), and one call per distinct length (``buckets=None``, 32 calls).

Times come from one process that runs the variants of a case round-robin (a busy machine slows
them alike), ``--reps`` rounds after a warm-up round; the table shows the median and the speed-up
of the medians over the case's dense row of the same causality, and the largest absolute
difference to it. On a machine that other processes keep busy, many short flash calls suffer more
than one long one (each call waits for its slowest OpenMP thread): ``--threads 1`` compares the
work alone. Writes ``benchmarks/results/documents.json``. Asserts nothing: the target
(``documents``: at least 5x faster than dense masked SDPA) is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnopt.runtime.cpu.varlen import (  # noqa: E402
    document_attention_cpu,
    pack_offsets,
    varlen_attention,
)
from benchmarks.common import write_results  # noqa: E402

DOCUMENTS, DOC_LEN, HEADS, HEAD_DIM = 8, 512, 12, 64
PAD_BATCH, PAD_SEQ, PAD_HEAD_DIM = 32, 256, 32

#: case -> variant -> (description, causal). The dense row of each causality is the baseline.
VARIANTS: dict[str, dict[str, tuple[str, bool]]] = {
    "documents": {
        "dense_sdpa": ("dense SDPA, block-diagonal bool mask", False),
        "document_attention": ("document_attention_cpu (varlen)", False),
        "attnopt_compile": ("attnopt.compile of SDPA with seg[:, :, None] == seg[:, None]", False),
        "dense_sdpa_causal": ("dense SDPA, block-diagonal & causal bool mask", True),
        "document_attention_causal": ("document_attention_cpu causal (varlen)", True),
        "attnopt_compile_causal": ("attnopt.compile of the same & an arange causal mask", True),
    },
    "padding": {
        "padded_sdpa": ("dense SDPA on the padded batch, key padding mask", False),
        "varlen": ("varlen_attention on the packed tokens (buckets)", False),
        "varlen_per_length": ("varlen_attention, one SDPA call per length", False),
    },
}


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _documents_runners() -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    seq = DOCUMENTS * DOC_LEN
    q, k, v = (_randn(1, HEADS, seq, HEAD_DIM, gen=gen) for _ in range(3))
    segments = (torch.arange(seq) // DOC_LEN)[None]
    block_diagonal = segments[0, :, None] == segments[0, None, :]
    block_causal = block_diagonal & torch.ones(seq, seq, dtype=torch.bool).tril()
    scale = HEAD_DIM**-0.5

    def sdpa(mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def documents(causal: bool) -> Callable[[], torch.Tensor]:
        return lambda: document_attention_cpu(q, k, v, segments, scale=scale, causal=causal)

    compiled = {causal: _compiled_documents(q, k, v, segments, causal) for causal in (False, True)}
    return {
        "attnopt_compile": compiled[False],
        "attnopt_compile_causal": compiled[True],
        "dense_sdpa": sdpa(block_diagonal),
        "document_attention": documents(False),
        "dense_sdpa_causal": sdpa(block_causal),
        "document_attention_causal": documents(True),
    }


class _DocumentAttention(torch.nn.Module):
    """SDPA under the document mask a user writes from segment ids (and causality)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, seg):  # noqa: ANN001, ANN201 - a benchmark module
        mask = seg[:, :, None] == seg[:, None, :]
        if self.causal:
            pos = torch.arange(seg.shape[1])
            mask = mask & (pos[None, :] <= pos[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


def _compiled_documents(q, k, v, segments, causal):  # noqa: ANN001, ANN202
    import attnopt

    cm = attnopt.compile(_DocumentAttention(causal).eval(), (q, k, v, segments))
    kinds = {site.mask_kind for site in cm.sites}
    print(f"attnopt.compile (causal={causal}): mask kinds {sorted(kinds)}, mode {cm.stats['mode']}")
    return lambda: cm(q, k, v, segments)


def _padding_runners() -> tuple[
    dict[str, Callable[[], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]
]:
    """The case's runners and the pack of a padded output (outputs are compared packed)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, PAD_SEQ + 1, (PAD_BATCH,), generator=gen)
    valid = torch.arange(PAD_SEQ)[None, :] < lengths[:, None]
    q, k, v = (_randn(PAD_BATCH, HEADS, PAD_SEQ, PAD_HEAD_DIM, gen=gen) for _ in range(3))
    indices, offsets = pack_offsets(valid)

    def pack(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [H, N, D]
        return t.transpose(1, 2).flatten(0, 1)[indices].transpose(0, 1)

    packed = [pack(t) for t in (q, k, v)]
    key_mask = valid[:, None, None, :]
    scale = PAD_HEAD_DIM**-0.5

    return {
        "padded_sdpa": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, scale=scale
        ),
        "varlen": lambda: varlen_attention(*packed, offsets, scale=scale),
        "varlen_per_length": lambda: varlen_attention(*packed, offsets, scale=scale, buckets=None),
    }, pack


def _same_layout(
    output: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """A padded ``[B, H, S, Dv]`` output packed like varlen's ``[H, N, Dv]`` (for the diff)."""
    return pack(output) if pack is not None and output.dim() == 4 else output


def _time_case(case: str, reps: int) -> list[dict]:
    runners, pack = (_documents_runners(), None) if case == "documents" else _padding_runners()
    variants = VARIANTS[case]
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        outputs = {name: _same_layout(run(), pack) for name, run in runners.items()}  # warm-up
        for _ in range(reps):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    baselines = {
        causal: name
        for name, (_, causal) in reversed(list(variants.items()))
        if name.startswith(("dense", "padded"))
    }
    rows = []
    for name in runners:
        base = baselines[variants[name][1]]
        ms = 1e3 * statistics.median(times[name])
        base_ms = 1e3 * statistics.median(times[base])
        rows.append(
            {
                "case": case,
                "variant": name,
                "causal": variants[name][1],
                "ms": ms,
                "ms_min": 1e3 * min(times[name]),
                "baseline": base,
                "speedup": base_ms / ms,
                "speedup_of_minima": min(times[base]) / min(times[name]),
                "max_abs_diff": (outputs[name] - outputs[base]).abs().max().item(),
            }
        )
    return rows


def _report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"document / varlen attention, CPU fp32, {torch.get_num_threads()} threads")
    for column in ("case", "variant", "ms (median)", "vs dense", "max |diff|"):
        table.add_column(column, justify="left" if column in ("case", "variant") else "right")
    for row in rows:
        table.add_row(
            row["case"],
            VARIANTS[row["case"]][row["variant"]][0],
            f"{row['ms']:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['max_abs_diff']:.1e}",
        )
    Console(width=120).print(table)


def main() -> None:
    """Time the chosen cases, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for case in args.cases for row in _time_case(case, args.reps)]
    _report(rows)
    for row in rows:
        row["load_average_at_end"] = list(os.getloadavg())
    write_results("documents.json", rows)
    print("wrote benchmarks/results/documents.json")


if __name__ == "__main__":
    main()
