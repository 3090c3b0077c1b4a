"""Fewer tokens: token merging (ToMe) and pruning (EViT) against HF sdpa and attnopt exact.

Side by side in one process, calls interleaved (so machine noise hits every variant alike).

Cases:

- ``vit``: ViT-B/16 at 224 px (the zoo's ViT at full size: 12 layers, hidden 768, 12 heads;
  random weights), batch 8. Variants: ``hf-sdpa``; ``attnopt-exact``; token-merge and token-prune
  schedules that keep about half the tokens by the last layer (and some that cut earlier).
- ``minilm``: the real all-MiniLM-L6-v2 on real English text of lengths spread from 10 to 256
  tokens (:func:`attnopt.zoo.texts.varied_texts`, a sample this benchmark picks), padded to 256,
  batch 32. Variants: ``hf-sdpa``; ``attnopt-exact``; ``remove-padding``; token-merge over a range
  of ratios, on the padded batch and after remove-padding; token-prune.

Reported per variant: median time, speed-up against ``hf-sdpa`` and against ``attnopt-exact``,
the tokens the last attention layer runs on (a fraction of the padded input's, at this batch:
padding removal counts too), and the quality: for
MiniLM the cosine of the sentence embedding (mean pooling over the attention mask, as
sentence-transformers does) to the original model's, mean and minimum over the batch; for ViT
the cosine of the mean-pooled last hidden state. Prints the tables, writes
benchmarks/results/tokens.json and a quality/speed plot benchmarks/results/tokens.png.
Asserts nothing.

Run: ``.venv/bin/python benchmarks/tokens.py [--repeats 5] [--cases vit,minilm]``
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

from benchmarks.common import RESULTS, write_results  # noqa: E402

BASE = "canonicalize,fuse-attention"

VIT_VARIANTS = {
    "attnopt-exact": BASE,
    "merge ratio=0.5": f"{BASE},token-merge{{ratio=0.5}}",
    "merge r=8 (ToMe)": f"{BASE},token-merge{{r=8}}",
    "merge ratio=0.5 L0-3": f"{BASE},token-merge{{ratio=0.5,layers=[0,1,2,3]}}",
    "merge ratio=0.35 L0-3": f"{BASE},token-merge{{ratio=0.35,layers=[0,1,2,3]}}",
    "prune keep=0.8 L3,6,9 (EViT)": f"{BASE},token-prune{{keep=0.8,layers=[3,6,9]}}",
    "prune keep=0.5 L1": f"{BASE},token-prune{{keep=0.5,layers=[1]}}",
    "merge ratio=0.5 L0": f"{BASE},token-merge{{ratio=0.5,layers=[0]}}",
    "prune keep=0.5 L0": f"{BASE},token-prune{{keep=0.5,layers=[0]}}",
}

MINILM_VARIANTS = {
    "attnopt-exact": BASE,
    "remove-padding": f"{BASE},remove-padding",
    "merge ratio=0.7": f"{BASE},token-merge{{ratio=0.7}}",
    "merge ratio=0.5": f"{BASE},token-merge{{ratio=0.5}}",
    "merge ratio=0.35": f"{BASE},token-merge{{ratio=0.35}}",
    "merge ratio=0.5 L0": f"{BASE},token-merge{{ratio=0.5,layers=[0]}}",
    "unpad+merge ratio=0.9 L2-5": f"{BASE},remove-padding,token-merge{{ratio=0.9,layers=[2,3,4,5]}}",
    "unpad+merge ratio=0.7 L2-5": f"{BASE},remove-padding,token-merge{{ratio=0.7,layers=[2,3,4,5]}}",
    "unpad+merge ratio=0.7": f"{BASE},remove-padding,token-merge{{ratio=0.7}}",
    "unpad+merge ratio=0.5": f"{BASE},remove-padding,token-merge{{ratio=0.5}}",
    "unpad+prune keep=0.9 L2-5": (
        f"{BASE},remove-padding,token-prune{{keep=0.9,layers=[2,3,4,5],rank=received}}"
    ),
}


def _vit_case(batch: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor | None]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, attn_implementation="sdpa")
    model = ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model, {"pixel_values": pixels}, None


def _minilm_case(
    batch: int,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor | None]:
    from transformers import AutoModel

    from attnopt.zoo import minilm_dir, minilm_tokenizer
    from attnopt.zoo.texts import varied_texts

    tokenizer = minilm_tokenizer()
    texts = varied_texts(tokenizer, batch, min_tokens=10, max_tokens=256, seed=7)
    inputs = tokenizer(
        texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
    )
    model = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="sdpa").eval()
    return model, dict(inputs), inputs["attention_mask"]


CASES = {
    "vit": (_vit_case, 8, VIT_VARIANTS),
    "minilm": (_minilm_case, 32, MINILM_VARIANTS),
}


def _pooled(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if mask is None:
        return hidden.mean(dim=1)
    weight = mask[..., None].to(hidden.dtype)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def _tokens_left(cm: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Tokens the last attention site runs on, as a fraction of the (padded) input's: read from
    the site's recorded inputs (packed tokens after remove-padding count as they are)."""
    entry, _ = cm._entry((), inputs)
    entry.kernels.input_taps = {}
    try:
        with torch.inference_mode():
            cm(**inputs)
        taps = entry.kernels.input_taps
    finally:
        entry.kernels.input_taps = None
    last = taps[max(taps)][-1][0]  # q of the last site: [B, H, N, D]
    batch, seq = next(iter(inputs.values())).shape[:2]
    if "pixel_values" in inputs:
        seq = entry.graph.find("attention")[0].inputs[0].shape[2]
    return round(last.shape[0] * last.shape[2] / (batch * seq), 4)


def run_case(name: str, repeats: int) -> dict[str, Any]:
    """Time every variant of one case, interleaved; returns the case's results."""
    import attnopt

    build, batch, variants = CASES[name]
    model, inputs, mask = build(batch)
    calls: dict[str, Any] = {"hf-sdpa": lambda: model(**inputs)}
    compile_s: dict[str, float] = {}
    kept: dict[str, float] = {"hf-sdpa": 1.0}
    for variant, passes in variants.items():
        start = time.perf_counter()
        cm = attnopt.compile(model, (), inputs, passes=passes)
        compile_s[variant] = time.perf_counter() - start
        kept[variant] = _tokens_left(cm, inputs)
        calls[variant] = lambda cm=cm: cm(**inputs)
    times: dict[str, list[float]] = {v: [] for v in calls}
    pooled: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for variant, call in calls.items():
            pooled[variant] = _pooled(call(), mask)  # warm-up, and the quality
        for _ in range(repeats):
            for variant, call in calls.items():
                start = time.perf_counter()
                call()
                times[variant].append(time.perf_counter() - start)
    base = statistics.median(times["hf-sdpa"])
    exact = statistics.median(times["attnopt-exact"])
    rows = []
    for variant in calls:
        median = statistics.median(times[variant])
        cos = torch.nn.functional.cosine_similarity(pooled[variant], pooled["hf-sdpa"], dim=-1)
        rows.append(
            {
                "variant": variant,
                "passes": variants.get(variant, "(the model as loaded)"),
                "median_ms": round(median * 1e3, 1),
                "vs_hf_sdpa": round(base / median, 3),
                "vs_exact": round(exact / median, 3),
                "tokens_at_last_layer": kept[variant],
                "cosine_mean": round(cos.mean().item(), 5),
                "cosine_min": round(cos.min().item(), 5),
                "compile_s": round(compile_s.get(variant, 0.0), 2),
            }
        )
    result: dict[str, Any] = {"case": name, "batch": batch, "rows": rows}
    if mask is not None:
        result["real_token_fraction"] = round(mask.float().mean().item(), 4)
    return result


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        for row in result["rows"]:
            ax.scatter(row["vs_hf_sdpa"], row["cosine_mean"])
            ax.annotate(row["variant"], (row["vs_hf_sdpa"], row["cosine_mean"]), fontsize=7)
        ax.set_xlabel("speed-up vs HF sdpa")
        ax.set_ylabel("mean embedding cosine to the original")
        ax.set_title(f"{result['case']} (batch {result['batch']})")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the cases, print the tables, write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="vit,minilm")
    ns = parser.parse_args()
    results = []
    for name in ns.cases.split(","):
        result = run_case(name, ns.repeats)
        results.append(result)
        extra = (
            f", real tokens {result['real_token_fraction']:.0%} of the padded batch"
            if "real_token_fraction" in result
            else ""
        )
        print(f"\n{name}: batch {result['batch']}{extra}")
        print(
            f"{'variant':30} {'median ms':>10} {'vs sdpa':>8} {'vs exact':>9} {'tokens':>7} "
            f"{'cos mean':>9} {'cos min':>8}"
        )
        for row in result["rows"]:
            print(
                f"{row['variant']:30} {row['median_ms']:>10} {row['vs_hf_sdpa']:>7}x "
                f"{row['vs_exact']:>8}x {row['tokens_at_last_layer']:>7.2f} "
                f"{row['cosine_mean']:>9.4f} {row['cosine_min']:>8.4f}"
            )
    write_results("tokens.json", {"repeats": ns.repeats, "cases": results})
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(results, RESULTS / "tokens.png")
    print(f"plot: {RESULTS / 'tokens.png'}")


if __name__ == "__main__":
    main()
