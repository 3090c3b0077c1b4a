"""Generation speed (issue #20): tokens/s of HF sdpa ``generate``, torch.compile'd ``generate``
with a static cache, and attnopt's ``cm.generate``, side by side in one run, random weights.

Models: the GPT-2 small config (12 layers, hidden 768, 12 heads) and an 8-layer LLaMA-style GQA
config (hidden 1024, 16 heads, 4 KV heads, head_dim 64); prompt 512, 128 new tokens, batch 1 and
4, greedy. Each (model, batch, variant) runs in its own subprocess: its first ``generate`` (which
compiles, for torch.compile and attnopt) is reported apart as ``first call s``; the tokens/s are
the median of the timed calls after it. ``same tokens`` says whether the variant's tokens equal
HF sdpa's (a digest of them is compared across the processes).

Usage::

    python benchmarks/generate.py                  # the issue's matrix
    python benchmarks/generate.py --quick          # prompt 64, 16 new tokens, batch 1
    python benchmarks/generate.py --models gpt2 --batches 1 --repeats 1
    python benchmarks/generate.py --streaming      # 16,384 tokens, window 1024 + 4 sinks

Writes benchmarks/results/generate.json (generate_streaming.json). Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import run_matrix, worker_main, write_results

VARIANTS = ["hf-sdpa", "torch.compile-static", "attnopt"]
MODELS = ("gpt2", "llama-gqa")


def build(name: str) -> torch.nn.Module:
    """The benchmark's model with random weights (seeded), eval, fp32, sdpa attention."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(n_positions=1024, attn_implementation="sdpa")
        model = GPT2LMHeadModel(config)
    elif name == "llama-gqa":
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    return model.eval()


def prompts(batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random prompts; with batch > 1 the rows are left-padded to different real lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, vocab - 100, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : row * length // (4 * batch)] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(variant: str, config: dict[str, Any]) -> dict[str, float]:
    """One variant's generate: first call (compile) and the median of the timed calls."""
    torch.set_num_threads(torch.get_num_threads())
    model = build(config["model"])
    inputs = prompts(config["batch"], config["prompt"], model.config.vocab_size)
    options = {"max_new_tokens": config["new"], "do_sample": False, "min_new_tokens": config["new"]}
    if variant == "hf-sdpa":

        def call() -> torch.Tensor:
            return model.generate(**inputs, **options)

    elif variant == "torch.compile-static":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, dynamic=False)

        def call() -> torch.Tensor:
            return model.generate(**inputs, **options)

    elif variant == "attnopt":
        import attnopt

        compiled = attnopt.compile(model)

        def call() -> torch.Tensor:
            return compiled.generate(**inputs, **options)

    else:
        raise SystemExit(f"unknown variant {variant!r}")
    with torch.inference_mode():
        start = time.perf_counter()
        out = call()
        first = time.perf_counter() - start
        samples = []
        for _ in range(config["repeats"]):
            start = time.perf_counter()
            out = call()
            samples.append(time.perf_counter() - start)
    samples.sort()
    seconds = samples[len(samples) // 2]
    new_tokens = out.shape[1] - config["prompt"]
    digest = hashlib.sha1(out.numpy().tobytes()).hexdigest()[:12]
    return {
        "ms": seconds * 1e3,
        "tokens_per_s": config["batch"] * new_tokens / seconds,
        "first_call_s": first,
        "new_tokens": new_tokens,
        "digest": digest,
    }


def streaming(args: argparse.Namespace) -> list[dict]:
    """StreamingLLM: ``args.stream_tokens`` greedy tokens with ``sliding-window{window,sinks}``;
    mean time per token and peak RSS over the first and the last 1,000 tokens."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    import attnopt

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.stream_tokens + 64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    passes = (
        f"canonicalize,fuse-attention,sliding-window{{window={args.window},sinks={args.sinks}}}"
    )
    compiled = attnopt.compile(model, passes=passes)
    inputs = prompts(1, 16, config.vocab_size)
    options = {"do_sample": False, "min_new_tokens": 1}
    rows = []
    with torch.inference_mode():
        compiled.generate(**inputs, max_new_tokens=8, **options)  # compiles
        for new in (1000, args.stream_tokens):
            compiled.generate(**inputs, max_new_tokens=new, record_steps=True, **options)
            ends = compiled.generation_stats.token_seconds
            steps = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
            rows.append(
                {
                    "tokens": len(steps) + 1,
                    "first_1000_ms": 1e3 * sum(steps[:999]) / len(steps[:999]),
                    "last_1000_ms": 1e3 * sum(steps[-999:]) / len(steps[-999:]),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "cache_positions": compiled.generation_stats.cache_capacity,
                }
            )
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"StreamingLLM decoding (LLaMA-style 4x512, GQA 8/2), window {args.window} + "
        f"{args.sinks} sinks, batch 1"
    )
    for column in ("tokens", "cache positions", "first 1000 ms/token", "last 1000 ms/token",
                   "last/first", "peak RSS MB"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["tokens"]),
            str(row["cache_positions"]),
            f"{row['first_1000_ms']:.2f}",
            f"{row['last_1000_ms']:.2f}",
            f"{row['last_1000_ms'] / row['first_1000_ms']:.2f}",
            f"{row['peak_rss_mb']:.0f}",
        )
    Console(width=140).print(table)
    return rows


def main() -> None:
    """Parse the options, run the matrix, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="prompt 64, 16 new, batch 1")
    parser.add_argument(
        "--streaming", action="store_true", help="the StreamingLLM run only (see streaming())"
    )
    parser.add_argument("--stream-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    if args.streaming:
        write_results("generate_streaming.json", streaming(args))
        print(json.dumps({"written": "benchmarks/results/generate_streaming.json"}))
        return
    if args.quick:
        args.prompt, args.new, args.batches, args.repeats = 64, 16, [1], 1
    configs = [
        {"model": m, "batch": b, "prompt": args.prompt, "new": args.new, "repeats": args.repeats}
        for m in args.models
        for b in args.batches
    ]
    rows = run_matrix(__file__, args.variants, configs, timeout=3600)
    render(rows)
    write_results("generate.json", rows)
    print(json.dumps({"written": "benchmarks/results/generate.json"}))


def render(rows: list[dict]) -> None:
    """The table: tokens/s and the ratio to the faster of HF sdpa and torch.compile."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="generate: tokens/s (greedy, random weights, fp32, CPU)")
    for column in (
        "model",
        "batch",
        "prompt+new",
        "variant",
        "tokens/s",
        "vs faster peer",
        "first call s",
        "same tokens",
    ):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]]
        peers = [r.get("tokens_per_s", 0.0) for r in same if r["variant"] != "attnopt"]
        hf = next((r for r in same if r["variant"] == "hf-sdpa" and "digest" in r), None)
        if "error" in row:
            table.add_row(row["model"], str(row["batch"]), "", row["variant"], row["error"])
            continue
        best = max(peers) if peers else 0.0
        table.add_row(
            row["model"],
            str(row["batch"]),
            f"{row['prompt']}+{row['new_tokens']}",
            row["variant"],
            f"{row['tokens_per_s']:.1f}",
            f"{row['tokens_per_s'] / best:.2f}x" if best else "-",
            f"{row['first_call_s']:.1f}",
            "-" if hf is None else str(hf["digest"] == row["digest"]),
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(run)
    else:
        main()
