"""What the budgeted search may try on a model: steps, grouped into families with a ladder of
levels from mild to aggressive.

Entry points: :class:`Family`, :func:`search_space`.

A family is one kind of decision with one knob (token-merge from layer 2 with a kept-token ratio,
heads kept per site, a window size...); its levels are pipeline steps ordered from the mildest
(least error, least saving) to the most aggressive. Families in one ``group`` exclude each other
(two ways of dropping tokens). Which families exist depends on what the exact compile found: the
attention sites' kinds, masks, layer count and sequence lengths; a family that cannot help (a
window longer than the sequence, token reduction on a decoder) is not proposed, and the reason is
kept for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAMILIES", "Family", "search_space"]

#: Every family name the search knows, for ``families=`` (what each is: :func:`search_space`).
FAMILIES = (
    "remove-padding",
    "precision",
    "token-merge",
    "token-prune",
    "head-prune",
    "sliding-window",
    "block-sparse",
    "neighborhood",
    "linearize",
)


@dataclass
class Family:
    """One kind of decision and its levels.

    Attributes:
        name: the family as reports show it (``"token-merge@L2"``).
        kind: the family name in :data:`FAMILIES`.
        levels: pipeline steps, mildest first.
        exact: whether every level is exact (then it is kept whenever it is faster).
        group: families of one group are never combined.
    """

    name: str
    kind: str
    levels: list[str]
    exact: bool = False
    group: str = ""

    def __post_init__(self) -> None:
        self.group = self.group or self.kind


@dataclass
class Space:
    """The families proposed for a model, and why others were not."""

    families: list[Family] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _length(value: Any, hints: dict[str, int]) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        hint = hints.get(value)
        return int(hint) if isinstance(hint, int) else None
    return None


def _layers_from(layers: Sequence[int], start: int) -> str:
    return "[" + ",".join(str(layer) for layer in layers if layer >= start) + "]"


def search_space(
    sites: Sequence[Any],
    hints: dict[str, int],
    *,
    families: Sequence[str] | None = None,
    bf16_native: bool = False,
    has_padding: bool = False,
) -> Space:
    """The families worth trying on a model whose exact compile has these sites.

    Args:
        sites: the exact compile's :class:`attnopt.AttentionSite` list.
        hints: the example's value of each symbolic dim (``graph.meta["symbol_hints"]``).
        families: restrict to these kinds (:data:`FAMILIES`); None: all that apply.
        bf16_native: whether this CPU computes bf16 natively (else precision is not tried).
        has_padding: whether the calibration inputs hold padded positions (key padding).

    Returns:
        The :class:`Space`.
    """
    wanted = set(FAMILIES if families is None else families)
    unknown = wanted - set(FAMILIES)
    if unknown:
        raise ValueError(
            f"unknown search families {sorted(unknown)}; choose from {', '.join(FAMILIES)}"
        )
    space = Space()

    def skip(kind: str, reason: str) -> None:
        if kind in wanted:
            space.skipped[kind] = reason

    encoder = [s for s in sites if s.kind == "self" and not (s.causal or s.mask_causal)]
    layers = sorted({s.layer for s in encoder if s.layer is not None})
    lengths = [length for s in sites if (length := _length(s.kv_len, hints)) is not None]
    seq = max(lengths, default=0)

    if "remove-padding" in wanted:
        if has_padding and any(s.has_mask for s in sites):
            space.families.append(
                Family("remove-padding", "remove-padding", ["remove-padding"], True)
            )
        else:
            skip("remove-padding", "the calibration inputs have no padded positions")
    if "precision" in wanted:
        if bf16_native:
            space.families.append(Family("precision", "precision", ["precision{dtype=bf16}"]))
        else:
            skip("precision", "this CPU has no native bf16 (AVX512_BF16/AMX): bf16 would be slower")
    if not sites:
        for kind in FAMILIES[2:]:
            skip(kind, "the model has no attention sites")
        return space

    # Token reduction: the kept-token ratio after the last layer, starting at the first layer or
    # a third of the way in (a later start keeps the early layers' detail).
    token_kinds = [k for k in ("token-merge", "token-prune") if k in wanted]
    if token_kinds and (len(layers) < 2 or len(encoder) != len(sites)):
        for kind in token_kinds:
            skip(kind, "needs an encoder of two or more self-attention layers, no causal sites")
    elif token_kinds:
        starts = sorted({layers[0], layers[len(layers) // 3]})
        for start in starts:
            chosen = _layers_from(layers, start)
            if "token-merge" in wanted:
                ratios = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
                space.families.append(
                    Family(
                        f"token-merge@L{start}",
                        "token-merge",
                        [f"token-merge{{ratio={r},layers={chosen}}}" for r in ratios],
                        group="tokens",
                    )
                )
            if "token-prune" in wanted and start == starts[-1] and start > layers[0]:
                keeps = (0.9, 0.8, 0.7, 0.6, 0.5)
                space.families.append(
                    Family(
                        f"token-prune@L{start}",
                        "token-prune",
                        [f"token-prune{{keep={k},layers=[{start}]}}" for k in keeps],
                        group="tokens",
                    )
                )
    if "head-prune" in wanted:
        if max((s.num_heads or 0 for s in sites), default=0) >= 4:
            keeps = (0.9, 0.75, 0.6, 0.5)
            space.families.append(
                Family("head-prune", "head-prune", [f"head-prune{{keep={k}}}" for k in keeps])
            )
        else:
            skip("head-prune", "fewer than 4 heads per site")
    # Sparse and linear attention pay off only where attention is a real share of the work.
    if "sliding-window" in wanted:
        if seq >= 256:
            windows = [w for w in (seq // 2, seq // 4, seq // 8) if w >= 32]
            space.families.append(
                Family(
                    "sliding-window",
                    "sliding-window",
                    [f"sliding-window{{window={w},sinks=4}}" for w in windows],
                    group="sparse",
                )
            )
        else:
            skip("sliding-window", f"sequences of {seq} tokens are too short to gain from a window")
    if "block-sparse" in wanted:
        if seq >= 512:
            space.families.append(
                Family(
                    "block-sparse",
                    "block-sparse",
                    [f"block-sparse{{density={d}}}" for d in (0.5, 0.35, 0.25)],
                    group="sparse",
                )
            )
        else:
            skip("block-sparse", f"sequences of {seq} tokens: fewer than 8 key blocks per row")
    if "neighborhood" in wanted:
        side = _grid_side(seq)
        if side is not None and side >= 12 and all(s.kind == "self" for s in sites):
            kernels = [k for k in (side - 3 - (side % 2), 9, 7) if 5 <= k < side]
            space.families.append(
                Family(
                    "neighborhood",
                    "neighborhood",
                    [f"neighborhood{{kernel={k}}}" for k in sorted(set(kernels), reverse=True)],
                    group="sparse",
                )
            )
        else:
            skip("neighborhood", "the tokens are not an image grid of 12 x 12 or more")
    if "linearize" in wanted:
        if seq >= 512 and len(layers) >= 2:
            counts = sorted({1, max(1, len(layers) // 4), max(1, len(layers) // 2)})
            # Hybrid (an exact local window plus linear attention for the rest) is the milder
            # form at each count.
            levels = []
            for count in counts:
                levels += [
                    f"linearize{{count={count},local_window=64}}",
                    f"linearize{{count={count}}}",
                ]
            space.families.append(Family("linearize", "linearize", levels, group="sparse"))
        else:
            skip("linearize", f"sequences of {seq} tokens: linear attention saves little")
    return space


def _grid_side(tokens: int) -> int | None:
    """The side of a square image grid of ``tokens`` patches (or ``tokens - 1`` with a class
    token), or None."""
    for count in (tokens, tokens - 1):
        side = int(round(count**0.5)) if count > 0 else 0
        if side > 1 and side * side == count:
            return side
    return None
