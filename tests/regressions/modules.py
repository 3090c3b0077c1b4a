"""Minimal modules of the bugs the attention fuzzer found (tests/fuzz), one per bug.

Entry point: :data:`CASES`, name -> :class:`Case` (the module and its inputs). Each compiled
with ``passes`` must never be NaN or inf where eager is finite, and, unless the pipeline is lossy,
match eager (``attnopt.validate(tolerance="exact")``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One regression: a module, its inputs, the pipeline."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    passes: str = "canonicalize,fuse-attention"
    lossy: bool = False  # a lossy pipeline: finite wherever eager is, instead of eager's values
    known_bug: str | None = None  # not fixed yet: the test is a strict xfail naming it
    known_bug: str | None = None  # not fixed yet: the test is an xfail naming it


class FiniteFillOverInfScore(torch.nn.Module):
    """``masked_fill`` with a finite fill over a score that is +inf: eager replaces it by the fill;
    fusion turned the fill into an additive mask (``inf + -1e4 = inf``) and every query that had
    the key masked got NaN. Fixed: a fill becomes a bool mask, which the op applies with
    ``masked_fill`` (its exact reference runs when an input is non-finite)."""

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1)) * 0.5
        scores = scores.masked_fill(~keep, -1e4)
        return torch.softmax(scores, dim=-1) @ v


def _inf_key_inputs() -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 4, generator=gen).abs()  # positive, so q . inf = +inf
    k = torch.randn(1, 2, 5, 4, generator=gen)
    v = torch.randn(1, 2, 5, 4, generator=gen)
    k[..., -1, :] = float("inf")
    keep = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    keep[..., -1] = False  # the inf key is masked
    return (q, k, v, keep), {}


class CausalNaNKey(torch.nn.Module):
    """Causal attention whose last key is NaN: only the last query sees it. The sliding-window
    and block-sparse CPU kernels (and neighborhood's, with a padding mask) added -inf for hidden
    keys in their flash calls, so every query of the chunk got NaN (eager's ``masked_fill``
    replaces the hidden score). Fixed: inputs holding NaN/inf run the exact reference."""

    def forward(self, q, k, v):
        q_len, kv_len = q.shape[-2], k.shape[-2]
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool).triu(1)
        scores = (q @ k.transpose(-2, -1)) * 0.5
        scores = scores.masked_fill(hidden, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _nan_key_inputs() -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 2, generator=gen) for _ in range(3))
    k[..., -1, -1] = float("nan")
    return (q, k, v), {}


class PaddedAttention(torch.nn.Module):
    """Key-padded attention (``masked_fill`` with -inf)."""

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1)) * 0.5
        scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _padded_inf_key_inputs(length: int = 4, value: float = float("inf")) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, length, 2, generator=gen) for _ in range(3))
    k[..., -1, :] = value
    keep = torch.ones(1, 1, 1, length, dtype=torch.bool)
    keep[..., -1] = False
    return (q, k, v, keep), {}


def _causal_nan_key_16() -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 2, generator=gen) for _ in range(3))
    k[..., -1, -1] = float("nan")
    return (q, k, v), {}


class BiasBesideMask(torch.nn.Module):
    """A bias buffer added to the scores, then a bool mask applied with ``masked_fill``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos_bias", torch.linspace(-1.0, 1.0, 16).view(1, 1, 4, 4))

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1)) * 0.5 + self.pos_bias
        scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


CASES: dict[str, Case] = {
    "finite_fill_over_inf_score": Case(FiniteFillOverInfScore, _inf_key_inputs),
    "sliding_window_causal_nan_key": Case(
        CausalNaNKey,
        _nan_key_inputs,
        passes="canonicalize,fuse-attention,sliding-window{window=2}",
        lossy=True,
    ),
    "block_sparse_causal_nan_key": Case(
        CausalNaNKey,
        _causal_nan_key_16,
        passes="canonicalize,fuse-attention,block-sparse{block=4,density=0.5}",
        lossy=True,
    ),
    "neighborhood_padded_nan_key": Case(
        PaddedAttention,
        lambda: _padded_inf_key_inputs(16, float("nan")),
        passes="canonicalize,fuse-attention,neighborhood{kernel=3}",
        lossy=True,
    ),
    "bias_beside_masked_nan_key": Case(
        BiasBesideMask,
        lambda: _padded_inf_key_inputs(4, float("nan")),
    ),
    "linear_masked_inf_key": Case(
        PaddedAttention,
        _padded_inf_key_inputs,
        passes="canonicalize,fuse-attention,linearize",
        lossy=True,
    ),
}
