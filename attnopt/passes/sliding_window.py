"""``sliding-window``: 1-D local attention with attention sinks (StreamingLLM, SinkLoRA).

Entry point: :class:`SlidingWindow`.

Each selected site keeps, for query ``i``, the keys within ``window`` positions (before it when
causal; on both sides otherwise) plus the first ``sinks`` keys. The model's own mask, bias and
causal rule still apply. The CPU kernel computes only the keys inside each window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnopt.ir import Graph
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import (
    check_heads,
    check_positive,
    decline,
    other_variant_declined,
    other_variant_notes,
    sites_for,
)


@dataclass(frozen=True)
class SlidingWindow(Pass):
    """Sliding-window attention with sinks (lossy; ``window >= seq`` reproduces dense exactly).

    Options:
        window: keys visible on each side of a query (before it only, for causal sites).
        sinks: leading keys visible to every query.
        layers: layer indices to rewrite (None: all).
        sites: site indices to rewrite (None: all).
        heads: query heads that get the sparse pattern; the others stay dense (None: all).
        min_len: leave sites with fewer keys than this dense.
    """

    name: ClassVar[str] = "sliding-window"
    exact: ClassVar[bool] = False
    window: int
    sinks: int = 0
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    min_len: int = 0

    def validate(self) -> None:
        """Window positive, sinks and min_len non-negative."""
        super().validate()
        check_positive(self.name, "window", self.window)
        check_positive(self.name, "sinks", self.sinks, allow_zero=True)
        check_positive(self.name, "min_len", self.min_len, allow_zero=True)
        check_heads(self.name, self.heads)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Turn every selected dense site into a sliding-window site."""
        notes = other_variant_notes(graph, self)
        declined = other_variant_declined(graph, self)
        changed = 0
        for site in sites_for(graph, self, min_kv_len=self.min_len):
            if site.attrs.softcap is not None:
                decline(notes, declined, site.index, "soft-capped sites stay dense")
                continue
            unfit = site.heads_unfit(self.heads)
            if unfit is not None:
                decline(notes, declined, site.index, unfit)
                continue
            site.update(
                heads=tuple(self.heads or ()),
                variant="sliding_window",
                window_left=self.window,
                window_right=0 if site.causal else self.window,
                sinks=self.sinks,
                # a symbolic length is only known at run time: the op keeps short inputs dense
                min_len=self.min_len if not isinstance(site.kv_len, int) else site.attrs.min_len,
            )
            changed += 1
        return PassResult(changed=bool(changed), rewrites=changed, notes=notes, declined=declined)
