"""Decoder-only causal LMs for generation, built from tiny configs (never downloaded).

Entry points: :data:`DECODERS` (name -> builder), :func:`build_decoder`, :func:`left_padded`.

The zoo's GPT-2 and LLaMA (GQA, rotary), plus Qwen2 (GQA with q/k/v biases), Mistral (GQA, a
native sliding window larger than the tests' lengths) and Gemma-2 (GQA, soft-capped attention and
logits, alternating sliding and global layers). Each keeps ``use_cache`` on (generation needs it)
and has an EOS token outside the ids the tests draw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from attnopt.zoo.common import VOCAB, seeded

__all__ = ["DECODERS", "build_decoder", "left_padded"]

#: Token ids the helpers draw prompts from: ``[3, VOCAB)`` (0 pad, 1 BOS, 2 EOS).
PAD, BOS, EOS = 0, 1, 2


def _common(attn_implementation: str) -> dict:
    return {
        "vocab_size": VOCAB,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "attn_implementation": attn_implementation,
    }


def _gpt2(impl: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_positions=256, n_embd=32, n_layer=2, n_head=4, n_inner=64, **_common(impl)
    )
    return GPT2LMHeadModel(config)


#: The LLaMA-family layout the tests use: hidden 64 in 4 query heads of 16, 2 layers.
_GQA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _gqa(config_name: str, model_name: str, impl: str, **extra: object) -> nn.Module:
    """A transformers ``model_name(config_name(**_GQA, **extra))`` with random weights."""
    import transformers

    config = getattr(transformers, config_name)(**{**_GQA, **extra, **_common(impl)})
    return getattr(transformers, model_name)(config)


def _llama(impl: str) -> nn.Module:
    return _gqa("LlamaConfig", "LlamaForCausalLM", impl)


def _qwen2(impl: str) -> nn.Module:
    return _gqa("Qwen2Config", "Qwen2ForCausalLM", impl)


def _mistral(impl: str) -> nn.Module:
    # MQA and a native sliding window longer than the tests' sequences.
    return _gqa(
        "MistralConfig", "MistralForCausalLM", impl, num_key_value_heads=1, sliding_window=128
    )


def _gemma2(impl: str) -> nn.Module:
    # transformers runs Gemma-2's soft-capped attention in its eager form only.
    return _gqa("Gemma2Config", "Gemma2ForCausalLM", "eager", head_dim=16, sliding_window=128)


#: Decoder builders by name: ``builder(attn_implementation) -> model`` (random weights).
DECODERS: dict[str, Callable[[str], nn.Module]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma2": _gemma2,
}


def build_decoder(name: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A seeded decoder from :data:`DECODERS`, in eval mode.

    Args:
        name: a key of :data:`DECODERS`.
        attn_implementation: transformers' attention implementation ("sdpa", "eager").

    Returns:
        The model.
    """
    if name not in DECODERS:
        raise KeyError(f"no decoder {name!r}; choose from {sorted(DECODERS)}")
    return seeded(lambda: DECODERS[name](attn_implementation)).eval()


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of these lengths, left-padded with :data:`PAD` to the longest.

    Args:
        lengths: real length of each row.
        seed: token draw seed.

    Returns:
        ``(input_ids, attention_mask)``, each ``[len(lengths), max(lengths)]``.
    """
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask
