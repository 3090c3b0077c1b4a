"""``linearize``: replace softmax attention by kernelised linear attention, layer by layer.

Entry point: :class:`Linearize`.

Feature maps: ``elu`` (elu+1), ``relu``, ``favor`` (Performer FAVOR+, positive orthogonal random
features: an unbiased softmax estimate that tightens with ``num_features``), ``cosformer``.
``local_window`` makes it a hybrid: exact softmax inside the window, linear attention for the rest,
in one normalisation (L2ViT's local concentration). Sites with an additive bias or a mask other
than key padding stay softmax.

Layer selection (LinVideo's selective transfer): with ``count`` or ``budget`` the pass measures,
on the calibration data, each site's end-to-end error when linearised alone, then linearises the
least sensitive sites first, up to ``count`` sites or while the cosine similarity of every output
stays at or above ``budget``.

Plan: with ``count`` or ``budget`` the pass records, per eligible site, ``{"linearized": bool}``
(and the site's cosine when linearised alone); replaying a plan linearises exactly those sites
without measuring anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from attnopt.errors import PassError, PipelineError, PlanError
from attnopt.ir import Graph
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import (
    Site,
    check_fraction,
    check_positive,
    decline,
    other_variant_declined,
    other_variant_notes,
    sites_for,
)


def _key_padding_only(site: Site) -> bool:
    mask = site.mask
    if mask is None:
        return True
    shape = mask.shape
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def _why_softmax(site: Site) -> str:
    """Why linear attention cannot serve ``site`` (it takes key masks and causality only)."""
    if site.attrs.softcap is not None:
        return "soft-capped scores: stays softmax"
    if site.bias is not None:
        return "an additive bias (relative positions, ALiBi): stays softmax"
    kind = site.attrs.mask_kind or "mask"
    return f"a mask that is not a key mask (mask analysis: {kind}): stays softmax"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


@dataclass(frozen=True)
class Linearize(Pass):
    """Linear (or hybrid) attention at the selected sites (lossy).

    Options:
        feature_map: "elu", "relu", "favor" or "cosformer".
        num_features: random features for "favor" (0: 2 * head_dim).
        seed: seed of the random features.
        local_window: hybrid: exact softmax within this distance (None: pure linear).
        layers: layer indices to consider (None: all).
        sites: site indices to consider (None: all).
        count: linearise at most this many sites, least sensitive first (needs calibration).
        budget: minimum cosine of every output vs the dense model (needs calibration).
    """

    name: ClassVar[str] = "linearize"
    exact: ClassVar[bool] = False
    feature_map: Literal["elu", "relu", "favor", "cosformer"] = "elu"
    num_features: int = 0
    seed: int = 0
    local_window: int | None = None
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None
    count: int | None = None
    budget: float | None = None

    def validate(self) -> None:
        """Ranges of the numeric options."""
        super().validate()
        check_positive(self.name, "num_features", self.num_features, allow_zero=True)
        check_positive(self.name, "local_window", self.local_window)
        check_positive(self.name, "count", self.count, allow_zero=True)
        check_fraction(self.name, "budget", self.budget)
        if self.num_features and self.feature_map != "favor":
            raise PipelineError(f"{self.name}: num_features applies to feature_map=favor only")

    def _apply(self, site: Site) -> None:
        features = self.num_features or (
            2 * int(site.q.shape[-1]) if self.feature_map == "favor" else 0
        )
        site.update(
            variant="hybrid" if self.local_window else "linear",
            feature_map=self.feature_map,
            num_features=features,
            seed=self.seed,
            local_window=self.local_window,
        )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Linearise the eligible sites (all, or the least sensitive when selecting)."""
        notes: list[str] = other_variant_notes(graph, self)
        declined = other_variant_declined(graph, self)
        eligible = []
        for site in sites_for(graph, self):
            if (
                site.bias is not None
                or not _key_padding_only(site)
                or site.attrs.softcap is not None
            ):
                decline(notes, declined, site.index, _why_softmax(site))
                continue
            eligible.append(site)
        if self.count is None and self.budget is None:
            for site in eligible:
                self._apply(site)
            return PassResult(
                changed=bool(eligible), rewrites=len(eligible), notes=notes, declined=declined
            )
        if ctx.replaying:
            chosen = self._replayed(ctx, eligible, notes)
        else:
            chosen = self._select(graph, ctx, eligible, notes)
        for site in eligible:
            if site.index in chosen:
                self._apply(site)
        return PassResult(
            changed=bool(chosen), rewrites=len(chosen), notes=notes, declined=declined
        )

    def _outputs(
        self, graph: Graph, ctx: PassContext, linear: set[int]
    ) -> list[list[torch.Tensor]]:
        trial = graph.copy()
        for node in trial.find("attention"):
            if node.attrs.site in linear:
                self._apply(Site(node))
        results = []
        for args, kwargs in ctx.calibration_batches():
            outputs, _ = ctx.executor(trial, args, kwargs)
            results.append(
                [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            )
        return results

    def _score(
        self, reference: list[list[torch.Tensor]], candidate: list[list[torch.Tensor]]
    ) -> float:
        return min(
            _cosine(r, c) for ref, cand in zip(reference, candidate) for r, c in zip(ref, cand)
        )

    def _select(
        self, graph: Graph, ctx: PassContext, eligible: list[Site], notes: list[str]
    ) -> set[int]:
        if ctx.executor is None or not ctx.calibration_batches():
            raise PassError(f"{self.name}: count/budget selection needs calibration data")
        reference = self._outputs(graph, ctx, set())
        alone = {
            site.index: self._score(reference, self._outputs(graph, ctx, {site.index}))
            for site in eligible
        }
        order = sorted(alone, key=lambda index: -alone[index])
        notes.append(
            "sensitivity (cosine when linearised alone): "
            + ", ".join(f"site {i}: {alone[i]:.5f}" for i in order)
        )
        chosen: set[int] = set()
        for index in order:
            if self.count is not None and len(chosen) >= self.count:
                break
            trial = chosen | {index}
            if self.budget is not None:
                if self._score(reference, self._outputs(graph, ctx, trial)) < self.budget:
                    continue
            chosen = trial
        notes.append(f"linearised sites {sorted(chosen)}")
        for site in eligible:
            ctx.record(
                self,
                site,
                {"linearized": site.index in chosen, "cosine_alone": alone[site.index]},
            )
        return chosen

    def _replayed(self, ctx: PassContext, eligible: list[Site], notes: list[str]) -> set[int]:
        """The sites a replayed plan linearises (every decision is checked before any rewrite)."""
        chosen = set()
        for site in eligible:
            decision = ctx.decision(self, site)
            assert decision is not None
            if not isinstance(decision.get("linearized"), bool):
                raise PlanError(
                    f"{self}: the plan's decision {decision!r} for site {ctx.site_key(site)!r} "
                    "has no linearized=true/false"
                )
            if decision["linearized"]:
                chosen.add(site.index)
        notes.append(f"linearised sites {sorted(chosen)} (plan)")
        return chosen
