"""Zoo models of transformers architectures, built from tiny configs (never downloaded).

Entry point: :data:`HF_ENTRIES`: BERT, GPT-2, LLaMA (GQA), T5 (encoder-decoder, relative position
bias), ViT and Swin.
"""

from __future__ import annotations

import torch
from torch import nn

from attnopt.zoo.common import (
    VOCAB,
    Args,
    ZooEntry,
    generator,
    hf_kwargs,
    padded_tokens,
    seeded,
    token_ids,
)

# --------------------------------------------------------------------------------------------
# BERT


def _build_bert(attn_implementation: str | None) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: BertModel(config, add_pooling_layer=False))


def _example_bert(batch: int, seq: int) -> Args:
    return (), padded_tokens(batch, seq)


# --------------------------------------------------------------------------------------------
# GPT-2


def _build_gpt2(attn_implementation: str | None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        use_cache=False,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: GPT2LMHeadModel(config))


def _example_gpt2(batch: int, seq: int) -> Args:
    return (), {"input_ids": token_ids(batch, seq)}


# --------------------------------------------------------------------------------------------
# LLaMA (GQA)


def _build_llama(attn_implementation: str | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: LlamaForCausalLM(config))


def _example_llama(batch: int, seq: int) -> Args:
    return (), padded_tokens(batch, seq)


# --------------------------------------------------------------------------------------------
# T5 (encoder-decoder, relative position bias)


def _build_t5(attn_implementation: str | None) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        use_cache=False,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: T5ForConditionalGeneration(config))


def _t5_decoder_len(seq: int) -> int:
    return max(1, (seq + 1) // 2)


def _example_t5(batch: int, seq: int) -> Args:
    dec = _t5_decoder_len(seq)
    decoder_input_ids = torch.randint(2, VOCAB, (batch, dec), generator=generator(batch, seq, 1))
    return (), {**padded_tokens(batch, seq), "decoder_input_ids": decoder_input_ids}


# --------------------------------------------------------------------------------------------
# ViT / Swin

IMAGE_SIZE = 32


def _pixels(batch: int, seq: int) -> Args:
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator(batch, 7))
    return (), {"pixel_values": pixel_values}


def _build_vit(attn_implementation: str | None) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: ViTModel(config, add_pooling_layer=False))


def _build_swin(attn_implementation: str | None) -> nn.Module:
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        mlp_ratio=2.0,
        **hf_kwargs(attn_implementation),
    )
    return seeded(lambda: SwinModel(config, add_pooling_layer=False))


#: The transformers entries, in the zoo's order.
HF_ENTRIES = [
    ZooEntry(
        name="bert",
        build=_build_bert,
        example=_example_bert,
        self_sites=2,
        cross_sites=0,
        hf=True,
        causal=False,
        notes="BertModel (no pooler), hidden 32, 4 heads, 2 layers; padding mask on odd rows.",
    ),
    ZooEntry(
        name="gpt2",
        build=_build_gpt2,
        example=_example_gpt2,
        self_sites=2,
        cross_sites=0,
        hf=True,
        causal=True,
        notes="GPT2LMHeadModel, n_embd 32, 4 heads, 2 layers, use_cache=False; input_ids only "
        "(pure causal, no padding mask).",
    ),
    ZooEntry(
        name="llama",
        build=_build_llama,
        example=_example_llama,
        self_sites=2,
        cross_sites=0,
        hf=True,
        causal=True,
        notes="LlamaForCausalLM, hidden 64, GQA 4 query / 2 kv heads (head_dim 16), RoPE, "
        "use_cache=False; right-padding mask on odd rows (causal + padding).",
    ),
    ZooEntry(
        name="t5",
        build=_build_t5,
        example=_example_t5,
        self_sites=4,
        cross_sites=2,
        hf=True,
        causal=True,
        notes="T5ForConditionalGeneration, d_model 32, 4 heads x d_kv 8, 2+2 layers, "
        "relative position bias (8 buckets), scale 1.0 (no 1/sqrt(d)); encoder self is "
        "bidirectional, decoder self causal, cross attends the padded encoder; decoder "
        "length is (seq+1)//2.",
    ),
    ZooEntry(
        name="vit",
        build=_build_vit,
        example=_pixels,
        self_sites=2,
        cross_sites=0,
        hf=True,
        causal=False,
        notes="ViTModel (no pooler), 32x32 image, patch 8 -> 16 patches + CLS = 17 tokens; "
        "seq is ignored; no mask.",
    ),
    ZooEntry(
        name="swin",
        build=_build_swin,
        example=_pixels,
        self_sites=4,
        cross_sites=0,
        hf=True,
        causal=False,
        notes="SwinModel (no pooler), 32x32 image, patch 4 (8x8 tokens), window 4, depths "
        "(2,2), heads (2,4), embed 32. Stage 1: 4 windows of 16 tokens, block 2 shifted "
        "(cyclic-shift mask); stage 2: 4x4 tokens = one window, no shift. Every block has "
        "a learned relative position bias. seq is ignored.",
    ),
]
