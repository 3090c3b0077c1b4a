"""Minimal modules of the bugs the attention fuzzer found (tests/fuzz), one per bug.

Entry point: :data:`CASES`, name -> :class:`Case` (the module and its inputs). Each compiled
with ``passes`` must match eager (``attnopt.validate(tolerance="exact")``, and never NaN or inf
where eager is finite).
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


CASES: dict[str, Case] = {
    "finite_fill_over_inf_score": Case(FiniteFillOverInfScore, _inf_key_inputs),
}
