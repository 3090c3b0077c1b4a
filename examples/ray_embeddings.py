"""Embed a corpus with Ray Data on local workers, every worker running the plan compiled once on
the driver.

The driver compiles the real all-MiniLM-L6-v2 once, with head pruning calibrated on one batch of
real sentences, and hands the compiled module to ``map_batches``. A ``CompiledModule`` pickles as
(model, plan JSON, options), never a generated program or kernel: each worker compiles on its
first batch by replaying the plan (the same heads pruned, no calibration data), then embeds its
share of the corpus at whatever batch size and padded length arrives.

Run: ``.venv/bin/python examples/ray_embeddings.py [--sentences 256] [--workers 2]`` (needs the
``ray`` extra: ``pip install -e ".[ray]"``; starts a local Ray, no cluster).
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import numpy as np
import torch

import attnopt
from attnopt import zoo

PIPELINE = "canonicalize,fuse-attention,head-prune{keep=0.75}"
SUBJECTS = ("The compiler", "A small model", "Every worker", "The new kernel", "Our benchmark")
VERBS = ("runs", "embeds", "prunes", "replays", "measures")
OBJECTS = (
    "the attention heads",
    "a long list of sentences that grows with every batch",
    "one plan",
    "the same outputs at any length, batch size or worker, without calibrating again",
    "text",
)


def corpus(count: int) -> list[str]:
    """``count`` sentences of varied lengths (deterministic)."""
    combos = itertools.cycle(itertools.product(SUBJECTS, VERBS, OBJECTS))
    return [f"{s} {v} {o} ({i})." for i, (s, v, o) in zip(range(count), combos)]


def encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize, padded to a multiple of 16 tokens (few distinct shapes, little padding)."""
    enc = tokenizer(
        texts,
        padding=True,
        pad_to_multiple_of=16,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    return {name: enc[name] for name in ("input_ids", "attention_mask", "token_type_ids")}


def embed(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's recipe)."""
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


class Embedder:
    """A Ray Data worker: holds the shipped CompiledModule and embeds batches of text."""

    def __init__(self, compiled: attnopt.CompiledModule):
        torch.set_num_threads(1)  # one Ray CPU per worker
        self.compiled = compiled
        self.tokenizer = zoo.minilm_tokenizer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(text) for text in batch["text"]]
        embeddings = embed(self.compiled, encode(self.tokenizer, texts))
        compilations = self.compiled.stats["compilations"]
        return {
            "text": batch["text"],
            "embedding": embeddings,
            "compilations": np.full(len(texts), compilations),
        }


def compile_on_driver() -> attnopt.CompiledModule:
    """MiniLM with head pruning calibrated once, on one batch of the corpus."""
    model = zoo.get("minilm").build("eager")
    example = encode(zoo.minilm_tokenizer(), corpus(32))
    return attnopt.compile(model, kwargs=example, passes=PIPELINE, calibration=[((), example)])


def main(sentences: int = 256, workers: int = 2, batch_size: int = 32) -> dict[str, Any]:
    """Embed ``sentences`` sentences on ``workers`` local Ray workers; check them on the driver.

    Returns:
        ``{"embeddings": [N, 384] array, "max_abs_diff": vs the driver's own run of the same
        compiled module, "worker_compilations": the most any worker compiled, "plan": the plan}``.
    """
    import ray

    compiled = compile_on_driver()
    texts = corpus(sentences)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.from_items([{"text": text} for text in texts])
        rows = dataset.map_batches(
            Embedder,
            fn_constructor_kwargs={"compiled": compiled},
            batch_size=batch_size,
            concurrency=workers,
            num_cpus=1,
        ).take_all()
    finally:
        if started:
            ray.shutdown()
    order = {text: i for i, text in enumerate(texts)}
    rows.sort(key=lambda row: order[str(row["text"])])
    embeddings = np.stack([row["embedding"] for row in rows])
    tokenizer = zoo.minilm_tokenizer()
    local = np.concatenate(
        [
            embed(compiled, encode(tokenizer, texts[start : start + batch_size]))
            for start in range(0, len(texts), batch_size)
        ]
    )
    result = {
        "embeddings": embeddings,
        "max_abs_diff": float(np.abs(embeddings - local).max()),
        "worker_compilations": int(max(row["compilations"] for row in rows)),
        "plan": compiled.plan,
    }
    print(
        f"{len(rows)} sentences embedded on {workers} Ray workers with {compiled.plan}; "
        f"max |worker - driver| = {result['max_abs_diff']:.2e}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    ns = parser.parse_args()
    main(ns.sentences, ns.workers)
