"""``block-sparse``: keep only some key blocks per query block (BiFormer / MInference / VMoBA).

Entry point: :class:`BlockSparse`.

Routing:
* ``topk``: at run time, pool q and k per block (mean), score query blocks against key blocks and
  keep the ``ceil(density * num_blocks)`` best key blocks per query block (BiFormer's bi-level
  routing);
* ``threshold``: keep the smallest set of key blocks whose softmax of pooled scores reaches
  ``threshold`` (MInference / VMoBA);
* ``static``: a per-head pattern chosen at compile time from calibration data (true attention mass
  per block, averaged over the calibration batches).

The diagonal block (``keep_local``) and the sink blocks are always kept; causal sites never select
future blocks; the model's padding mask excludes fully padded blocks. Below ``min_len`` keys a site
stays dense (InfLLM-V2's switch). ``permute_keys`` reorders keys by importance first (PBS-Attn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attnopt.errors import PassError, PipelineError
from attnopt.ir import Graph
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import (
    Site,
    check_fraction,
    check_heads,
    check_positive,
    other_variant_notes,
    sites_for,
)


@dataclass(frozen=True)
class BlockSparse(Pass):
    """Block-sparse attention with content routing or a calibrated static pattern (lossy).

    Options:
        block: key block size (and query block size unless query_block is set).
        query_block: query rows per block (None: ``block``); 128 with 64-key blocks halves the
            gathering work on the CPU.
        density: fraction of key blocks kept per query block (topk, static).
        threshold: cumulative pooled-score mass to keep (threshold, static).
        routing: "topk", "threshold" or "static".
        keep_local: always keep the diagonal block.
        sinks: leading keys always kept (their blocks).
        min_len: sites with fewer keys stay dense.
        permute_keys: PBS-style key permutation before routing (non-causal sites without masks).
        layers: layer indices to rewrite (None: all).
        sites: site indices to rewrite (None: all).
        heads: query heads that get the sparse pattern; the others stay dense (None: all).
    """

    name: ClassVar[str] = "block-sparse"
    exact: ClassVar[bool] = False
    block: int = 64
    query_block: int | None = None
    density: float | None = None
    threshold: float | None = None
    routing: Literal["topk", "threshold", "static"] = "topk"
    keep_local: bool = True
    sinks: int = 0
    min_len: int = 0
    permute_keys: bool = False
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def validate(self) -> None:
        """Check ranges and that the routing has what it needs."""
        super().validate()
        check_positive(self.name, "block", self.block)
        check_positive(self.name, "query_block", self.query_block)
        check_positive(self.name, "sinks", self.sinks, allow_zero=True)
        check_positive(self.name, "min_len", self.min_len, allow_zero=True)
        check_heads(self.name, self.heads)
        check_fraction(self.name, "density", self.density)
        check_fraction(self.name, "threshold", self.threshold)
        if self.routing == "topk" and self.density is None:
            raise PipelineError(f"{self.name}: routing=topk needs density")
        if self.routing == "threshold" and self.threshold is None:
            raise PipelineError(f"{self.name}: routing=threshold needs threshold")
        if self.routing == "static" and self.density is None and self.threshold is None:
            raise PipelineError(f"{self.name}: routing=static needs density or threshold")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite the selected dense sites (static patterns are calibrated here)."""
        notes: list[str] = other_variant_notes(graph, self)
        chosen: list[Site] = []
        for site in sites_for(graph, self, min_kv_len=self.min_len):
            if site.attrs.softcap is not None:
                notes.append(f"site {site.index}: soft-capped sites stay dense")
                continue
            permute = (
                self.permute_keys and not site.causal and site.mask is None and site.bias is None
            )
            if self.permute_keys and not permute:
                notes.append(f"site {site.index}: keys not permuted (causal, mask or bias)")
            if self.heads is not None and max(self.heads) >= site.num_heads:
                notes.append(f"site {site.index}: has {site.num_heads} heads, heads={self.heads}")
                continue
            site.update(
                heads=tuple(self.heads or ()),
                variant="block_sparse",
                block=self.block,
                query_block=self.query_block or 0,
                density=self.density,
                threshold=self.threshold,
                routing=self.routing,
                keep_local=self.keep_local,
                sinks=self.sinks,
                min_len=self.min_len,
                permute_keys=permute,
            )
            chosen.append(site)
        if chosen and self.routing == "static":
            self._calibrate(graph, ctx, chosen)
        return PassResult(changed=bool(chosen), rewrites=len(chosen), notes=notes)

    def _calibrate(self, graph: Graph, ctx: PassContext, chosen: list[Site]) -> None:
        from attnopt.ir.block_routing import calibration_block_scores, static_block_pattern

        if ctx.executor is None:
            raise PassError(f"{self.name}: routing=static needs a runtime to calibrate with")
        batches = ctx.calibration_batches()
        if not batches:
            raise PassError(f"{self.name}: routing=static needs calibration=[(args, kwargs), ...]")
        wanted = {site.index for site in chosen}
        dense = graph.copy()
        for node in dense.find("attention"):
            if node.attrs.site in wanted:
                Site(node).update(variant="dense")
        scores: dict[int, list[torch.Tensor]] = {}
        for args, kwargs in batches:
            _, taps = ctx.executor(dense, args, kwargs, record_inputs=True)
            for index in wanted:
                for inputs in taps.get(index, []):
                    q, k = inputs[0], inputs[1]
                    mask = inputs[3] if len(inputs) > 3 else None
                    site_attrs = next(s.attrs for s in chosen if s.index == index)
                    scores.setdefault(index, []).append(
                        calibration_block_scores(
                            q,
                            k,
                            block_q=self.query_block or self.block,
                            block_k=self.block,
                            scale=site_attrs.scale,
                            causal=site_attrs.causal,
                            mask=mask,
                        )
                    )
        for site in chosen:
            if site.index not in scores:
                raise PassError(f"{self.name}: site {site.index} never ran during calibration")
            meta = static_block_pattern(
                scores[site.index],
                density=self.density,
                threshold=self.threshold,
                block_q=self.query_block or self.block,
                block_k=self.block,
                q_len=site.q_len,
                kv_len=site.kv_len,
                keep_local=self.keep_local,
                sinks=self.sinks,
                causal=site.causal,
            )
            counts = graph.add_tensor(f"block_sparse.site{site.index}.kv_counts", meta.kv_counts)
            indices = graph.add_tensor(f"block_sparse.site{site.index}.kv_indices", meta.kv_indices)
            inputs = list(site.node.inputs) + [None] * (5 - len(site.node.inputs))
            site.node.inputs = [*inputs[:5], counts, indices]
            site.node.meta["kept_fraction"] = meta.kept_fraction(-(-site.kv_len // self.block))
