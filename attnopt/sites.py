"""Attention sites: what detection found, and what each site now runs as.

Entry points: :class:`AttentionSite`, :func:`collect_sites`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from attnopt.ir import Graph, TensorType
from attnopt.ir.symbolic import evaluate_dim
from attnopt.passes.select import layer_of


@dataclass
class AttentionSite:
    """One attention computation in a model.

    Attributes:
        index: site number in graph order (stable across passes).
        module: module path of the attention, when known.
        layer: layer index parsed from the module path, when there is one.
        kind: "self" or "cross" (keys/values from another sequence).
        causal: bottom-right aligned causal rule (the attribute).
        mask_causal: the site's mask only lets queries see keys the causal rule allows.
        num_heads: query heads: an int, or a symbolic dim where a ``bmm`` form folds the heads
            into a batch of any size.
        num_kv_heads: key/value heads (GQA/MQA when fewer); an int or a symbolic dim.
        head_dim: query/key head dim.
        q_len: query length: an int, or a symbolic dim (``"s1"``) when one program serves
            every length.
        kv_len: key length.
        has_mask: a mask input (padding or pattern) is applied.
        has_bias: an additive bias (relative position, ALiBi) is applied.
        scale: score scale.
        softcap: tanh soft-capping, if any.
        variant: what the site runs as now (dense, sliding_window, block_sparse, linear, ...).
        heads_kept: query heads still computed (after head pruning).
        tokens_kept: fraction of query tokens still computed (after token reduction).
        kept_fraction: fraction of query-key pairs computed (after sparsification).
        block: the surrounding block (q/k/v/out projections, residual), by value names.
        mask_kind: what mask analysis proved about the masks (``"causal+key_padding"``,
            ``"key_padding"``, ``"documents"``, ``"none"``, ``"mask"`` for an unproven
            remainder, ...; see :class:`attnopt.ir.AttentionAttrs`).
    """

    index: int
    module: str | None
    layer: int | None
    kind: str
    causal: bool
    num_heads: int | str
    num_kv_heads: int | str
    head_dim: int | str
    q_len: int | str
    kv_len: int | str
    has_mask: bool
    has_bias: bool
    scale: float
    softcap: float | None
    variant: str = "dense"
    heads_kept: int | None = None
    tokens_kept: float = 1.0
    kept_fraction: float = 1.0
    block: dict[str, Any] = field(default_factory=dict)
    mask_causal: bool = False
    mask_kind: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for JSON)."""
        return asdict(self)


def _at_example(graph: Graph, dim: int | str) -> int:
    """A dim's value at the example the graph was captured with (symbolic dims)."""
    return evaluate_dim(dim, graph.meta.get("symbol_hints", {}))


def collect_sites(graph: Graph) -> list[AttentionSite]:
    """The sites of every ``attention`` node in ``graph``, ordered by site index.

    Args:
        graph: a graph after detection.

    Returns:
        One :class:`AttentionSite` per attention node.
    """
    from attnopt.ir.attention import kept_fraction

    sites = []
    for node in graph.find("attention"):
        attrs = node.attrs
        q, k, v = (value.type for value in node.inputs[:3])
        assert isinstance(q, TensorType) and isinstance(k, TensorType)
        module = node.meta.get("module")
        info = node.meta.get("site", {})
        q_len, kv_len = q.shape[2], k.shape[2]  # ints, or symbolic dims (str)
        example = _at_example(graph, q_len), _at_example(graph, kv_len)
        sites.append(
            AttentionSite(
                index=attrs.site,
                module=module,
                layer=layer_of(module),
                kind=info.get("kind", "self" if q_len == kv_len else "cross"),
                causal=attrs.causal,
                num_heads=q.shape[1],
                num_kv_heads=k.shape[1],
                head_dim=q.shape[3],
                q_len=q_len,
                kv_len=kv_len,
                has_mask=len(node.inputs) > 3 and node.inputs[3] is not None,
                has_bias=len(node.inputs) > 4 and node.inputs[4] is not None,
                scale=attrs.scale,
                softcap=attrs.softcap,
                variant=attrs.variant,
                heads_kept=info.get("heads_kept"),
                tokens_kept=info.get("tokens_kept", 1.0),
                kept_fraction=node.meta.get("kept_fraction", kept_fraction(attrs, *example)),
                block=dict(info.get("block", {})),
                mask_causal=attrs.mask_causal,
                mask_kind=attrs.mask_kind or ("mask" if node.inputs[3:4] != [None] else "none"),
            )
        )
    return sorted(sites, key=lambda s: s.index)
