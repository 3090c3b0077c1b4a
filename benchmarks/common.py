"""Shared harness for the whole-model benchmarks: each (variant, shape) runs in its own
subprocess so that its time, setup time and peak memory are its own.

Entry points: :func:`run_matrix` (parent side), :func:`worker_main` (child side),
:func:`bert_base`, :func:`render`, :func:`openvino_default` (the OpenVINO peer).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def bert_base(impl: str, max_positions: int = 512) -> torch.nn.Module:
    """BERT-base (12 layers, hidden 768, 12 heads), random weights, eval, fp32."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=max_positions, attn_implementation=impl)
    return BertModel(config).eval()


def bert_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Token ids and an all-ones attention mask."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 30000, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def bert_variant(variant: str, batch: int, seq: int, max_positions: int = 512) -> Callable[[], Any]:
    """The zero-argument call of one BERT-base variant (built now).

    Variants: ``hf-eager``, ``hf-sdpa``, ``hf-sdpa+retain-memory`` (HF's sdpa path with the malloc
    tuning attnopt's runtime applies), ``torch.compile`` (of the eager model) and
    ``attnopt-<passes>`` (compiled from the eager model; records ``compile_s``).
    """
    import attnopt

    inputs = bert_inputs(batch, seq)
    if variant == "hf-sdpa+retain-memory":
        from attnopt.runtime.memory import retain_freed_memory

        retain_freed_memory()
    model = bert_base("sdpa" if variant.startswith("hf-sdpa") else "eager", max_positions)
    if variant.startswith("hf-"):
        return lambda: model(**inputs)
    if variant == "torch.compile":
        compiled = torch.compile(model)
        return lambda: compiled(**inputs)
    start = time.perf_counter()
    cm = attnopt.compile(model, (), inputs, passes=variant.removeprefix("attnopt-"))
    TIMINGS["compile_s"] = time.perf_counter() - start
    return lambda: cm(**inputs)


def measure(setup: Callable[[], Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Build, make the first call (both timed: ``setup_s``; the first call alone: ``first_call_s``,
    which for torch.compile is its compilation), then time ``repeats`` calls; peak RSS growth.
    ``setup`` may record ``compile_s`` (capture + compile, without building the model) in
    :data:`TIMINGS`."""
    TIMINGS.clear()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.inference_mode():
        call = setup()
        first = time.perf_counter()
        call()
        setup_s = time.perf_counter() - start
        first_call_s = time.perf_counter() - first
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples.sort()
    return {
        "ms": samples[len(samples) // 2] * 1e3,
        "min_ms": samples[0] * 1e3,
        "setup_s": setup_s,
        "first_call_s": first_call_s,
        "peak_mb": (peak_kb - base_kb) / 1024,
        **TIMINGS,
    }


#: Extra timings a benchmark's setup records (e.g. ``compile_s``).
TIMINGS: dict[str, float] = {}


def worker_main(runner: Callable[[str, dict[str, Any]], dict[str, float]]) -> None:
    """Child side: ``script --worker VARIANT JSON_CONFIG`` prints one JSON line."""
    variant, config = sys.argv[2], json.loads(sys.argv[3])
    print("RESULT " + json.dumps(runner(variant, config)), flush=True)


def run_matrix(
    script: str,
    variants: list[str],
    configs: list[dict[str, Any]],
    timeout: int = 1800,
    *,
    compare_tree: str | None = None,
    compare_variants: tuple[str, ...] = (),
) -> list[dict]:
    """Parent side: run every (config, variant) in a subprocess; collect rows.

    With ``compare_tree`` (another checkout of attnopt, e.g. a ``git worktree`` of an older
    commit), each of ``compare_variants`` also runs from that tree's copy of the same script, so
    it imports that tree's attnopt; its rows are labelled ``variant@tree``. Both run in this one
    matrix, side by side.
    """
    runs: list[tuple[str, str, str]] = [(v, script, v) for v in variants]
    if compare_tree:
        other = str(Path(compare_tree).resolve() / "benchmarks" / Path(script).name)
        label = Path(compare_tree).name
        runs += [(v, other, f"{v}@{label}") for v in compare_variants if v in variants]
    rows = []
    for config in configs:
        for variant, path, label in runs:
            cmd = [sys.executable, path, "--worker", variant, json.dumps(config)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=os.environ
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row: dict[str, Any] = {"variant": label, **config}
            if line is None:
                row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            else:
                row.update(json.loads(line[len("RESULT ") :]))
            rows.append(row)
            print(
                f"  {variant} {config}: {row.get('ms', row.get('error'))}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def render(
    title: str, rows: list[dict], baseline: str, key_fields: list[str], out_name: str
) -> None:
    """Print a rich table (speed-up vs ``baseline`` per config) and write JSON."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("variant", "ms (median)", "vs " + baseline, "compile s", "first call s", "peak MB")
    for column in (*key_fields, *columns):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["variant"] == baseline and all(r[k] == row[k] for k in key_fields)
            ),
            None,
        )
        if "error" in row:
            table.add_row(
                *(str(row[k]) for k in key_fields),
                row["variant"],
                "error: " + row["error"],
                "",
                "",
                "",
            )
            continue
        ratio = f"{base['ms'] / row['ms']:.2f}x" if base and "ms" in base else "-"
        table.add_row(
            *(str(row[k]) for k in key_fields),
            row["variant"],
            f"{row['ms']:.1f}",
            ratio,
            f"{row['compile_s']:.2f}" if "compile_s" in row else "-",
            f"{row['first_call_s']:.2f}",
            f"{row['peak_mb']:.0f}",
        )
    Console(width=140).print(table)
    write_results(out_name, rows)


def write_results(out_name: str, rows: list[dict]) -> None:
    """Write ``rows`` with the machine's description to ``benchmarks/results/out_name``."""
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    (RESULTS / out_name).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def openvino_default(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> Any:
    """OpenVINO's CPU plugin on ``model`` at its default precision, or None when not installed."""
    try:
        import openvino
    except ImportError:
        return None
    converted = openvino.convert_model(model, example_input=example)
    compiled = openvino.Core().compile_model(converted, "CPU")
    names = [port.get_any_name() for port in compiled.inputs]

    def call(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        result = compiled({name: batch[name].numpy() for name in names})
        return torch.from_numpy(result[compiled.outputs[0]])

    return call
