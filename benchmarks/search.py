"""The budgeted search against HF sdpa, OpenVINO and attnopt's exact plan, side by side.

Cases:

- ``minilm``: the real all-MiniLM-L6-v2. Calibration = the first 64 texts of
  :func:`attnopt.zoo.texts.python_docs_texts` (docstrings of the Python standard library: one
  domain, natural lengths), validation = the next 256. Padded to 256, length-sorted batches of 32.
  Budget ``cosine >= 0.98`` (:class:`attnopt.Budget`: every output at real positions). The search
  runs with ``max_seconds`` (default 300) and the chosen plan is then timed on the validation
  batches, interleaved with the peers: ``hf-sdpa`` (fp32), ``openvino-default`` (its CPU plugin at
  its default precision, when ``openvino`` is installed: ``pip install openvino``), ``attnopt-exact``
  and ``attnopt-searched``. Quality on validation: the budget's metrics (from the search report)
  and the sentence-embedding cosine (mean pooling over the attention mask, as
  sentence-transformers does) per text, mean and minimum.
- ``bert-base``: BERT-base shape (12 layers, hidden 768), random weights, seq 512, batch 8, all
  tokens real; one calibration batch, one validation batch; budget cosine 0.99.
- ``vit``: ViT-B/16 at 224 px, random weights, batch 8; budget cosine 0.99.

Each case prints the search's Pareto table (speed against each metric, on calibration) and the
side-by-side timing table; writes benchmarks/results/search.json and one Pareto plot per case
(search-<case>.png). Asserts nothing.

Run: ``.venv/bin/python benchmarks/search.py [--cases minilm,bert-base,vit] [--repeats 3]
[--max-seconds 300]``
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

from benchmarks.common import (  # noqa: E402
    RESULTS,
    bert_base,
    openvino_default,
    write_results,
)


def _minilm_case() -> dict[str, Any]:
    from transformers import AutoModel

    from attnopt.zoo import minilm_dir, minilm_tokenizer
    from attnopt.zoo.texts import python_docs_texts

    tokenizer = minilm_tokenizer()
    texts = python_docs_texts()

    def batches(chunk: list[str]) -> list[dict[str, torch.Tensor]]:
        chunk = sorted(chunk, key=lambda text: len(tokenizer(text)["input_ids"]))
        return [
            dict(
                tokenizer(
                    chunk[i : i + 32],
                    padding="max_length",
                    max_length=256,
                    truncation=True,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(chunk), 32)
        ]

    model = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="sdpa").eval()
    calibration, validation = batches(texts[:64]), batches(texts[64:320])
    return {"model": model, "calibration": calibration, "validation": validation, "cosine": 0.98}


def _bert_case() -> dict[str, Any]:
    def batch(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {
            "input_ids": torch.randint(0, 30000, (8, 512), generator=generator),
            "attention_mask": torch.ones(8, 512, dtype=torch.long),
        }

    return {
        "model": bert_base("sdpa"),
        "calibration": [batch(0)],
        "validation": [batch(1)],
        "cosine": 0.99,
    }


def _vit_case() -> dict[str, Any]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(8, 3, 224, 224, generator=generator)}

    return {"model": model, "calibration": [batch(0)], "validation": [batch(1)], "cosine": 0.99}


CASES = {"minilm": _minilm_case, "bert-base": _bert_case, "vit": _vit_case}


def _hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _pooled(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.float().mean(dim=1)
    weight = mask[..., None].float()
    return (hidden.float() * weight).sum(1) / weight.sum(1).clamp(min=1)


def run_case(name: str, repeats: int, max_seconds: float) -> dict[str, Any]:
    import attnopt

    case = CASES[name]()
    model, calibration, validation = case["model"], case["calibration"], case["validation"]
    budget = attnopt.Budget(cosine=case["cosine"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        searched = attnopt.compile(
            model,
            calibration=calibration,
            validation=validation,
            budget=budget,
            max_seconds=max_seconds,
        )
        search_seconds = time.perf_counter() - start
        exact = attnopt.compile(model, (), validation[0], passes="exact")
    report = searched.search_report
    report.plot(RESULTS / f"search-{name}.png")
    calls: dict[str, Any] = {"hf-sdpa": model}
    openvino_call = openvino_default(model, validation[0])
    if openvino_call is not None:
        calls["openvino-default"] = lambda **batch: openvino_call(batch)
    calls["attnopt-exact"] = exact
    calls["attnopt-searched"] = searched
    samples: dict[str, list[float]] = {variant: [] for variant in calls}
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for variant, call in calls.items():  # warm up every shape, keep the outputs
            outputs[variant] = [_hidden(call(**batch)) for batch in validation]
        for _ in range(repeats):  # interleaved: noise hits every variant alike
            for variant, call in calls.items():
                begin = time.perf_counter()
                for batch in validation:
                    call(**batch)
                samples[variant].append(time.perf_counter() - begin)
    reference = outputs["hf-sdpa"]
    rows = []
    base_ms = statistics.median(samples["hf-sdpa"]) * 1000
    for variant in calls:
        ms = statistics.median(samples[variant]) * 1000
        cosines = torch.cat(
            [
                torch.nn.functional.cosine_similarity(
                    _pooled(got, batch), _pooled(want, batch), dim=-1
                )
                for got, want, batch in zip(outputs[variant], reference, validation)
            ]
        )
        rows.append(
            {
                "variant": variant,
                "ms": round(ms, 1),
                "vs_hf_sdpa": round(base_ms / ms, 3),
                "embedding_cosine_mean": round(float(cosines.mean()), 5),
                "embedding_cosine_min": round(float(cosines.min()), 5),
            }
        )
    return {
        "case": name,
        "budget": report.budget,
        "search_seconds": round(search_seconds, 1),
        "plans_measured": len(report.points),
        "cut_short": report.cut_short,
        "chosen": report.chosen.pipeline,
        "validation": report.validation,
        "rows": rows,
        "pareto": [
            {
                "plan": p.label,
                "ms_calibration": round(p.seconds * 1000, 1),
                "x_exact": round(p.speedup, 3),
                "x_eager": round(p.eager_speedup, 3),
                "metrics": p.metrics,
                "ok": p.ok,
            }
            for p in report.pareto()
        ],
        "notes": report.notes,
        "tokens": {
            "real": int(sum(int(b["attention_mask"].sum()) for b in validation))
            if "attention_mask" in validation[0]
            else None,
            "padded": int(sum(b[next(iter(b))].numel() for b in validation)),
        },
    }


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['case']}: budget {result['budget']} -> {result['chosen']} "
        f"(search {result['search_seconds']} s, {result['plans_measured']} plans"
        f"{', cut short' if result['cut_short'] else ''})"
    )
    for column in ("variant", "ms (median, validation)", "vs hf-sdpa", "emb cos mean", "min"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in result["rows"]:
        table.add_row(
            row["variant"],
            f"{row['ms']:.0f}",
            f"{row['vs_hf_sdpa']:.2f}x",
            f"{row['embedding_cosine_mean']:.4f}",
            f"{row['embedding_cosine_min']:.4f}",
        )
    console = Console(width=160)
    console.print(table)
    validation = result["validation"] or {}
    console.print(
        f"validation: {'within budget' if validation.get('ok') else 'BREAKS the budget'} "
        f"{validation.get('metrics')}; tokens {result['tokens']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    ns = parser.parse_args()
    results = []
    for name in ns.cases.split(","):
        result = run_case(name, ns.repeats, ns.max_seconds)
        _print(result)
        results.append(result)
        write_results("search.json", results)
    print(f"wrote {RESULTS / 'search.json'}")


if __name__ == "__main__":
    main()
