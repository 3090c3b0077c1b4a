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
    dynamic: bool | None = False  # None: the default symbolic compile


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


def _fuzz_program(**changes: object) -> tuple[Callable, Callable]:
    """``(build, inputs)`` of the fuzzer's program (tests.fuzz.strategies) for the plainest
    spec with ``changes``."""
    from tests.fuzz.strategies import Spec, build

    spec = Spec(**{**FUZZ_DEFAULTS, **changes})  # type: ignore[arg-type]

    def inputs() -> tuple[tuple, dict]:
        program = build(spec)
        return program.args, program.kwargs

    return (lambda: build(spec).model), inputs


#: The fuzzer's spec fields at their plainest; a case names what differs.
FUZZ_DEFAULTS = dict(
    batch=1, heads=4, kv_heads=4, q_len=9, kv_len=9, head_dim=16, source="qkv_bhsd",
    cross=False, score="matmul_mul", scale=None, softmax="softmax", fp32_softmax=False,
    dtype="float32", mask="none", fill="-inf", mask_where=False, mask_heads=False,
    causal_build="triu", causal_bottom_right=False, fully_masked_row=False, bias="none",
    softcap=None, bias_before_softcap=False, gqa_form="repeat_interleave", dropout="none",
    merge="transpose_reshape", sdpa_is_causal=False, sdpa_enable_gqa=False,
    sdpa_scale_arg=False, return_weights=False, magnitude=1.0, nonfinite="none", seed=0,
    notes=(),
)  # fmt: skip


class BmmBroadcastBias(torch.nn.Module):
    """``bmm`` attention (heads folded into the batch) with a ``[1, 1, 1, 1]`` bias input. The
    symbolic compile marked the bias's size-1 batch dynamic, export failed, and the per-shape
    fallback came out symbolic too (export had marked the caller's tensors dynamic and kept the
    marks); the site table then read ``int('s33')`` heads. Fixed: a size-1 axis beside a larger
    one stays static, the caller's tensors are left unmarked, and symbolic head counts are
    allowed (passes that choose heads decline them)."""

    def forward(self, q, k, v, bias):
        b, h, s, d = q.shape
        scores = torch.bmm(q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2))
        scores = scores.view(b, h, s, s) + bias
        weights = torch.softmax(scores.reshape(b * h, s, s), dim=-1)
        return torch.bmm(weights, v.reshape(b * h, s, d)).view(b, h, s, d)


def _bmm_inputs() -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 1, 1, generator=gen) for _ in range(3))
    return (q, k, v, torch.randn(1, 1, 1, 1, generator=gen)), {}


CASES: dict[str, Case] = {
    # A bias input added to large scores, then additive padding (1 - m) * -1e9 that hides every
    # key: fusion summed bias and padding before the scores, the -1e9 rounded the bias to
    # multiples of 64, and the hidden row came out 3.73x eager's distance from fp64 (3x allowed).
    # Fixed: the padding stays the op's mask, after the bias, and a call with a row hidden
    # entirely beside a bias runs eager's order of additions (the exact reference).
    "bias_then_additive_padding_empty_row": Case(
        *_fuzz_program(
            source="hidden",
            scale=1.0,
            mask="additive_padding",
            fill="-1e9",
            fully_masked_row=True,
            bias="input",
            magnitude=8.0,
            seed=731,
        )  # fmt: skip
    ),
    # The same with finfo.min: eager's and the fp64 oracle's hidden row is the mean of v (the
    # fill swallows the scores), so "shift the hidden row to 0" (a first fix of the case above)
    # was wrong here; eager's order of additions is right for both.
    "finfo_min_hidden_row_beside_bias": Case(
        *_fuzz_program(
            heads=1,
            kv_heads=1,
            q_len=2,
            kv_len=2,
            head_dim=1,
            mask="arbitrary_additive",
            fill="finfo_min",
            fully_masked_row=True,
            bias="param",
        )  # fmt: skip
    ),
    "symbolic_bmm_broadcast_bias": Case(BmmBroadcastBias, _bmm_inputs, dynamic=None),
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
