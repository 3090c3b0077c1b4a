"""Site-level helpers for pass writers: select ``attention`` sites and change them.

Entry points: :func:`select_sites`, :class:`Site`, :func:`layer_of`.

Example (a complete pass body)::

    for site in select_sites(graph, causal=True, min_kv_len=4096):
        site.update(variant="sliding_window", window_left=1024, window_right=0, sinks=4)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from attnopt.ir import Graph, Node, Value
from attnopt.ir.attention import VARIANTS, AttentionAttrs
from attnopt.ir.types import Dim

#: Module-path components that number a model's layers, in the order they are preferred: T5
#: numbers its layers ``block.3`` and the sublayers inside them ``layer.0``.
_LAYER_CONTAINERS = ("blocks", "block", "h", "layers", "layer")


def layer_of(module_path: str | None) -> int | None:
    """The layer index in a module path.

    The number after a layer container (``blocks``, ``block``, ``h``, ``layers``, ``layer``, in that
    order of preference), else the last all-digit component.

    Args:
        module_path: a dotted module path such as ``"encoder.layer.3.attention.self"``, or None.

    Returns:
        The index (``3`` above; ``3`` for T5's ``"encoder.block.3.layer.0.SelfAttention"``), or
        None when the path is missing or has no numeric component.
    """
    parts = (module_path or "").split(".")
    for container in _LAYER_CONTAINERS:
        for name, index in zip(parts, parts[1:]):
            if name == container and index.isdigit():
                return int(index)
    for part in reversed(parts):
        if part.isdigit():
            return int(part)
    return None


@dataclass
class Site:
    """A view of one ``attention`` node with the facts passes select on."""

    node: Node

    @property
    def attrs(self) -> AttentionAttrs:
        """The node's attributes."""
        return self.node.attrs

    @property
    def index(self) -> int:
        """Site index (stable through passes)."""
        return self.node.attrs.site

    @property
    def q(self) -> Value:
        """Query input ``[B, Hq, Sq, D]``."""
        return self.node.inputs[0]  # type: ignore[return-value]

    @property
    def k(self) -> Value:
        """Key input ``[B, Hkv, Sk, D]``."""
        return self.node.inputs[1]  # type: ignore[return-value]

    @property
    def v(self) -> Value:
        """Value input ``[B, Hkv, Sk, Dv]``."""
        return self.node.inputs[2]  # type: ignore[return-value]

    @property
    def mask(self) -> Value | None:
        """Mask input, if any."""
        return self.node.inputs[3] if len(self.node.inputs) > 3 else None

    @property
    def bias(self) -> Value | None:
        """Bias input, if any."""
        return self.node.inputs[4] if len(self.node.inputs) > 4 else None

    @property
    def q_len(self) -> Dim:
        """Query length: an int, or a symbolic dim (``"s1"``) when one program serves every
        length."""
        return self.q.shape[2]

    @property
    def kv_len(self) -> Dim:
        """Key length (an int or a symbolic dim)."""
        return self.k.shape[2]

    @property
    def num_heads(self) -> Dim:
        """Query heads: an int, or a symbolic dim where a ``bmm`` form folds them into a batch
        of any size (:meth:`heads_unfit` says why a head choice cannot apply then)."""
        return self.q.shape[1]

    def heads_unfit(self, heads: tuple[int, ...] | None) -> str | None:
        """Why a pass's ``heads=`` choice cannot apply to this site, or None when it can."""
        if heads is None:
            return None  # no choice made; () asks whether heads can be chosen at all
        if not isinstance(self.num_heads, int) or not isinstance(self.k.shape[1], int):
            return (
                f"its heads are folded into a symbolic batch ({self.num_heads}): compile with "
                "dynamic=False to choose heads"
            )
        if heads and max(heads) >= self.num_heads:
            return f"has {self.num_heads} heads, heads={heads}"
        return None

    @property
    def causal(self) -> bool:
        """Whether the site is causal: the causal attribute, or a mask that implies it."""
        return self.node.attrs.causal or self.node.attrs.mask_causal

    @property
    def module(self) -> str | None:
        """Module path of the site, when known."""
        return self.node.meta.get("module")

    @property
    def layer(self) -> int | None:
        """Layer index from the module path, when there is one (see :func:`layer_of`)."""
        return layer_of(self.module)

    def update(self, **changes: Any) -> None:
        """Replace attributes (validated: the variant must exist; fields must be known).

        Args:
            **changes: :class:`AttentionAttrs` fields and their new values.
        """
        known = {f.name for f in dataclasses.fields(AttentionAttrs)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(
                f"attention has no attribute {sorted(unknown)}; known: {sorted(known)}"
            )
        if "variant" in changes and changes["variant"] not in VARIANTS:
            raise ValueError(f"variant {changes['variant']!r} is not one of {VARIANTS}")
        self.node.attrs = dataclasses.replace(self.node.attrs, **changes)


def select_sites(
    graph: Graph,
    *,
    sites: Iterable[int] | None = None,
    layers: Iterable[int] | None = None,
    causal: bool | None = None,
    kind: str | None = None,
    min_kv_len: int = 0,
    module: str | None = None,
    variant: str | None = "dense",
) -> list[Site]:
    """Attention sites matching every given condition, in graph order.

    Args:
        graph: the graph.
        sites: site indices to keep.
        layers: layer indices (from module paths) to keep.
        causal: keep only causal (True) or only non-causal (False) sites.
        kind: "self" or "cross".
        min_kv_len: keep sites whose key length is at least this (a site of symbolic length is
            kept: the pass sets the op's ``min_len`` so that shorter inputs run dense).
        module: a regular expression the module path must match (``re.search``).
        variant: keep sites currently of this variant ("dense" by default; None for any).

    Returns:
        The matching :class:`Site` views.
    """
    wanted_sites = None if sites is None else set(sites)
    wanted_layers = None if layers is None else set(layers)
    pattern = re.compile(module) if module else None
    chosen = []
    for node in graph.find("attention"):
        site = Site(node)
        if wanted_sites is not None and site.index not in wanted_sites:
            continue
        if wanted_layers is not None and site.layer not in wanted_layers:
            continue
        if causal is not None and site.causal != causal:
            continue
        if kind is not None and node.meta.get("site", {}).get("kind", "self") != kind:
            continue
        if isinstance(site.kv_len, int) and site.kv_len < min_kv_len:
            continue
        if pattern is not None and not pattern.search(site.module or ""):
            continue
        if variant is not None and site.attrs.variant != variant:
            continue
        chosen.append(site)
    return chosen


def sites_for(graph: Graph, options: Any, **conditions: Any) -> list[Site]:
    """Sites chosen by a pass's common ``sites`` / ``layers`` options plus extra conditions."""
    return select_sites(
        graph,
        sites=getattr(options, "sites", None),
        layers=getattr(options, "layers", None),
        **conditions,
    )


def decline(notes: list[str], declined: list[tuple[int, str]], site: int, reason: str) -> None:
    """Record that a pass leaves ``site`` alone (or drops an option there), with the reason."""
    notes.append(f"site {site}: {reason}")
    declined.append((site, reason))


def other_variant_declined(graph: Graph, options: Any) -> list[tuple[int, str]]:
    """:func:`other_variant_notes` as ``(site, reason)`` pairs."""
    return [
        (site.index, f"already {site.attrs.variant}: left as it is")
        for site in sites_for(graph, options, variant=None)
        if site.attrs.variant != "dense"
    ]


def other_variant_notes(graph: Graph, options: Any) -> list[str]:
    """Notes for the sites a pass's ``sites`` / ``layers`` options select but that are no longer
    dense (already windowed, sparse or linear, e.g. a model's native sliding window): passes that
    rewrite dense sites leave those alone, and say so."""
    return [
        f"site {site.index}: already {site.attrs.variant}: left as it is"
        for site in sites_for(graph, options, variant=None)
        if site.attrs.variant != "dense"
    ]


def check_positive(owner: str, name: str, value: int | None, *, allow_zero: bool = False) -> None:
    """Raise PipelineError unless ``value`` is a positive int (or None)."""
    from attnopt.errors import PipelineError

    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise PipelineError(
            f"{owner}: option {name}={value} must be {'>= 0' if allow_zero else '> 0'}"
        )


def check_fraction(owner: str, name: str, value: float | None) -> None:
    """Raise PipelineError unless ``value`` is in (0, 1] (or None)."""
    from attnopt.errors import PipelineError

    if value is not None and not 0.0 < value <= 1.0:
        raise PipelineError(f"{owner}: option {name}={value} must be in (0, 1]")


def check_heads(owner: str, heads: tuple[int, ...] | None) -> None:
    """Raise PipelineError unless ``heads`` is None or a non-empty list of distinct indices >= 0."""
    from attnopt.errors import PipelineError

    if heads is None:
        return
    if not heads or min(heads) < 0 or len(set(heads)) != len(heads):
        raise PipelineError(
            f"{owner}: option heads={list(heads)} must be distinct head indices >= 0"
        )
