"""``neighborhood``: 2-D / 3-D neighbourhood attention over a token grid (Swin / NATTEN / GNA).

Entry point: :class:`Neighborhood`.

Each grid token attends to the ``kernel`` window around it (shifted inward at the borders, as in
NATTEN, with ``dilation``) plus the global tokens (CLS, registers) that precede the grid; global
tokens attend to everything. The grid is taken from the option, else from the model's config
(``image_size`` / ``patch_size``: ViT-style patches), else from the key length when it is a square
(optionally after one leading global token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from attnopt.errors import PipelineError
from attnopt.ir import Graph
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import (
    Site,
    check_positive,
    decline,
    other_variant_declined,
    other_variant_notes,
    sites_for,
)


def infer_grid(kv_len: int, model: Any = None) -> tuple[tuple[int, ...], int] | None:
    """``(grid, num_global)`` for a sequence of ``kv_len`` tokens, or None when unknown.

    Args:
        kv_len: number of tokens of the site.
        model: the model (its config may give image and patch sizes).

    Returns:
        The grid and the number of leading global tokens.
    """
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0:
        side = image // patch
        if 0 <= kv_len - side * side <= 8:
            return (side, side), kv_len - side * side
    for num_global in (0, 1):
        side = math.isqrt(kv_len - num_global)
        if side > 1 and side * side == kv_len - num_global:
            return (side, side), num_global
    return None


@dataclass(frozen=True)
class Neighborhood(Pass):
    """Neighbourhood attention over the token grid (lossy; kernel >= grid is dense).

    Options:
        kernel: window size per grid dim (one int for all dims).
        dilation: dilation of the window.
        grid: the token grid (H, W) or (T, H, W); inferred when None.
        num_global: leading tokens that stay global; inferred with the grid when None.
        layers: layer indices to rewrite (None: all).
        sites: site indices to rewrite (None: all).
    """

    name: ClassVar[str] = "neighborhood"
    exact: ClassVar[bool] = False
    kernel: int
    dilation: int = 1
    grid: tuple[int, ...] | None = None
    num_global: int | None = None
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None

    def validate(self) -> None:
        """Kernel odd and positive; grid 2-D or 3-D."""
        super().validate()
        check_positive(self.name, "kernel", self.kernel)
        check_positive(self.name, "dilation", self.dilation)
        check_positive(self.name, "num_global", self.num_global, allow_zero=True)
        if self.kernel % 2 == 0:
            raise PipelineError(f"{self.name}: option kernel={self.kernel} must be odd")
        if self.grid is not None and (len(self.grid) not in (2, 3) or min(self.grid) <= 0):
            raise PipelineError(
                f"{self.name}: option grid={self.grid} must be 2 or 3 positive sizes"
            )

    def _grid_for(self, site: Site, ctx: PassContext) -> tuple[tuple[int, ...], int] | None:
        if not isinstance(site.kv_len, int):
            return None  # a token grid is fixed: a symbolic length has none
        if self.grid is not None:
            num_global = (
                self.num_global
                if self.num_global is not None
                else site.kv_len - math.prod(self.grid)
            )
            return (tuple(self.grid), num_global) if num_global >= 0 else None
        found = infer_grid(site.kv_len, ctx.model)
        if found and self.num_global is not None and found[1] != self.num_global:
            return None
        return found

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite the selected self-attention sites whose grid is known."""
        notes, changed = other_variant_notes(graph, self), 0
        declined = other_variant_declined(graph, self)
        for site in sites_for(graph, self, kind="self"):
            found = self._grid_for(site, ctx)
            if found is None or site.q_len != site.kv_len or site.causal:
                decline(
                    notes,
                    declined,
                    site.index,
                    f"no token grid for {site.kv_len} tokens (or causal)",
                )
                continue
            grid, num_global = found
            if math.prod(grid) + num_global != site.kv_len:
                decline(
                    notes,
                    declined,
                    site.index,
                    f"grid {grid} + {num_global} != {site.kv_len} tokens",
                )
                continue
            kernel = tuple(min(self.kernel, size) for size in grid)
            site.update(
                variant="neighborhood",
                grid=grid,
                kernel=kernel,
                dilation=self.dilation,
                num_global=num_global,
            )
            changed += 1
        return PassResult(changed=bool(changed), rewrites=changed, notes=notes, declined=declined)
