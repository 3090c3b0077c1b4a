"""Accuracy budgets and tolerance presets: how a tolerance is resolved and an output judged.

Entry points: :class:`Budget`, :func:`resolve_tolerance` (a user's ``tolerance`` argument ->
:class:`Criterion`), :func:`judge_metrics` (why an output's metrics fail a criterion),
:meth:`Criterion.rule` (the verdict rule as one line of text, as reports state it).

A tolerance is one of:

- ``"exact"`` (the default): the fp64-oracle rule. A float64 copy of the reference runs on
  float64 copies of the inputs (the oracle); each floating output passes when
  ``RMSE(candidate - oracle) <= k * RMSE(reference - oracle) + floor``, with
  ``k = attnopt.tolerances.ORACLE_ERROR_RATIO`` (2; ``ORACLE_ERROR_RATIO_LOOSE`` = 3 for outputs
  under ``ORACLE_SMALL_NUMEL`` = 1000 elements and for fp16/bf16 outputs) and
  ``floor = ORACLE_FLOOR_EPS (1) * eps(dtype) * RMS(oracle)``
  (:func:`attnopt.tolerances.oracle_allowed_error`). A rewrite that only reorders float
  arithmetic is as close to the true value as the reference itself, so it passes even where it
  differs from the reference by more than an elementwise tolerance; a wrong computation is far
  from both. This is torch._dynamo's accuracy rule (``same(..., fp64_ref=...)``) without its
  elementwise first try. Integer and bool outputs must be equal. Without an oracle (the model
  cannot run in float64, or :func:`~attnopt.validate.build_report` got none) or for an output
  the oracle did not return in float64, ``"exact"`` falls back to ``"exact-elementwise"``.
- ``"exact-elementwise"``: elementwise ``|cand - ref| <= atol + rtol * |ref|`` with the per-dtype
  table :data:`attnopt.tolerances.EXACT` (dtype of the reference output).
- ``"none"`` (alias ``"no-rewrite"``): the same check with the tighter table
  :data:`attnopt.tolerances.NO_REWRITE`, for a compile with ``passes="none"``.
- ``"lossy-tight"``, ``"lossy"``, ``"lossy-loose"``: the presets of
  :data:`attnopt.tolerances.LOSSY_BUDGETS`.
- a :class:`Budget`: limits on cosine, SQNR, max abs error, relative L2 error, top-1 agreement.

When an oracle is given with an elementwise tolerance (``oracle=True``), an output outside the
table still passes when it meets the fp64-oracle rule (torch._dynamo's two-step check); with a
budget the oracle errors are recorded only. Attention sites (per-site outputs) have no oracle:
they are judged by the elementwise table of the tolerance.

Every tolerance fails an output whose non-finite values (NaN, inf) differ from the reference's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from attnopt.tolerances import (
    EXACT,
    LOSSY_BUDGETS,
    NO_REWRITE,
    ORACLE_ERROR_RATIO,
    ORACLE_ERROR_RATIO_LOOSE,
    ORACLE_FLOOR_EPS,
    ORACLE_SMALL_NUMEL,
    Tolerance,
)
from attnopt.validate.metrics import format_metric

__all__ = [
    "Budget",
    "Criterion",
    "judge_metrics",
    "resolve_tolerance",
]

# (low, high, low inclusive, high inclusive) per Budget field.
_LIMITS: dict[str, tuple[float, float, bool, bool]] = {
    "cosine": (0.0, 1.0, False, True),
    "sqnr_db": (-math.inf, math.inf, False, False),
    "max_abs": (0.0, math.inf, True, False),
    "rel_l2": (0.0, math.inf, True, False),
    "top1": (0.0, 1.0, False, True),
    "metric_min": (-math.inf, math.inf, False, False),
    "metric_max": (-math.inf, math.inf, False, False),
}


def _interval(name: str) -> str:
    low, high, low_in, high_in = _LIMITS[name]
    if name in ("sqnr_db", "metric_min", "metric_max"):
        return "a finite number"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


@dataclass(frozen=True)
class Budget:
    """Accuracy budget for a lossy rewrite; ``None`` leaves a metric unchecked.

    Attributes:
        cosine: minimum cosine similarity of every output, in (0, 1].
        sqnr_db: minimum SQNR in dB of every output (finite).
        max_abs: maximum absolute error of every output, >= 0.
        rel_l2: maximum relative L2 error of every output, >= 0.
        top1: minimum top-1 agreement of logits outputs, in (0, 1].
        metric: a callable ``metric(reference_outputs, candidate_outputs) -> float`` on one
            batch's model outputs (as the model returns them; with padding removed, the
            reference's padded positions are zeros like the candidate's). A callable that also
            takes an ``inputs`` keyword gets the batch's ``(args, kwargs)``. Judged on its worst
            batch against ``metric_min`` (a score: higher is better) or ``metric_max`` (an
            error: lower is better), exactly one of which it needs.
        metric_min: the lowest acceptable value of ``metric``.
        metric_max: the highest acceptable value of ``metric``.
    """

    cosine: float | None = None
    sqnr_db: float | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    top1: float | None = None
    metric: Callable[..., float] | None = None
    metric_min: float | None = None
    metric_max: float | None = None

    def __post_init__(self) -> None:
        self._check_metric()
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or item.name == "metric":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"Budget.{item.name} must be a real number or None, got {type(value).__name__}"
                )
            value = float(value)
            low, high, low_in, high_in = _LIMITS[item.name]
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (above and below and not math.isnan(value)):
                raise ValueError(f"Budget.{item.name} must be {_interval(item.name)}, got {value}")
            object.__setattr__(self, item.name, value)
        if all(getattr(self, item.name) is None for item in fields(self)):
            raise ValueError("Budget needs at least one limit (cosine, sqnr_db, max_abs, ...)")

    def _check_metric(self) -> None:
        bounds = [name for name in ("metric_min", "metric_max") if getattr(self, name) is not None]
        if self.metric is None:
            if bounds:
                raise ValueError(f"Budget.{bounds[0]} needs metric=<callable> to bound")
            return
        if not callable(self.metric):
            raise TypeError(
                f"Budget.metric must be a callable metric(reference_outputs, candidate_outputs) "
                f"-> float, got {type(self.metric).__name__}"
            )
        if len(bounds) != 1:
            raise ValueError(
                "Budget(metric=...) needs exactly one of metric_min= (a score, higher is better) "
                "or metric_max= (an error, lower is better)"
            )

    @property
    def metric_name(self) -> str:
        """The user metric's name in reports (``metric:<function name>``), or ``""``."""
        if self.metric is None:
            return ""
        return "metric:" + getattr(self.metric, "__name__", type(self.metric).__name__)

    def judge_metric(self, value: float) -> list[str]:
        """Reasons why the user metric's (worst) value breaks this budget (empty when within).

        Args:
            value: the metric's value.

        Returns:
            At most one reason.
        """
        if self.metric is None:
            return []
        if self.metric_min is not None and not value >= self.metric_min:
            return [f"{self.metric_name} {value:.6g} < {self.metric_min:g}"]
        if self.metric_max is not None and not value <= self.metric_max:
            return [f"{self.metric_name} {value:.6g} > {self.metric_max:g}"]
        return []

    def describe(self) -> str:
        """The limits as text, e.g. ``"cosine>=0.999, sqnr_db>=25"``.

        Returns:
            One line naming every limit that is set.
        """
        ops = {"cosine": ">=", "sqnr_db": ">=", "max_abs": "<=", "rel_l2": "<=", "top1": ">="}
        parts = [
            f"{name}{ops[name]}{getattr(self, name):g}"
            for name in ops
            if getattr(self, name) is not None
        ]
        if self.metric_min is not None:
            parts.append(f"{self.metric_name}>={self.metric_min:g}")
        if self.metric_max is not None:
            parts.append(f"{self.metric_name}<={self.metric_max:g}")
        return ", ".join(parts)

    def check(self, metrics: Mapping[str, float], *, is_logits: bool = False) -> list[str]:
        """Reasons why ``metrics`` break this budget (empty when within).

        Args:
            metrics: a metric dict from :mod:`attnopt.validate.metrics`.
            is_logits: whether the output is logits (only then is ``top1`` checked).

        Returns:
            Human-readable reasons, one per broken limit.
        """
        checks = [
            ("cosine", "cosine", True),
            ("sqnr_db", "sqnr_db", True),
            ("max_abs", "max_abs", False),
            ("rel_l2", "rel_l2", False),
        ]
        if is_logits:
            checks.append(("top1", "top1_agreement", True))
        reasons = []
        for field_name, key, at_least in checks:
            limit = getattr(self, field_name)
            if limit is None or key not in metrics:
                continue
            value = metrics[key]
            within = value >= limit if at_least else value <= limit
            if not within:  # NaN is never within
                relation = "<" if at_least else ">"
                if math.isnan(value):
                    relation = "is undefined, budget"
                reasons.append(f"{key} {format_metric(key, value)} {relation} {limit:g}")
        return reasons


@dataclass(frozen=True)
class Criterion:
    """A resolved tolerance: a per-dtype table (exact / no-rewrite) or a budget.

    Attributes:
        name: the tolerance's name as the user gave it (``"exact"``, ``"budget(...)"``).
        table: the elementwise per-dtype table, or None for a budget.
        budget: the :class:`Budget`, or None for a table.
        oracle_rule: floating outputs are judged by the fp64-oracle rule alone when an oracle
            is available (``"exact"``); ``table`` is the fallback and judges the other outputs.
    """

    name: str
    table: Mapping[torch.dtype, Tolerance] | None = None
    budget: Budget | None = None
    oracle_rule: bool = False

    def tolerance_for(self, dtype: torch.dtype) -> Tolerance:
        """The table entry for outputs of ``dtype`` (integers and bools: exact equality).

        Args:
            dtype: the reference output's dtype.

        Returns:
            Its :class:`attnopt.tolerances.Tolerance`.
        """
        if self.table is None:
            raise ValueError(f"tolerance {self.name!r} is a budget, not a per-dtype table")
        if not dtype.is_floating_point:
            return Tolerance(atol=0.0, rtol=0.0)
        return self.table.get(dtype, self.table[torch.float32])

    def rule(self, oracle: bool) -> str:
        """The verdict rule applied to the outputs, as one line of text.

        Args:
            oracle: whether fp64 oracle outputs are available.

        Returns:
            e.g. ``"fp64 oracle: per floating output RMSE(candidate - fp64) <= ..."``.
        """
        if self.budget is not None:
            return f"budget: {self.budget.describe()} on every output (top1 on logits only)"
        fp32 = self.tolerance_for(torch.float32)
        elementwise = (
            "elementwise: |candidate - reference| <= atol + rtol * |reference| at every position "
            f"(fp32 atol={fp32.atol:g}, rtol={fp32.rtol:g})"
        )
        if not oracle:
            return elementwise + (", no fp64 oracle" if self.oracle_rule else "")
        if not self.oracle_rule:
            return elementwise + ", else the fp64-oracle rule"
        return (
            "fp64 oracle: per floating output RMSE(candidate - fp64) <= "
            f"k * RMSE(reference - fp64) + {ORACLE_FLOOR_EPS:g} * eps * RMS(fp64), "
            f"k = {ORACLE_ERROR_RATIO:g} ({ORACLE_ERROR_RATIO_LOOSE:g} under "
            f"{ORACLE_SMALL_NUMEL} elements or in fp16/bf16); integer outputs equal"
        )


_TABLES = {
    "exact": EXACT,
    "exact-elementwise": EXACT,
    "none": NO_REWRITE,
    "no-rewrite": NO_REWRITE,
}


def resolve_tolerance(tolerance: str | Budget | Criterion) -> Criterion:
    """Turn a user's ``tolerance`` argument into a :class:`Criterion`.

    Args:
        tolerance: ``"exact"`` (fp64-oracle rule), ``"exact-elementwise"``,
            ``"none"``/``"no-rewrite"``, a name from :data:`attnopt.tolerances.LOSSY_BUDGETS`,
            or a :class:`Budget`.

    Returns:
        The criterion outputs are judged by.

    Raises:
        ValueError: for an unknown preset name.
        TypeError: for anything else.
    """
    if isinstance(tolerance, Criterion):
        return tolerance
    if isinstance(tolerance, Budget):
        return Criterion(name=f"budget({tolerance.describe()})", budget=tolerance)
    if isinstance(tolerance, str):
        if tolerance in _TABLES:
            return Criterion(
                name=tolerance, table=_TABLES[tolerance], oracle_rule=tolerance == "exact"
            )
        if tolerance in LOSSY_BUDGETS:
            return Criterion(name=tolerance, budget=Budget(**LOSSY_BUDGETS[tolerance]))
        options = ", ".join(repr(name) for name in [*_TABLES, *LOSSY_BUDGETS])
        raise ValueError(f"unknown tolerance {tolerance!r}; use one of {options} or a Budget")
    raise TypeError(f"tolerance must be a preset name or a Budget, got {type(tolerance).__name__}")


def judge_metrics(
    metrics: Mapping[str, float], criterion: Criterion, *, is_logits: bool = False
) -> list[str]:
    """Reasons why one output (or site) fails ``criterion`` (empty when it passes).

    With the fp64-oracle rule (``criterion.oracle_rule`` and the oracle metrics of
    :func:`~attnopt.validate.metrics.oracle_metrics` plus ``fp64_allowed_rmse`` present) only
    that rule decides. Other table criteria read ``tol_ratio`` and, when oracle metrics are
    present, let an output outside the table pass by the oracle rule. Budgets read the metrics
    they limit. Any ``nonfinite_mismatch`` fails.

    Args:
        metrics: the output's metric dict, including ``tolerance_metrics`` for table criteria.
        criterion: from :func:`resolve_tolerance`.
        is_logits: whether the output is logits.

    Returns:
        Human-readable reasons.
    """
    reasons = []
    mismatch = int(metrics.get("nonfinite_mismatch", 0))
    if mismatch:
        reasons.append(f"{mismatch} positions where NaN/inf differ from the reference")
    if criterion.budget is not None:
        return reasons + criterion.budget.check(metrics, is_logits=is_logits)
    has_oracle = "candidate_fp64_rmse" in metrics and "fp64_allowed_rmse" in metrics
    if criterion.oracle_rule and has_oracle:
        return reasons + _oracle_reasons(metrics)
    ratio = metrics.get("tol_ratio", 0.0)
    if ratio <= 1.0:
        return reasons
    oracle_reasons = _oracle_reasons(metrics) if has_oracle else []
    if has_oracle and not oracle_reasons:
        return reasons  # as close to fp64 as the reference is: exact in the fp64-oracle sense
    atol = metrics.get("atol", 0.0)
    message = (
        f"{_times(ratio)} the {criterion.name} tolerance (atol={atol:g}, "
        f"rtol={metrics.get('rtol', 0.0):g}) at {_violations(metrics)}"
    )
    reasons.append(message + "".join(f", and {reason}" for reason in oracle_reasons))
    return reasons


def _oracle_reasons(metrics: Mapping[str, float]) -> list[str]:
    """Why an output fails the fp64-oracle rule (empty when it passes)."""
    cand_err = metrics["candidate_fp64_rmse"]
    allowed = metrics["fp64_allowed_rmse"]
    if cand_err <= allowed:  # NaN never passes
        return []
    return [
        f"its RMSE vs fp64 {cand_err:.3g} is {_times_error(metrics)} the reference's "
        f"{metrics['eager_fp64_rmse']:.3g}, above the allowed {allowed:.3g} "
        f"(= {metrics.get('fp64_ratio_limit', ORACLE_ERROR_RATIO):g} x the reference's + "
        f"floor {metrics.get('fp64_floor', 0.0):.3g})"
    ]


def _times_error(metrics: Mapping[str, float]) -> str:
    ratio = metrics.get("fp64_error_ratio", math.nan)
    return "infinitely many times" if math.isinf(ratio) else f"{ratio:.3g}x"


def _times(ratio: float) -> str:
    return "error beyond" if math.isinf(ratio) else f"error {ratio:.3g}x"


def _violations(metrics: Mapping[str, float]) -> str:
    return f"{metrics.get('tol_violations', 0)} of {metrics.get('numel', '?')} positions"
