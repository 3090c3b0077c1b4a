"""bf16 inference on the CPU: the real all-MiniLM-L6-v2 against its peers, side by side.

Side by side in one process, calls interleaved (so machine noise hits every variant alike), on
real English text of lengths spread evenly from 5 to 256 MiniLM tokens
(:func:`attnopt.zoo.texts.varied_texts`), batch 32, in two modes: ``fixed`` (every batch padded
to 256) and ``sorted`` (texts sorted by length, each batch padded to its longest):

- ``hf-sdpa-fp32``: the model as loaded (Hugging Face "sdpa" attention), the reference;
- ``hf-sdpa-bf16-weights``: ``model.to(torch.bfloat16)`` (inputs are ids, outputs come out bf16);
- ``attnopt-fp32``: ``passes="canonicalize,fuse-attention"``;
- ``attnopt-bf16``: ``passes="canonicalize,fuse-attention,precision"``, as a user gets it: on a
  CPU without native bf16 the pass declines (one warning) and this runs fp32;
- ``attnopt-bf16-forced``: ``precision{require_native=false}``: the bf16 program even where bf16
  is emulated (only on such CPUs, to show what emulation costs);
- ``openvino-default``: OpenVINO's CPU plugin at its default precision (bf16 where the CPU has
  it), only when ``openvino`` is importable (a benchmark-only extra, never a dependency).

Reported per mode and variant: texts per second (median over ``--repeats`` rounds, each round one
pass over every batch; bf16 variants on a CPU without native bf16 are timed on one pass only), the ratio to hf-sdpa-fp32, the set-up time (compile / conversion), and the
cosine of the mean-pooled embeddings to hf-sdpa-fp32 (worst text). The machine's native bf16 is
printed first: without it the bf16 rows measure emulation, not what the pass is for. Timings are
taken on a shared machine: compare the ratios within one run. Prints a table, writes
benchmarks/results/precision.json. Asserts nothing.

Run: ``.venv/bin/python benchmarks/precision.py [--texts 128] [--repeats 3] [--modes fixed,sorted]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import openvino_default, write_results  # noqa: E402

BATCH = 32
MAX_LEN = 256
FUSE = "canonicalize,fuse-attention"


def _batches(texts: list[str], mode: str) -> list[dict[str, torch.Tensor]]:
    from attnopt.zoo import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    if mode == "sorted":
        texts = sorted(texts, key=lambda t: len(tokenizer(t, truncation=True)["input_ids"]))
    options = {
        "padding": "max_length" if mode == "fixed" else "longest",
        "max_length": MAX_LEN,
        "truncation": True,
        "return_tensors": "pt",
    }
    return [dict(tokenizer(texts[i : i + BATCH], **options)) for i in range(0, len(texts), BATCH)]


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * weights).sum(1) / weights.sum(1)


def _hidden(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _variants(example: dict[str, torch.Tensor], native: bool) -> tuple[dict[str, Any], dict]:
    """The call of every variant (built and compiled now) and their set-up seconds."""
    import attnopt
    from attnopt import zoo

    model = zoo.get("minilm").build("sdpa")
    bf16_model = zoo.get("minilm").build("sdpa").to(torch.bfloat16)
    calls: dict[str, Any] = {
        "hf-sdpa-fp32": lambda batch: model(**batch),
        "hf-sdpa-bf16-weights": lambda batch: bf16_model(**batch),
    }
    setup: dict[str, float] = {}
    pipelines = {"attnopt-fp32": FUSE, "attnopt-bf16": FUSE + ",precision"}
    if not native:
        pipelines["attnopt-bf16-forced"] = FUSE + ",precision{require_native=false}"
    for variant, passes in pipelines.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the declined-site warning of attnopt-bf16
            cm = attnopt.compile(model, (), example, passes=passes)
        setup[variant] = time.perf_counter() - start
        calls[variant] = lambda batch, cm=cm: cm(**batch)
    start = time.perf_counter()
    openvino_call = openvino_default(model, example)
    if openvino_call is not None:
        setup["openvino-default"] = time.perf_counter() - start
        calls["openvino-default"] = openvino_call
    return calls, setup


def run_mode(
    mode: str, texts: list[str], calls: dict[str, Any], repeats: int, emulated: set[str]
) -> list[dict]:
    """Time every variant over all batches of one mode, interleaved; returns one row each.

    The ``emulated`` variants (bf16 on a CPU without native bf16, several times slower) are timed
    on their first pass only, which also gives their embeddings.
    """
    batches = _batches(texts, mode)
    times: dict[str, list[float]] = {v: [] for v in calls}
    pooled: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for variant, call in calls.items():  # warm-up, and the embeddings
            start = time.perf_counter()
            pooled[variant] = torch.cat(
                [_pooled(_hidden(call(b)), b["attention_mask"]) for b in batches]
            )
            if variant in emulated:
                times[variant].append(time.perf_counter() - start)
        for _ in range(repeats):
            for variant, call in calls.items():
                if variant in emulated:
                    continue
                start = time.perf_counter()
                for batch in batches:
                    call(batch)
                times[variant].append(time.perf_counter() - start)
    reference = pooled["hf-sdpa-fp32"].double()
    base = statistics.median(times["hf-sdpa-fp32"])
    rows = []
    for variant in calls:
        median = statistics.median(times[variant])
        cosine = torch.nn.functional.cosine_similarity(pooled[variant].double(), reference, dim=-1)
        rows.append(
            {
                "mode": mode,
                "variant": variant,
                "texts_per_s": round(len(texts) / median, 2),
                "speedup": round(base / median, 3),
                "seconds": [round(t, 3) for t in times[variant]],
                "cosine_min": round(float(cosine.min()), 7),
                "padded_tokens": sum(int(b["attention_mask"].numel()) for b in batches),
            }
        )
    return rows


def main() -> None:
    """Build the variants, time both modes, print the table, write the JSON."""
    from attnopt.passes.precision import native_bf16
    from attnopt.zoo import minilm_tokenizer
    from attnopt.zoo.texts import varied_texts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fixed,sorted")
    ns = parser.parse_args()
    native, reason = native_bf16()
    print(f"native bf16: {native}{'' if native else ' (' + reason + ')'}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shared machine: compare")
    print("ratios within this run")
    texts = varied_texts(minilm_tokenizer(), ns.texts, 5, MAX_LEN, seed=0)
    example = _batches(texts[:BATCH], "fixed")[0]
    calls, setup = _variants(example, native)
    emulated = set() if native else {"hf-sdpa-bf16-weights", "attnopt-bf16-forced"}
    rows = []
    for mode in ns.modes.split(","):
        rows += run_mode(mode, texts, calls, ns.repeats, emulated)
    for row in rows:
        row["setup_s"] = round(setup.get(row["variant"], 0.0), 2)
        row["native_bf16"] = native
        row["timed_passes"] = len(row["seconds"])
    print(f"\n{ns.texts} texts of 5-{MAX_LEN} tokens, batch {BATCH}")
    header = f"{'mode':7} {'variant':22} {'texts/s':>8} {'vs HF':>7} {'set-up s':>9} {'cosine':>10}"
    print(header)
    for row in rows:
        print(
            f"{row['mode']:7} {row['variant']:22} {row['texts_per_s']:>8} "
            f"{row['speedup']:>6}x {row['setup_s']:>9} {row['cosine_min']:>10}"
        )
    write_results("precision.json", rows)


if __name__ == "__main__":
    main()
