"""Padded batches without the padding: embed real text of very different lengths with the real
MiniLM, the token-wise work done on the real tokens only.

Run: ``.venv/bin/python examples/remove_padding.py``

The compiled model packs the real tokens of the padded batch, runs the projections, MLPs and
norms on them, and attention per sentence; its outputs at padded positions are zeros (the
mean pooling below, like sentence-transformers', never reads them).
"""

import time

import torch

import attnopt
from attnopt import zoo
from attnopt.zoo.texts import varied_texts


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware mean of the token embeddings (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def main(batch: int = 16) -> dict[str, float]:
    """Compile with ``remove-padding``, compare the embeddings, time both; returns the figures."""
    tokenizer = zoo.minilm_tokenizer()
    model = zoo.get("minilm").build("sdpa")
    texts = varied_texts(tokenizer, batch, min_tokens=8, max_tokens=128)
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    cm = attnopt.compile(
        model, kwargs=inputs, passes="canonicalize,fuse-attention,remove-padding", strict=True
    )
    with torch.inference_mode():
        expected = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
        got = mean_pool(cm(**inputs).last_hidden_state, inputs["attention_mask"])
        timings = {}
        for name, call in (("hf", model), ("attnopt", cm)):
            start = time.perf_counter()
            call(**inputs)
            timings[name] = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(got, expected).min().item()
    mask = inputs["attention_mask"]
    figures = {
        "padding_ratio": mask.numel() / int(mask.sum()),
        "min_cosine": cosine,
        "speedup": timings["hf"] / timings["attnopt"],
    }
    report = attnopt.validate(model, cm, kwargs=inputs)
    print(report)
    print(
        f"{batch} texts, {figures['padding_ratio']:.2f}x padded/real tokens: embeddings' min "
        f"cosine {cosine:.7f}, one batch {figures['speedup']:.2f}x faster than HF"
    )
    figures["ok"] = float(report.ok)
    return figures


if __name__ == "__main__":
    main()
