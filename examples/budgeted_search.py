"""The budgeted search: give attnopt your data and the accuracy you must keep; it measures
candidate plans (padding removal, token merging/pruning, head pruning, windows, bf16 where the
CPU has it) on that data and compiles the fastest one within the budget.

Run: ``.venv/bin/python examples/budgeted_search.py``

Here the real MiniLM, calibrated on 32 real texts (Python documentation), budget: cosine >= 0.98
of every output at real positions; the chosen plan is re-checked on 64 other texts, saved, and
reapplied without calibrating again.
"""

import tempfile
from pathlib import Path

import torch

import attnopt
from attnopt import zoo
from attnopt.zoo.texts import python_docs_texts


def batches(texts: list[str], size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Length-sorted batches padded to 128 tokens, as a tokenizer gives them."""
    tokenizer = zoo.minilm_tokenizer()
    texts = sorted(texts, key=lambda text: len(tokenizer(text)["input_ids"]))
    return [
        dict(
            tokenizer(
                texts[i : i + size],
                padding="max_length",
                max_length=128,
                truncation=True,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), size)
    ]


def main(max_seconds: float = 120.0) -> attnopt.SearchReport:
    """Search, print the Pareto table, save and reapply the plan; returns the search report."""
    model = zoo.get("minilm").build("sdpa")
    texts = python_docs_texts()
    calibration, validation = batches(texts[:32]), batches(texts[32:96])
    cm = attnopt.compile(
        model,
        calibration=calibration,  # your data: error and speed are measured on it
        validation=validation,  # held out: the chosen plan is re-checked on it
        budget=attnopt.Budget(cosine=0.98),
        max_seconds=max_seconds,  # prints a progress bar and the Pareto table (stderr)
    )
    report = cm.search_report
    print("chosen:", cm.plan.pipeline, f"({report.chosen.speedup:.2f}x exact fusion)")
    with tempfile.TemporaryDirectory() as tmp:
        plan = cm.plan.save(Path(tmp) / "plan.json")
        report.save(Path(tmp) / "search.json")  # every plan measured, and the Pareto front
        again = attnopt.compile(model, (), validation[0], plan=plan)  # no search, no calibration
        with torch.no_grad():
            same = all(
                torch.equal(again(**b).last_hidden_state, cm(**b).last_hidden_state)
                for b in validation
            )
    print("the saved plan reapplies with identical outputs:", same)
    return report


if __name__ == "__main__":
    main()
