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

Plan (``routing=static``): the pass records, per site, the calibrated per-head block scores
(``block_scores`` ``[heads][query blocks][key blocks]``, the mean true attention mass per block)
with the block sizes and the calibrated lengths; the pattern (``kv_counts`` / ``kv_indices``) is
always built from those stored scores, so replaying a plan rebuilds it bit for bit without
calibrating. At a length with the same number of query and key blocks the pattern is rebuilt for
that length (the same scores, the same causal / local / sink rules). At a length whose block count
differs, the scores say nothing about blocks that did not exist, so the site stays **dense**
(exact) there, with a note in the pass history; a signature with symbolic lengths also keeps the
site dense (a static pattern is made for one block grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attnopt.errors import PassError, PipelineError, PlanError
from attnopt.ir import Graph
from attnopt.ir.attention import AttentionAttrs
from attnopt.ir.block_routing import calibration_block_scores, static_block_pattern
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import (
    Site,
    check_fraction,
    check_heads,
    check_positive,
    decline,
    other_variant_declined,
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
        """Rewrite the selected dense sites (static patterns are calibrated or replayed here)."""
        notes: list[str] = other_variant_notes(graph, self)
        declined = other_variant_declined(graph, self)
        chosen: list[Site] = []
        original: dict[int, AttentionAttrs] = {}
        for site in sites_for(graph, self, min_kv_len=self.min_len):
            if site.attrs.softcap is not None:
                decline(notes, declined, site.index, "soft-capped sites stay dense")
                continue
            permute = (
                self.permute_keys and not site.causal and site.mask is None and site.bias is None
            )
            if self.permute_keys and not permute:
                decline(notes, declined, site.index, "keys not permuted (causal, mask or bias)")
            unfit = site.heads_unfit(self.heads)
            if unfit is not None:
                decline(notes, declined, site.index, unfit)
                continue
            original[site.index] = site.attrs
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
            chosen = self._static_patterns(graph, ctx, chosen, original, notes, declined)
        return PassResult(
            changed=bool(chosen), rewrites=len(chosen), notes=notes, declined=declined
        )

    def _static_patterns(
        self,
        graph: Graph,
        ctx: PassContext,
        chosen: list[Site],
        original: dict[int, AttentionAttrs],
        notes: list[str],
        declined: list[tuple[int, str]],
    ) -> list[Site]:
        """Attach each site's static pattern, built from recorded or freshly calibrated block
        scores; sites whose block grid is not the calibrated one go back to dense."""
        if ctx.replaying:  # every decision is read and checked before any pattern is attached
            decisions = {site.index: self._planned(ctx, site) for site in chosen}
        else:
            decisions = self._calibrate(graph, ctx, chosen)
            for site in chosen:
                ctx.record(self, site, decisions[site.index])
        patterned = []
        for site in chosen:
            decision = decisions[site.index]
            reason = _grid_mismatch(decision, site)
            if reason is not None:
                site.node.attrs = original[site.index]
                decline(notes, declined, site.index, f"stays dense: {reason}")
                continue
            meta = static_block_pattern(
                torch.tensor(decision["block_scores"], dtype=torch.float32),
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
            device = _tensor_device(graph)
            counts = graph.add_tensor(
                f"block_sparse.site{site.index}.kv_counts", meta.kv_counts.to(device)
            )
            indices = graph.add_tensor(
                f"block_sparse.site{site.index}.kv_indices", meta.kv_indices.to(device)
            )
            inputs = list(site.node.inputs) + [None] * (5 - len(site.node.inputs))
            site.node.inputs = [*inputs[:5], counts, indices]
            site.node.meta["kept_fraction"] = meta.kept_fraction(-(-site.kv_len // self.block))
            patterned.append(site)
        return patterned

    def _planned(self, ctx: PassContext, site: Site) -> dict:
        """A replayed decision, checked against this pass's blocks and the site's heads."""
        decision = ctx.decision(self, site)
        assert decision is not None
        try:
            scores = torch.tensor(decision["block_scores"], dtype=torch.float32)
            fits = (
                decision["block_q"] == (self.query_block or self.block)
                and decision["block_k"] == self.block
                and scores.dim() == 3
                and scores.shape[0] == site.num_heads
                and tuple(scores.shape[1:])
                == _grid(decision["q_len"], decision["kv_len"], decision["block_q"], self.block)
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(
                f"{self}: unreadable static pattern for site {ctx.site_key(site)!r} ({err})"
            ) from err
        if not fits:
            raise PlanError(
                f"{self}: the plan's static pattern for site {ctx.site_key(site)!r} does not fit "
                f"{site.num_heads} heads and blocks of {self.query_block or self.block}x{self.block}"
            )
        return decision

    def _calibrate(self, graph: Graph, ctx: PassContext, chosen: list[Site]) -> dict[int, dict]:
        """Per site: the block scores averaged over the calibration batches, as a decision."""
        if ctx.executor is None:
            raise PassError(f"{self.name}: routing=static needs a runtime to calibrate with")
        batches = ctx.calibration_batches()
        if not batches:
            raise PassError(f"{self.name}: routing=static needs calibration=[(args, kwargs), ...]")
        block_q = self.query_block or self.block
        attrs = {site.index: site.attrs for site in chosen}
        dense = graph.copy()
        for node in dense.find("attention"):
            if node.attrs.site in attrs:
                Site(node).update(variant="dense")
        scores: dict[int, list[torch.Tensor]] = {}
        lengths: dict[int, tuple[int, int]] = {}
        for args, kwargs in batches:
            _, taps = ctx.executor(dense, args, kwargs, record_inputs=True)
            for index, site_attrs in attrs.items():
                for inputs in taps.get(index, []):
                    q, k = inputs[0], inputs[1]
                    lengths[index] = (int(q.shape[2]), int(k.shape[2]))
                    scores.setdefault(index, []).append(
                        calibration_block_scores(
                            q,
                            k,
                            block_q=block_q,
                            block_k=self.block,
                            scale=site_attrs.scale,
                            causal=site_attrs.causal,
                            mask=inputs[3] if len(inputs) > 3 else None,
                        )
                    )
        decisions = {}
        for index in attrs:
            if index not in scores:
                raise PassError(f"{self.name}: site {index} never ran during calibration")
            mean = torch.stack(scores[index]).to(torch.float32).mean(dim=0).cpu()
            decisions[index] = {
                "block_q": block_q,
                "block_k": self.block,
                "q_len": lengths[index][0],
                "kv_len": lengths[index][1],
                "block_scores": mean.tolist(),
            }
        return decisions


def _tensor_device(graph: Graph) -> torch.device:
    """Where the graph's constants live (the model's device): the pattern goes beside them."""
    return next(
        (t.device for t in graph.tensors.values() if t.is_floating_point()), torch.device("cpu")
    )


def _grid(q_len: int, kv_len: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Number of query and key blocks."""
    return -(-q_len // block_q), -(-kv_len // block_k)


def _grid_mismatch(decision: dict, site: Site) -> str | None:
    """Why the recorded pattern cannot serve this site's lengths (None: it can)."""
    q_len, kv_len = site.q.shape[2], site.k.shape[2]
    if not (isinstance(q_len, int) and isinstance(kv_len, int)):
        return f"symbolic lengths {q_len}x{kv_len}: a static pattern is made for one block grid"
    block_q, block_k = decision["block_q"], decision["block_k"]
    calibrated = _grid(decision["q_len"], decision["kv_len"], block_q, block_k)
    here = _grid(q_len, kv_len, block_q, block_k)
    if here == calibrated:
        return None
    return (
        f"the static pattern was calibrated for {calibrated[0]}x{calibrated[1]} blocks "
        f"({decision['q_len']}x{decision['kv_len']} tokens), this signature has "
        f"{here[0]}x{here[1]} blocks ({q_len}x{kv_len} tokens)"
    )
