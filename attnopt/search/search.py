"""The budgeted search: the fastest plan whose measured error on the user's data stays within
their budget.

Entry points: :func:`search` (``attnopt.compile(..., budget=..., calibration=...)`` calls it),
:class:`SearchPoint`.

How it works (every number is measured here, on the calibration batches; nothing is predicted):

Errors are measured at real positions only when the data is padded (a 2-D ``*mask*`` keyword
input with zeros): what a model computes at padding is not used, and token reduction changes it.

1. The exact plan (``canonicalize,fuse-attention``) is compiled once; its sites, their lengths and
   masks decide which families apply (:func:`attnopt.search.space.search_space`). The model is
   captured once and every candidate compiles from a copy of that capture.
2. Exact families (padding removal) are kept when they are faster.
3. Each lossy family alone, on top of that: its ladder of levels (mild to aggressive) is bisected
   for the most aggressive level within the budget (error grows along a ladder); the fastest
   level within budget is the family's best.
4. Combined, interaction-aware: families are added greedily in order of their speed alone, each
   at its best level, and the *combination* is measured again; when the combination breaks the
   budget (errors add up across layers), the family steps down its ladder until it fits or is
   dropped. Families of one group (two ways of dropping tokens) are never combined.
5. With ``validation`` data, the chosen plan is re-checked on it; when it breaks the budget there,
   the next fastest plan that met the budget on calibration is checked instead, down to exact.

A candidate counts as faster only when it beats the current plan by ``min_gain`` (3%), so timing
noise does not pick a lossy plan for nothing. The search stops at ``max_seconds`` with the best
plan found so far (the report says so). The model's parameters are never modified: passes build
new tensors.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnopt.compiled import CompiledModule
from attnopt.errors import CalibrationError, PlanError
from attnopt.passes.base import as_pipeline, calibration_batch
from attnopt.passes.plan import Plan
from attnopt.search.report import SearchPoint, SearchReport
from attnopt.search.space import Family, search_space
from attnopt.validate.api import compare_runs
from attnopt.validate.budget import Budget
from attnopt.validate.errors import ValidationError

__all__ = ["EXACT_PIPELINE", "search"]

#: The plan every search starts from (and falls back to).
EXACT_PIPELINE = "canonicalize,fuse-attention"

Batch = tuple[tuple, dict]


@dataclass
class _Candidate:
    point: SearchPoint
    module: CompiledModule | None = None
    plan: Plan | None = None


@dataclass
class _State:
    deadline: float
    points: list[SearchPoint] = field(default_factory=list)
    cut_short: bool = False


def _batches(data: Any, what: str) -> list[Batch]:
    """``data`` as ``(args, kwargs)`` batches; dicts are keyword inputs, tensors one argument."""
    if data is None:
        raise CalibrationError(
            f"the budgeted search needs {what}: an iterable of (args, kwargs) batches (or dicts "
            "of keyword inputs, such as a tokenizer's output) from your own data"
        )
    if isinstance(data, torch.Tensor) or hasattr(data, "keys"):
        raise CalibrationError(
            f"{what} must be an iterable of batches, not one {type(data).__name__}: wrap it in "
            "a list"
        )
    try:
        items = list(data)
    except TypeError:
        raise CalibrationError(
            f"{what} must be an iterable of (args, kwargs) batches, not {type(data).__name__}"
        ) from None
    normalised = [calibration_batch(item, position, what) for position, item in enumerate(items)]
    if not normalised:
        raise CalibrationError(f"{what} is empty: give at least one batch of your own data")
    first = _structure(normalised[0])
    for position, batch in enumerate(normalised[1:], start=1):
        if _structure(batch) != first:
            raise CalibrationError(
                f"{what} batch {position} has inputs {_structure(batch)}, batch 0 has {first}: "
                "every batch must give the model the same inputs"
            )
    return normalised


def _structure(batch: Batch) -> tuple:
    args, kwargs = batch
    return (len(args), tuple(sorted(kwargs)))


def _shapes(batch: Batch) -> tuple:
    args, kwargs = batch
    return tuple(
        (name, tuple(value.shape))
        for name, value in [*enumerate(args), *sorted(kwargs.items())]
        if isinstance(value, torch.Tensor)
    )


def _run(model: Callable, batches: list[Batch]) -> list[Any]:
    with torch.no_grad():
        return [model(*args, **kwargs) for args, kwargs in batches]


def _timed(model: Callable, batches: list[Batch], repeats: int) -> tuple[float, list[Any]]:
    """Seconds for one pass over ``batches`` (best of ``repeats``; the caller warms the model
    up) and the outputs of the first pass."""
    with torch.no_grad():
        best, outputs = math.inf, None
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            run = [model(*a, **k) for a, k in batches]
            best = min(best, time.perf_counter() - start)
            outputs = outputs if outputs is not None else run
    return best, outputs or []


def _padding_input(batches: list[Batch]) -> str | None:
    """The ``attention_mask``-like keyword input (2-D, named ``*mask*``) that has zeros (padded
    positions) in some batch, or None."""
    for _, kwargs in batches:
        for name, value in kwargs.items():
            if "mask" in name and isinstance(value, torch.Tensor) and value.dim() == 2:
                if bool((value == 0).any()):
                    return name
    return None


def _worst(report: Any) -> dict[str, float]:
    """The worst value of each metric over the outputs of a report."""
    worst: dict[str, float] = {}
    rules = {"cosine": min, "sqnr_db": min, "rel_l2": max, "max_abs": max}
    for name, metrics in report.metrics.items():
        if name.startswith("metric:"):
            worst[name] = metrics["value"]
            continue
        for key, pick in rules.items():
            if key in metrics:
                worst[key] = pick(worst.get(key, metrics[key]), metrics[key])
        if "top1_agreement" in metrics:
            worst["top1"] = min(worst.get("top1", 1.0), metrics["top1_agreement"])
    return worst


class _Searcher:
    def __init__(
        self,
        model: torch.nn.Module,
        example: Batch,
        batches: list[Batch],
        budget: Budget,
        *,
        backend: str,
        repeats: int,
        min_gain: float,
        deadline: float,
        progress: Any,
    ):
        self.model = model
        self.example = example
        self.batches = batches
        self.budget = budget
        self.backend = backend
        self.repeats = repeats
        self.min_gain = min_gain
        self.state = _State(deadline=deadline)
        self.progress = progress
        self.captures: dict[tuple, Any] = {}
        self.padding = _padding_input(batches)
        # Batches of one shape (padded to a fixed length): candidates compile for that shape,
        # which is several times faster than symbolic shape inference; the returned module is
        # compiled with symbolic shapes again.
        shapes = {_shapes(batch) for batch in batches}
        self.dynamic: bool | None = False if len(shapes) == 1 else None
        # The reference outputs come from the original model's first timed pass (the caller
        # warmed it up).
        self.eager_seconds, self.reference = _timed(model, batches, max(2, repeats))
        self.base: _Candidate | None = None
        self.cache: dict[str, _Candidate] = {}

    def out_of_time(self) -> bool:
        if time.perf_counter() >= self.state.deadline:
            self.state.cut_short = True
            return True
        return False

    def evaluate(self, steps: list[str], stage: str) -> _Candidate:
        """Compile ``exact + steps``, time it on the calibration batches, measure its error."""
        pipeline = _pipeline(steps)
        if pipeline in self.cache:
            return self.cache[pipeline]
        label = " + ".join(steps) or "exact"
        self.progress(f"trying {label}")
        start = time.perf_counter()
        module = CompiledModule(
            self.model,
            as_pipeline(pipeline),
            backend=self.backend,
            calibration=self.batches,
            captures=self.captures,
            check_static=False,
            dynamic=self.dynamic,
        )
        declined: list[str] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module.compile_for(*self.example)
            declined = [str(w.message) for w in caught if "left attention sites" in str(w.message)]
            compile_seconds = time.perf_counter() - start
            # Error first (this pass also warms up); only a plan within budget is timed.
            seconds, outputs = _timed(module, self.batches, 1)
            report = self.compare(self.reference, outputs, self.batches, module)
            if report.ok:
                seconds, _ = _timed(module, self.batches, self.repeats)
        except ValidationError:
            raise  # the user's metric failed: theirs to fix, not a candidate to skip
        except Exception as error:  # noqa: BLE001 - a candidate that fails is recorded, not fatal
            point = SearchPoint(
                label=label,
                pipeline=pipeline,
                stage=stage,
                seconds=math.inf,
                ok=False,
                failures=[f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"],
            )
            candidate = _Candidate(point)
        else:
            history = module.history
            last = history[-1] if steps and history else None
            no_effect = bool(steps) and last is not None and not last.get("rewrites")
            point = SearchPoint(
                label=label,
                pipeline=pipeline,
                stage=stage,
                seconds=seconds,
                compile_seconds=compile_seconds,
                metrics=_worst(report),
                ok=report.ok,
                failures=list(report.failures),
                declined=declined,
                no_effect=no_effect,
            )
            candidate = _Candidate(point, module, module.plan)
        self.state.points.append(candidate.point)
        self.cache[pipeline] = candidate
        if not candidate.point.ok:
            candidate.module = None  # keep the memory of failures small
        return candidate

    def compare(
        self, reference: list, outputs: list, batches: list[Batch], module: CompiledModule
    ) -> Any:
        """The budget's report on these outputs: at real positions only when the data is
        padded (what a model computes at padding is not used, and token reduction changes it)."""
        padding = self.padding or module.removed_padding
        return compare_runs(
            reference,
            outputs,
            batches,
            tolerance=self.budget,
            padding_input=padding,
            real_positions_only=True,
        )

    def faster(self, candidate: _Candidate, than: _Candidate) -> bool:
        """Whether ``candidate`` (within budget, rewriting something) beats ``than`` by
        ``min_gain``. A candidate that looks faster is timed again interleaved with ``than``
        (A B A B, best of each), so a burst of machine noise does not decide."""

        def beats() -> bool:
            return candidate.point.seconds < than.point.seconds * (1.0 - self.min_gain)

        if not (candidate.point.ok and not candidate.point.no_effect and beats()):
            return False
        if candidate.module is None or than.module is None or self.out_of_time():
            return beats()
        for _ in range(self.repeats):
            for contender in (than, candidate):
                seconds, _ = _timed(contender.module, self.batches, 1)
                contender.point.seconds = min(contender.point.seconds, seconds)
        return beats()

    def best_level(self, family: Family, steps: list[str], current: _Candidate) -> int | None:
        """The family's fastest level within budget on top of ``steps`` (bisecting the ladder
        for the most aggressive level within budget), or None."""
        levels = family.levels
        ok: dict[int, _Candidate] = {}

        def probe(i: int) -> bool:
            candidate = self.evaluate([*steps, levels[i]], stage=f"alone: {family.name}")
            if candidate.point.ok and not candidate.point.no_effect:
                ok[i] = candidate
                return True
            return False

        if self.out_of_time() or not probe(0):
            return None
        low, high = 0, len(levels) - 1
        if high > 0 and not self.out_of_time() and probe(high):
            low = high
        while high - low > 1 and not self.out_of_time():
            middle = (low + high) // 2
            if probe(middle):
                low = middle
            else:
                high = middle
        fastest = min(ok, key=lambda i: ok[i].point.seconds)
        return fastest if self.faster(ok[fastest], current) else None


def search(
    model: torch.nn.Module,
    example: Batch | None,
    calibration: Iterable[Any],
    budget: Budget,
    *,
    validation: Iterable[Any] | None = None,
    max_seconds: float = 300.0,
    families: Iterable[str] | None = None,
    backend: str = "auto",
    repeats: int = 2,
    min_gain: float = 0.03,
    strict: bool = False,
    progress: bool = True,
) -> tuple[CompiledModule, SearchReport]:
    """Search for the fastest plan within ``budget`` on ``calibration`` (see the module doc).

    Args:
        model: the model (never modified).
        example: the ``(args, kwargs)`` to compile for; None: the first calibration batch.
        calibration: batches of the user's data: ``(args, kwargs)`` pairs, or dicts of keyword
            inputs. Error and speed are measured on them.
        budget: the accuracy to keep (:class:`attnopt.Budget`).
        validation: held-out batches the chosen plan is re-checked on.
        max_seconds: stop searching after this long with the best plan found so far.
        families: restrict the search to these families (:data:`attnopt.search.FAMILIES`).
        backend: the runtime backend.
        repeats: timed passes over the calibration batches per candidate (best is kept).
        min_gain: the fraction by which a candidate must beat the current plan to be kept.
        strict: raise :class:`attnopt.PlanError` when no plan meets the budget (not even
            exact) instead of warning and returning the exact plan.
        progress: show a progress bar and print the Pareto table (stderr).

    Returns:
        ``(compiled module, report)``: the module replays the chosen plan (``cm.plan``) and
        carries the report as ``cm.search_report``.

    Raises:
        CalibrationError: empty or ill-shaped calibration/validation data, or data the model
            cannot run on.
        ValidationError: the budget's metric callable raised or returned a non-finite value.
        PlanError: with ``strict``, a budget no plan meets.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be an attnopt.Budget, not {type(budget).__name__}")
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds, not {max_seconds!r}")
    batches = _batches(calibration, "calibration")
    held_out = _batches(validation, "validation") if validation is not None else None
    if example is None or example == ((), {}):
        example = batches[0]
    start = time.perf_counter()
    try:
        _run(model, batches[:1])
    except Exception as error:
        raise CalibrationError(
            f"the model cannot run calibration batch 0: {type(error).__name__}: {error}"
        ) from error
    from attnopt.passes.precision import native_bf16
    from attnopt.search.report import progress_reporter

    with progress_reporter(progress, max_seconds) as tell:
        searcher = _Searcher(
            model,
            example,
            batches,
            budget,
            backend=backend,
            repeats=repeats,
            min_gain=min_gain,
            deadline=start + max_seconds,
            progress=tell,
        )
        base = searcher.evaluate([], stage="exact")
        searcher.base = base
        notes: list[str] = []
        if not base.point.ok or base.module is None:
            chosen, steps = base, []
            notes.append("no plan meets the budget on the calibration data, not even the exact one")
        else:
            hints = base.module.graph.meta.get("symbol_hints", {})
            space = search_space(
                base.module.sites,
                hints,
                families=families,
                bf16_native=native_bf16()[0],
                has_padding=searcher.padding is not None,
            )
            notes += [f"{kind}: not tried ({reason})" for kind, reason in space.skipped.items()]
            chosen, steps = _greedy(searcher, base, space.families, notes)
    # Speed-ups against the final (best) timings of exact and eager, once all are measured.
    for point in searcher.state.points:
        if point.seconds > 0:
            point.speedup = base.point.seconds / point.seconds
            point.eager_speedup = searcher.eager_seconds / point.seconds
    report = SearchReport(
        budget=budget.describe(),
        points=searcher.state.points,
        chosen=chosen.point,
        eager_seconds=searcher.eager_seconds,
        calibration_batches=len(batches),
        cut_short=searcher.state.cut_short,
        notes=notes,
    )
    module = _final(model, example, chosen, backend)
    if held_out is not None:
        module, chosen = _validated(searcher, report, module, chosen, held_out, example, backend)
    report.chosen = chosen.point
    report.seconds = time.perf_counter() - start
    if not report.chosen.ok or (report.validation and not report.validation.get("ok")):
        message = (
            f"attnopt: no plan meets the budget ({budget.describe()}), not even the exact one "
            f"({'; '.join(report.chosen.failures or report.validation.get('failures', []))}): "
            "the exact plan is used; loosen the budget or check the metric"
        )
        if strict:
            raise PlanError(message + " (strict=True: compile with strict=False to accept it)")
        warnings.warn(message, UserWarning, stacklevel=3)
    if searcher.state.cut_short:
        warnings.warn(
            f"attnopt: the budgeted search stopped at max_seconds={max_seconds:g} with the best "
            "plan found so far; give it more time for a faster plan",
            UserWarning,
            stacklevel=3,
        )
    module.search_report = report
    if progress:
        report.print()
    return module, report


def _greedy(
    searcher: _Searcher, base: _Candidate, families: list[Family], notes: list[str]
) -> tuple[_Candidate, list[str]]:
    """Exact steps first, then each lossy family alone, then the greedy combination."""
    current, steps = base, []
    for family in [f for f in families if f.exact]:
        if searcher.out_of_time():
            break
        candidate = searcher.evaluate([*steps, family.levels[0]], stage="exact step")
        if searcher.faster(candidate, current):
            current, steps = candidate, [*steps, family.levels[0]]
    alone: dict[str, tuple[int, _Candidate]] = {}
    for family in [f for f in families if not f.exact]:
        level = searcher.best_level(family, steps, current)
        if level is not None:
            alone[family.name] = (level, searcher.cache[_pipeline([*steps, family.levels[level]])])
    by_name = {f.name: f for f in families}
    taken_groups: set[str] = set()
    for name in sorted(alone, key=lambda n: alone[n][1].point.seconds):
        family = by_name[name]
        if family.group in taken_groups:
            continue
        level = alone[name][0]
        while level >= 0 and not searcher.out_of_time():
            trial = [*steps, family.levels[level]]
            candidate = searcher.evaluate(trial, stage="combined")
            if searcher.faster(candidate, current):
                current, steps = candidate, trial
                taken_groups.add(family.group)
                break
            if candidate.point.ok:
                break  # within budget but no faster: a milder level will not be faster either
            level -= 1  # the combination broke the budget: step down the ladder
    if not steps:
        notes.append("no rewrite beyond exact fusion was faster within the budget")
    return current, steps


def _pipeline(steps: list[str]) -> str:
    return ",".join([EXACT_PIPELINE, *steps])


def _final(
    model: torch.nn.Module, example: Batch, chosen: _Candidate, backend: str
) -> CompiledModule:
    """The chosen plan as a fresh compiled module that replays it (no calibration)."""
    plan = chosen.plan
    for dynamic in (None, False):
        module = CompiledModule(
            model,
            as_pipeline(chosen.point.pipeline),
            backend=backend,
            plan=plan,
            dynamic=dynamic,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the search recorded what each step declined
            try:
                module.compile_for(*example)
            except PlanError:
                if dynamic is False:
                    raise
                continue  # the symbolic graph's sites differ from the plan's: per shape
        return module
    raise AssertionError("unreachable")


def _validated(
    searcher: _Searcher,
    report: SearchReport,
    module: CompiledModule,
    chosen: _Candidate,
    held_out: list[Batch],
    example: Batch,
    backend: str,
) -> tuple[CompiledModule, _Candidate]:
    """Re-check the chosen plan on held-out data; step back to the next fastest plan that met
    the budget on calibration when it breaks it there (exact last)."""
    reference = _run(searcher.model, held_out)
    ranked = sorted(
        (c for c in searcher.cache.values() if c.point.ok and c.plan is not None),
        key=lambda c: c.point.seconds,
    )
    tries = [chosen, *[c for c in ranked if c is not chosen][:3]]
    if searcher.base is not None and all(c is not searcher.base for c in tries):
        tries.append(searcher.base)
    for attempt, candidate in enumerate(tries):
        if attempt:
            module = _final(searcher.model, example, candidate, backend)
        result = searcher.compare(reference, _run(module, held_out), held_out, module)
        candidate.point.validation = _worst(result)
        report.validation = {
            "plan": candidate.point.label,
            "batches": len(held_out),
            "ok": result.ok,
            "metrics": candidate.point.validation,
            "failures": list(result.failures),
        }
        if result.ok:
            if attempt:
                report.notes.append(
                    f"the fastest plan on calibration broke the budget on the validation data; "
                    f"{candidate.point.label} is used instead"
                )
            return module, candidate
    return module, candidate
