"""``head-prune``: remove the least important attention heads by slicing weights.

Entry point: :class:`HeadPrune`.

For each selected site whose q/k/v come from ``linear`` projections (through reshapes, transposes
and per-head elementwise ops such as rotary embeddings) and whose output reaches an output
``linear``, the pass keeps the ``keep`` most important heads (whole key/value groups under GQA):
the q/k/v projection rows and the output projection columns of the other heads are sliced away, and
shapes are re-inferred. Importance is measured on calibration data: the mean norm of each head's
attention output times the norm of its output-projection columns (its contribution to the
layer's output). Sites where slicing cannot be shown to keep the graph consistent are left alone,
with the reason in the pass notes: besides the structural checks and shape re-inference, every
pruned site is run on the first calibration batch before and after slicing, and the kept heads'
attention outputs must not change (an opaque op between a projection and the attention that
mixed heads would change them).

Plan: the pass records, per site, ``{"heads_kept": [query heads]}`` or ``{"heads_kept": null,
"reason": ...}`` for a site it left alone; replaying a plan slices exactly those heads without
scoring (no calibration data, no graph runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnopt.errors import PassError, PlanError
from attnopt.ir import Graph, Node, Value, verify
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.helpers import VIEW_OPS
from attnopt.passes.select import Site, check_fraction, decline, sites_for

__all__ = ["HeadPrune"]

#: Ops allowed between a projection and the attention input (they act per head or per position).
_PER_HEAD_OPS = {*VIEW_OPS, "mul", "add", "sub", "neg", "cast", "aten"}


def _projection(value: Value) -> Node | None:
    """The ``linear`` that produces ``value`` through per-head ops (its own readers are checked
    by the caller)."""
    current = value
    for _ in range(64):
        node = current.producer
        if node is None:
            return None
        if node.op == "linear":
            return node
        if node.op not in _PER_HEAD_OPS:
            return None
        tensor_inputs = [
            v
            for v in node.inputs
            if v is not None and v.producer is not None and v.producer.op != "param"
        ]
        chained = [v for v in tensor_inputs if _depends_on_linear(v)]
        if not chained:
            return None
        current = chained[0]
    return None


def _depends_on_linear(value: Value, depth: int = 64) -> bool:
    while depth and value.producer is not None:
        node = value.producer
        if node.op == "linear":
            return True
        inputs = [
            v
            for v in node.inputs
            if v is not None and v.producer is not None and v.producer.op != "param"
        ]
        if not inputs:
            return False
        value = inputs[0]
        depth -= 1
    return False


def _output_projection(value: Value, users: dict[Value, list[Node]]) -> Node | None:
    current = value
    for _ in range(16):
        readers = [n for n in users.get(current, []) if n.op != "site_tap"]  # observers
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op == "linear" and node.inputs[0] is current:
            return node
        if node.op == "where" and node.inputs[2] is current and node.inputs[0] is not current:
            # eager's rows with every key masked (the mean of v): per-head, sliced with v
            current = node.output
            continue
        if node.op not in VIEW_OPS:
            return None
        current = node.output
    return None


def _param_tensor(graph: Graph, value: Value | None) -> torch.Tensor | None:
    if value is None or value.producer is None or value.producer.op != "param":
        return None
    return graph.tensors.get(value.producer.attrs.name)


@dataclass(frozen=True)
class HeadPrune(Pass):
    """Keep the most important fraction of heads per site (lossy; ``keep=1.0`` is exact).

    Options:
        keep: fraction of query heads kept per site (rounded to whole key/value groups).
        layers: layer indices to prune (None: all).
        sites: site indices to prune (None: all).
    """

    name: ClassVar[str] = "head-prune"
    exact: ClassVar[bool] = False
    keep: float = 0.5
    layers: tuple[int, ...] | None = None
    sites: tuple[int, ...] | None = None

    def validate(self) -> None:
        """``keep`` in (0, 1]."""
        super().validate()
        check_fraction(self.name, "keep", self.keep)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Score heads on calibration data (or take the replayed plan's heads), then slice the
        weights of the dropped heads."""
        chosen = sites_for(graph, self, variant=None)
        if ctx.replaying:
            return self._replay(graph, ctx, chosen)
        notes: list[str] = []
        declined: list[tuple[int, str]] = []
        importance = self._importance(graph, ctx, chosen) if chosen and self.keep < 1.0 else {}
        pruned = 0
        taps_before = None
        for index in [site.index for site in chosen]:
            site = next(s for s in sites_for(graph, self, variant=None) if s.index == index)
            snapshot = graph.copy()
            kept: torch.Tensor | None = None
            try:
                reason, kept = self._prune(graph, site, importance.get(index))
                if reason is None:
                    graph.infer_types()
                    verify(graph)
                    reason = _outputs_keep_their_types(snapshot, graph)
            except Exception as err:  # noqa: BLE001 - any inconsistency means: leave the site alone
                reason = f"shapes do not re-infer after slicing ({type(err).__name__}: {err})"
            if reason is None:
                try:
                    if taps_before is None:
                        taps_before = self._taps(snapshot, ctx)
                    taps_after = self._taps(graph, ctx)
                except Exception as err:  # noqa: BLE001 - a graph that no longer runs: refuse
                    reason = f"the sliced graph does not run ({type(err).__name__}: {err})"
                else:
                    reason = _kept_heads_unchanged(taps_before, taps_after, index, kept)
                if reason is None:
                    taps_before = taps_after
            if reason is not None:
                _restore(graph, snapshot)
                decline(notes, declined, index, f"not pruned: {reason}")
                ctx.record(self, site, {"heads_kept": None, "reason": reason})
                continue
            assert kept is not None
            _mark_heads_kept(graph, index, kept)
            ctx.record(self, site, {"heads_kept": [int(h) for h in kept]})
            pruned += 1
        return PassResult(changed=bool(pruned), rewrites=pruned, notes=notes, declined=declined)

    def _replay(self, graph: Graph, ctx: PassContext, chosen: list[Site]) -> PassResult:
        """Slice the heads a replayed plan keeps, without running the graph: every decision is
        read and checked before the first slice, and shapes are re-inferred once for all sites
        (the numerical check ran when the plan was recorded, on the same model)."""
        planned = {site.index: _planned_heads(self, site, ctx) for site in chosen}
        before = graph.copy()
        notes: list[str] = []
        pruned: dict[int, torch.Tensor] = {}
        for index, kept in planned.items():
            if kept is None:
                notes.append(f"site {index}: not pruned (plan)")
                continue
            site = next(s for s in sites_for(graph, self, variant=None) if s.index == index)
            try:
                reason, _ = self._prune(graph, site, None, kept)
            except Exception as err:  # noqa: BLE001 - reported as the plan not fitting
                reason = f"slicing failed ({type(err).__name__}: {err})"
            if reason is not None:
                raise PlanError(f"{self}: the plan prunes site {index}, but {reason}")
            pruned[index] = kept
        if pruned:
            try:
                graph.infer_types()
                verify(graph)
            except Exception as err:  # noqa: BLE001 - reported as the plan not fitting
                raise PlanError(
                    f"{self}: shapes do not re-infer after slicing the plan's heads "
                    f"({type(err).__name__}: {err})"
                ) from err
            reason = _outputs_keep_their_types(before, graph)
            if reason is not None:
                raise PlanError(f"{self}: the plan's heads cannot be sliced: {reason}")
        for index, kept in pruned.items():
            _mark_heads_kept(graph, index, kept)
        return PassResult(changed=bool(pruned), rewrites=len(pruned), notes=notes)

    def _importance(
        self, graph: Graph, ctx: PassContext, chosen: list[Site]
    ) -> dict[int, torch.Tensor]:
        if ctx.executor is None:
            raise PassError(f"{self.name}: needs a runtime to score heads")
        batches = ctx.calibration_batches()
        if not batches:
            raise PassError(f"{self.name}: needs calibration=[(args, kwargs), ...] to score heads")
        norms: dict[int, torch.Tensor] = {}
        for args, kwargs in batches:
            _, taps = ctx.executor(graph, args, kwargs)
            for site in chosen:
                out = taps.get(site.index)
                if out is None:
                    continue
                per_head = out.float().pow(2).sum(dim=(0, 2, 3)).sqrt()
                norms[site.index] = norms.get(site.index, 0) + per_head
        return norms

    @staticmethod
    def _taps(graph: Graph, ctx: PassContext) -> dict[int, torch.Tensor]:
        """Attention outputs per site on the first calibration batch."""
        args, kwargs = ctx.calibration_batches()[0]
        return ctx.executor(graph, args, kwargs)[1]  # type: ignore[misc]

    def _prune(
        self, graph: Graph, site: Site, head_norms: Any, planned: torch.Tensor | None = None
    ) -> tuple[str | None, torch.Tensor | None]:
        """Slice one site's projections: ``(None, kept query heads)``, or ``(reason, None)``.

        The kept heads are ``planned`` (from a replayed plan) or the best by ``head_norms``."""
        users = graph.users()
        unfit = site.heads_unfit(())
        if unfit is not None:
            return unfit, None
        heads, kv_heads = site.num_heads, int(site.k.shape[1])
        head_dim, value_dim = int(site.q.shape[3]), int(site.v.shape[3])
        group = heads // kv_heads
        keep_groups = max(1, round(self.keep * kv_heads))
        if planned is None and keep_groups >= kv_heads:
            return "nothing to prune at this keep fraction", None
        for extra in site.node.inputs[3:5]:
            if extra is not None and len(extra.shape) == 4 and extra.shape[1] not in (1,):
                return "a per-head mask or bias", None
        projections = [_projection(v) for v in (site.q, site.k, site.v)]
        out_proj = _output_projection(site.node.output, users)
        if any(p is None for p in projections) or out_proj is None:
            return "q/k/v or output projections not found", None
        if len({id(p) for p in projections}) != 3:
            return "q, k and v share a projection", None
        for proj in projections:
            if len(users.get(proj.output, [])) != 1:
                return "a projection output is read elsewhere", None
        if planned is None and head_norms is None:
            return "the site did not run during calibration", None
        out_weight = _param_tensor(graph, out_proj.inputs[1])
        if out_weight is None or out_weight.shape[1] != heads * value_dim:
            return "output projection weight does not match the heads", None
        if planned is not None:
            kept_groups = planned.reshape(-1, group)[:, 0] // group
        else:
            column_norms = (
                out_weight.float().reshape(out_weight.shape[0], heads, value_dim).norm(dim=(0, 2))
            )
            scores = (head_norms * column_norms).reshape(kv_heads, group).sum(dim=1)
            kept_groups = torch.topk(scores, keep_groups).indices.sort().values
        kept_q = (kept_groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        for proj, kept, dim in (
            (projections[0], kept_q, head_dim),
            (projections[1], kept_groups, head_dim),
            (projections[2], kept_groups, value_dim),
        ):
            self._slice_rows(graph, proj, kept, dim)
        self._slice_columns(graph, out_proj, kept_q, value_dim)
        return None, kept_q

    @staticmethod
    def _slice_rows(graph: Graph, proj: Node, kept: torch.Tensor, dim: int) -> None:
        rows = (kept[:, None] * dim + torch.arange(dim)[None, :]).reshape(-1)
        for position in (1, 2):
            tensor = _param_tensor(graph, proj.inputs[position])
            if tensor is None:
                if position == 2 and proj.inputs[2] is None:
                    continue
                raise ValueError("projection weight or bias is not a parameter")
            new = graph.add_tensor(
                f"{proj.inputs[position].producer.attrs.name}.pruned",
                tensor.index_select(0, rows).contiguous(),
            )  # type: ignore[union-attr]
            proj.inputs[position] = new

    @staticmethod
    def _slice_columns(graph: Graph, proj: Node, kept: torch.Tensor, dim: int) -> None:
        columns = (kept[:, None] * dim + torch.arange(dim)[None, :]).reshape(-1)
        tensor = _param_tensor(graph, proj.inputs[1])
        assert tensor is not None
        name = proj.inputs[1].producer.attrs.name  # type: ignore[union-attr]
        proj.inputs[1] = graph.add_tensor(
            f"{name}.pruned", tensor.index_select(1, columns).contiguous()
        )


def _mark_heads_kept(graph: Graph, index: int, kept: torch.Tensor) -> None:
    """Record on site ``index``'s node how many query heads it still computes."""
    for node in graph.find("attention"):
        if node.attrs.site == index:
            node.meta.setdefault("site", {})["heads_kept"] = int(kept.numel())


def _planned_heads(owner: HeadPrune, site: Site, ctx: PassContext) -> torch.Tensor | None:
    """The query heads a replayed plan keeps at ``site`` (None: not replaying, or not pruned).

    Raises:
        PlanError: the recorded heads are not whole key/value groups of this site's heads.
    """
    decision = ctx.decision(owner, site)
    if decision is None or decision.get("heads_kept") is None:
        return None
    unfit = site.heads_unfit(())
    if unfit is not None:
        raise PlanError(f"{owner.name}: the plan prunes heads of site {site.index}, but {unfit}")
    heads, kv_heads = site.num_heads, int(site.k.shape[1])
    group = heads // kv_heads
    kept = decision["heads_kept"]
    valid = (
        isinstance(kept, list)
        and 0 < len(kept) < heads
        and len(kept) % group == 0
        and all(isinstance(h, int) and 0 <= h < heads for h in kept)
    )
    if valid:
        tensor = torch.tensor(kept, dtype=torch.long)
        firsts = tensor.reshape(-1, group)[:, :1]
        valid = bool(
            (tensor.reshape(-1, group) == firsts + torch.arange(group)).all()
            and (firsts % group == 0).all()
            and (firsts.flatten().diff() > 0).all()
        )
    if not valid:
        raise PlanError(
            f"{owner}: the plan's heads_kept={kept!r} for site {ctx.site_key(site)!r} are not "
            f"whole groups of {group} among its {heads} heads, ascending"
        )
    return tensor


def _kept_heads_unchanged(before: dict, after: dict, index: int, kept: torch.Tensor) -> str | None:
    """None when site ``index``'s kept heads compute what they computed before slicing."""
    old, new = before.get(index), after.get(index)
    if old is None or new is None:
        return "the site did not run on the calibration batch"
    old = old.index_select(1, kept.to(old.device))
    if old.shape != new.shape:
        return f"the pruned site's output has shape {tuple(new.shape)}, not {tuple(old.shape)}"
    scale = old.abs().max().clamp_min(1e-30)
    if not torch.allclose(new, old, rtol=1e-4, atol=1e-5 * float(scale)):
        worst = (new - old).abs().max().item()
        return (
            "the kept heads' attention outputs changed after slicing (max diff "
            f"{worst:.2e}): an op between a projection and the attention mixes heads"
        )
    return None


def _outputs_keep_their_types(before: Graph, after: Graph) -> str | None:
    """None when slicing left every graph output's shape and dtype as it was (a lossy pass never
    changes the model's outputs: a projection or head layout that is also returned blocks it)."""
    for position, (old, new) in enumerate(zip(before.outputs, after.outputs)):
        if old is not None and new is not None and old.type != new.type:
            return (
                f"graph output {position} reads a sliced value ({old.type} would become {new.type})"
            )
    return None


def _restore(graph: Graph, snapshot: Graph) -> None:
    graph.inputs, graph.nodes, graph.outputs = snapshot.inputs, snapshot.nodes, snapshot.outputs
    graph._names = snapshot._names  # noqa: SLF001 - restoring the same object's state
