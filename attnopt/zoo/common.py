"""What every zoo model shares: the entry type, seeded construction, deterministic inputs.

Entry points: :class:`ZooEntry`, :func:`seeded` (build a module under a forked, seeded RNG),
:func:`generator`, :func:`check_impl` / :func:`hf_kwargs` (the ``attn_implementation``
argument), :func:`token_ids`, :func:`padding_mask`, :func:`padded_tokens` (example inputs), and
:func:`primary_output` (the tensor the zoo's tests compare).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 0
VOCAB = 100

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


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded deterministically from ``key`` (leaves the global RNG alone)."""
    seed = SEED
    for k in key:
        seed = seed * 1_000_003 + int(k)
    return torch.Generator().manual_seed(seed % (2**63))


def seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` under a forked, seeded global RNG and return its module in eval mode, fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = fn()
    return model.float().eval()


def check_impl(attn_implementation: str | None) -> None:
    """Refuse an ``attn_implementation`` other than ``None``, ``"eager"`` or ``"sdpa"``.

    Args:
        attn_implementation: the argument a zoo ``build`` received.

    Raises:
        ValueError: for any other value.
    """
    if attn_implementation not in (None, "eager", "sdpa"):
        raise ValueError(
            f"attn_implementation must be None, 'eager' or 'sdpa', got {attn_implementation!r}"
        )


def hf_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """Config kwargs selecting the attention implementation (transformers 5.x reads
    ``attn_implementation`` from the config constructor; ``None`` lets the model pick)."""
    check_impl(attn_implementation)
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def token_ids(batch: int, seq: int, vocab: int = VOCAB) -> torch.Tensor:
    """Random token ids in ``[2, vocab)`` (0 is padding, 1 is EOS for T5)."""
    return torch.randint(2, vocab, (batch, seq), generator=generator(batch, seq))


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """int64 ``[batch, seq]`` attention mask, 1 = token. Odd rows are right-padded by a quarter
    of ``seq`` (row 0 is never padded, so ``batch == 1`` has no padding)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = seq // 4
    if pad:
        mask[1::2, seq - pad :] = 0
    return mask


def padded_tokens(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``input_ids`` (0 = pad at padded positions) and the matching ``attention_mask``."""
    mask = padding_mask(batch, seq)
    return {"input_ids": token_ids(batch, seq) * mask, "attention_mask": mask}


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
