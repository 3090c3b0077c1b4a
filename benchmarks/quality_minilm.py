"""Quality of lossy passes on the real MiniLM (all-MiniLM-L6-v2): cosine of sentence embeddings
against the original model, measured with attnopt.validate, for sliding windows, block-sparse
densities, and linearization (full, hybrid, selective 2 of 6 and 4 of 6 layers).

The texts are 16 paragraphs of six of the demo's sentences each (about 100 tokens).
Sentence embeddings are the mean of
the last hidden state over real tokens, L2-normalised, as sentence-transformers computes them.
Prints a table and writes benchmarks/results/quality_minilm.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/quality_minilm.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
FUSE = "canonicalize,fuse-attention,"
PIPELINES = {
    "exact": "exact",
    "sliding-window 8": FUSE + "sliding-window{window=8}",
    "sliding-window 8 + 4 sinks": FUSE + "sliding-window{window=8,sinks=4}",
    "sliding-window 16 + 4 sinks": FUSE + "sliding-window{window=16,sinks=4}",
    "sliding-window 32 + 4 sinks": FUSE + "sliding-window{window=32,sinks=4}",
    "block-sparse 16, density 0.25": FUSE + "block-sparse{block=16,density=0.25}",
    "block-sparse 16, density 0.5": FUSE + "block-sparse{block=16,density=0.5}",
    "block-sparse 16, threshold 0.9": FUSE
    + "block-sparse{block=16,threshold=0.9,routing=threshold}",
    "block-sparse 16, static 0.5": FUSE + "block-sparse{block=16,density=0.5,routing=static}",
    "linear elu (6/6)": FUSE + "linearize",
    "linear favor 256 (6/6)": FUSE + "linearize{feature_map=favor,num_features=256}",
    "hybrid elu w16 (6/6)": FUSE + "linearize{local_window=16}",
    "hybrid favor w16 (6/6)": FUSE
    + "linearize{feature_map=favor,num_features=256,local_window=16}",
    "selective hybrid favor w16, 2 of 6": FUSE
    + "linearize{feature_map=favor,num_features=256,local_window=16,count=2}",
    "selective hybrid favor w16, 4 of 6": FUSE
    + "linearize{feature_map=favor,num_features=256,local_window=16,count=4}",
    "selective linear elu, 2 of 6": FUSE + "linearize{count=2}",
    "selective linear elu, 4 of 6": FUSE + "linearize{count=4}",
}


def main() -> None:
    """Compile every pipeline, validate it, print and save the table."""
    from rich.console import Console
    from rich.table import Table

    import attnopt
    from attnopt import zoo
    from attnopt.demo import TEXTS

    model = zoo.get("minilm").build("eager")
    paragraphs = [" ".join((TEXTS * 2)[i : i + 6]) for i in range(0, len(TEXTS), 2)]
    batch = dict(zoo.minilm_tokenizer()(paragraphs, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].unsqueeze(-1).float()

    class Embedder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            hidden = self.inner(**kw).last_hidden_state
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            return torch.nn.functional.normalize(pooled, dim=-1)

    reference = Embedder(model)
    rows = []
    for label, pipeline in PIPELINES.items():
        compiled = attnopt.compile(model, (), batch, passes=pipeline, calibration=[((), batch)])
        report = attnopt.validate(
            reference,
            Embedder(compiled),
            (),
            batch,
            tolerance=attnopt.Budget(cosine=0.99),
            sites=False,
        )
        with torch.no_grad():
            ours, ref = Embedder(compiled)(**batch), reference(**batch)
        per_sentence = (ours * ref).sum(-1)
        rows.append(
            {
                "pipeline": label,
                "text": pipeline,
                "mean_cosine": float(per_sentence.mean()),
                "min_cosine": float(per_sentence.min()),
                "sqnr_db": float(report.metrics["0"]["sqnr_db"]) if "0" in report.metrics else None,
                "variants": [s.variant for s in compiled.sites],
                "kept_fraction": sum(s.kept_fraction for s in compiled.sites) / len(compiled.sites),
            }
        )
    table = Table(
        title=f"all-MiniLM-L6-v2, {len(paragraphs)} paragraphs ({batch['input_ids'].shape[1]} tokens): "
        "cosine of sentence embeddings vs the original"
    )
    for column in ("pipeline", "mean cosine", "min cosine", "pairs kept", "sites"):
        table.add_column(column, justify="left" if column in ("pipeline", "sites") else "right")
    for row in rows:
        table.add_row(
            row["pipeline"],
            f"{row['mean_cosine']:.5f}",
            f"{row['min_cosine']:.5f}",
            f"{row['kept_fraction']:.2f}",
            ",".join(v[:6] for v in row["variants"]),
        )
    Console(width=140).print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality_minilm.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
