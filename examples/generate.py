"""Generate text with a compiled decoder: the same tokens as ``model.generate``, faster.

``cm.generate`` compiles the prompt pass and a one-token decode step once (symbolic batch and
length) and decodes over a static key/value cache grown in place; with a sliding window and sinks
(StreamingLLM) the cache stays bounded however long the generation runs.

Run: ``python examples/generate.py``.
"""

from __future__ import annotations

import torch

import attnopt
from attnopt.zoo.decoders import build_decoder, left_padded


def main() -> dict[str, object]:
    """Greedy generation on a tiny LLaMA-style model (random weights), a left-padded batch of
    three prompts, then a streaming run with window 16 + 4 sinks."""
    model = build_decoder("llama")
    ids, mask = left_padded([9, 4, 6])

    cm = attnopt.compile(model)
    tokens = cm.generate(ids, attention_mask=mask, max_new_tokens=16)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    print("same tokens as model.generate:", torch.equal(tokens, reference))
    print(cm.generation_stats)

    streaming = attnopt.compile(
        model, passes="canonicalize,fuse-attention,sliding-window{window=16,sinks=4}"
    )
    long = streaming.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=64)
    capacity = streaming.generation_stats.cache_capacity
    print(f"streamed {long.shape[1] - ids.shape[1]} tokens through a {capacity}-position cache")
    return {
        "same_tokens": torch.equal(tokens, reference),
        "streamed": long.shape[1] - ids.shape[1],
        "cache_capacity": capacity,
    }


if __name__ == "__main__":
    main()
