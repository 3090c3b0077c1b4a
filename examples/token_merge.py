"""Fewer tokens: merge similar tokens (ToMe) in the later layers of the real MiniLM, see what it
costs in embedding quality with ``attnopt.validate``, and what it saves.

Run: ``.venv/bin/python examples/token_merge.py``

``remove-padding`` first drops the padding of the batch; ``token-merge`` then merges, in each
sentence, the most similar tokens between the attention and the MLP of layers 2 to 5, down to
70% of the sentence's tokens by the last layer. Every later projection, MLP and attention runs on
the merged tokens; the outputs are unmerged (each token gets the vector of the token it was
merged into), so the call and the output shapes are the model's.
"""

import time

import torch

import attnopt
from attnopt import zoo
from attnopt.zoo.texts import varied_texts

PASSES = "canonicalize,fuse-attention,remove-padding,token-merge{ratio=0.7,layers=[2,3,4,5]}"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware mean of the token embeddings (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def main(batch: int = 16) -> dict[str, float]:
    """Compile with token merging, report its error per output and per site, time one batch."""
    tokenizer = zoo.minilm_tokenizer()
    model = zoo.get("minilm").build("sdpa")
    texts = varied_texts(tokenizer, batch, min_tokens=16, max_tokens=128, seed=3)
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    cm = attnopt.compile(model, kwargs=inputs, passes=PASSES, strict=True)
    print([f"site {s.index}: {s.tokens_kept:.2f}" for s in cm.sites])
    # A lossy rewrite: judge it with a budget (here the embedding-level cosine), not "exact".
    report = attnopt.validate(model, cm, kwargs=inputs, tolerance=attnopt.Budget(cosine=0.95))
    print(report)
    with torch.inference_mode():
        expected = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
        got = mean_pool(cm(**inputs).last_hidden_state, inputs["attention_mask"])
        timings = {}
        for name, call in (("hf", model), ("attnopt", cm)):
            start = time.perf_counter()
            call(**inputs)
            timings[name] = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    figures = {
        "mean_cosine": cosine.mean().item(),
        "min_cosine": cosine.min().item(),
        "speedup": timings["hf"] / timings["attnopt"],
        "ok": float(report.ok),
    }
    print(
        f"{batch} texts: sentence embeddings' cosine to the original mean "
        f"{figures['mean_cosine']:.4f}, min {figures['min_cosine']:.4f}; one batch "
        f"{figures['speedup']:.2f}x faster than HF"
    )
    return figures


if __name__ == "__main__":
    main()
