"""Accuracy budgets, tolerance presets and the numerics report.

Entry points: :class:`Budget`, :func:`resolve_tolerance`, :func:`judge_metrics`,
:class:`NumericsReport`, :class:`SiteReport`, :func:`plot_attention_map`.

A tolerance is one of:

- ``"exact"``: elementwise ``|cand - ref| <= atol + rtol * |ref|`` with the per-dtype table
  :data:`attnopt.tolerances.EXACT` (dtype of the reference output).
- ``"none"`` (alias ``"no-rewrite"``): the same check with the tighter table
  :data:`attnopt.tolerances.NO_REWRITE`, for a compile with ``passes="none"``.
- ``"lossy-tight"``, ``"lossy"``, ``"lossy-loose"``: the presets of
  :data:`attnopt.tolerances.LOSSY_BUDGETS`.
- a :class:`Budget`: limits on cosine, SQNR, max abs error, relative L2 error, top-1 agreement.

With a float64 oracle (a float64 copy of the reference run on float64 inputs), a table check that
fails is judged again the way torch._dynamo's accuracy checker does: the candidate passes when its
RMSE against fp64 is at most ``max(atol, k * eager RMSE against fp64)`` with
``k = attnopt.tolerances.ORACLE_ERROR_RATIO`` (2.1): a rewrite may reorder float arithmetic, so it
is as exact as eager when it is about as close to the true value as eager itself.

Every tolerance fails an output whose non-finite values (NaN, inf) differ from the reference's.
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from attnopt.tolerances import (
    EXACT,
    LOSSY_BUDGETS,
    NO_REWRITE,
    ORACLE_ERROR_RATIO,
    Tolerance,
)
from attnopt.validate.metrics import MetricDict
from attnopt.validate.plots import have_matplotlib, plot_attention_map, plot_error_per_layer

__all__ = [
    "Budget",
    "Criterion",
    "NumericsReport",
    "SiteReport",
    "judge_metrics",
    "plot_attention_map",
    "resolve_tolerance",
]

# (low, high, low inclusive, high inclusive) per Budget field.
_LIMITS: dict[str, tuple[float, float, bool, bool]] = {
    "cosine": (0.0, 1.0, False, True),
    "sqnr_db": (-math.inf, math.inf, False, False),
    "max_abs": (0.0, math.inf, True, False),
    "rel_l2": (0.0, math.inf, True, False),
    "top1": (0.0, 1.0, False, True),
}


def _interval(name: str) -> str:
    low, high, low_in, high_in = _LIMITS[name]
    if name == "sqnr_db":
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
    """

    cosine: float | None = None
    sqnr_db: float | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    top1: float | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:
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

    def describe(self) -> str:
        """The limits as text, e.g. ``"cosine>=0.999, sqnr_db>=25"``.

        Returns:
            One line naming every limit that is set.
        """
        ops = {"cosine": ">=", "sqnr_db": ">=", "max_abs": "<=", "rel_l2": "<=", "top1": ">="}
        return ", ".join(
            f"{name}{ops[name]}{getattr(self, name):g}"
            for name in ops
            if getattr(self, name) is not None
        )

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
    """A resolved tolerance: a per-dtype table (exact / no-rewrite) or a budget."""

    name: str
    table: Mapping[torch.dtype, Tolerance] | None = None
    budget: Budget | None = None

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


_TABLES = {"exact": EXACT, "none": NO_REWRITE, "no-rewrite": NO_REWRITE}


def resolve_tolerance(tolerance: str | Budget | Criterion) -> Criterion:
    """Turn a user's ``tolerance`` argument into a :class:`Criterion`.

    Args:
        tolerance: ``"exact"``, ``"none"``/``"no-rewrite"``, a name from
            :data:`attnopt.tolerances.LOSSY_BUDGETS`, or a :class:`Budget`.

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
            return Criterion(name=tolerance, table=_TABLES[tolerance])
        if tolerance in LOSSY_BUDGETS:
            return Criterion(name=tolerance, budget=Budget(**LOSSY_BUDGETS[tolerance]))
        options = ", ".join(repr(name) for name in [*_TABLES, *LOSSY_BUDGETS])
        raise ValueError(f"unknown tolerance {tolerance!r}; use one of {options} or a Budget")
    raise TypeError(f"tolerance must be a preset name or a Budget, got {type(tolerance).__name__}")


def judge_metrics(
    metrics: Mapping[str, float], criterion: Criterion, *, is_logits: bool = False
) -> list[str]:
    """Reasons why one output (or site) fails ``criterion`` (empty when it passes).

    Table criteria read ``tol_ratio`` (and the fp64 oracle metrics when present); budgets read
    the metrics they limit. Any ``nonfinite_mismatch`` fails.

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
    ratio = metrics.get("tol_ratio", 0.0)
    if ratio <= 1.0:
        return reasons
    atol = metrics.get("atol", 0.0)
    if "candidate_fp64_rmse" in metrics:
        eager_err = metrics["eager_fp64_rmse"]
        allowed = max(atol, ORACLE_ERROR_RATIO * eager_err)
        if metrics["candidate_fp64_rmse"] <= allowed:
            return reasons  # as close to fp64 as eager is: exact in the fp64-oracle sense
        reasons.append(
            f"{_times(ratio)} the {criterion.name} tolerance (atol={atol:g}, "
            f"rtol={metrics.get('rtol', 0.0):g}) at {_violations(metrics)}, "
            f"and vs fp64 its RMSE {metrics['candidate_fp64_rmse']:.3g} > "
            f"max(atol, {ORACLE_ERROR_RATIO:g} x eager's {eager_err:.3g})"
        )
    else:
        reasons.append(
            f"{_times(ratio)} the {criterion.name} tolerance (atol={atol:g}, "
            f"rtol={metrics.get('rtol', 0.0):g}) at {_violations(metrics)}"
        )
    return reasons


def _times(ratio: float) -> str:
    return "error beyond" if math.isinf(ratio) else f"error {ratio:.3g}x"


def _violations(metrics: Mapping[str, float]) -> str:
    return f"{metrics.get('tol_violations', 0)} of {metrics.get('numel', '?')} positions"


def format_metric(key: str, value: float | int | bool) -> str:
    """Short text for one metric value, as the report tables print it.

    Args:
        key: the metric name (chooses the format).
        value: its value.

    Returns:
        e.g. ``"3.1e-06"``, ``"1-2.0e-09"`` (a cosine just below 1), ``"inf"``.
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if key in ("cosine", "top1_agreement"):
        if value == 1.0:
            return "1"
        if 0.999999 <= value < 1.0:
            return f"1-{1.0 - value:.1e}"
        return f"{value:.6f}"
    if key in ("sqnr_db", "tol_ratio", "fp64_error_ratio"):
        return f"{value:.1f}" if key == "sqnr_db" else f"{value:.3g}"
    return "0" if value == 0 else f"{value:.2e}"


def _jsonable(value):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan" (float() reads them)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return format_metric("", value)
    return value


@dataclass
class SiteReport:
    """Numerics of one attention site's output.

    Attributes:
        index: the site's index (layer order).
        name: the site's name, e.g. ``"site 3 (encoder.layer.3.attention)"``.
        metrics: the site output's metric dict.
        ok: whether it is within the tolerance.
        reasons: why not, when not ok.
    """

    index: int
    name: str
    metrics: MetricDict
    ok: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-data form (non-finite floats kept as floats).

        Returns:
            ``{"index", "name", "metrics", "ok", "reasons"}``.
        """
        return {
            "index": self.index,
            "name": self.name,
            "metrics": dict(self.metrics),
            "ok": self.ok,
            "reasons": list(self.reasons),
        }


# (metric key, column header) in table order; a column is shown when some row has the key.
_OUTPUT_COLUMNS = [
    ("numel", "numel"),
    ("max_abs", "max_abs"),
    ("max_rel", "max_rel"),
    ("rel_l2", "rel_l2"),
    ("cosine", "cosine"),
    ("sqnr_db", "sqnr dB"),
    ("top1_agreement", "top1"),
    ("kl_divergence", "KL"),
    ("tol_ratio", "err/tol"),
    ("eager_fp64_rmse", "eager vs fp64"),
    ("candidate_fp64_rmse", "cand vs fp64"),
    ("ref_nonfinite", "ref NaN/inf"),
]
_SITE_COLUMNS = [
    ("max_abs", "max_abs"),
    ("rel_l2", "rel_l2"),
    ("cosine", "cosine"),
    ("sqnr_db", "sqnr dB"),
    ("tol_ratio", "err/tol"),
]


@dataclass
class NumericsReport:
    """Result of comparing a candidate model against a reference.

    ``ok`` judges the model outputs; ``sites`` localise where error enters and are judged
    individually (their failures count in ``ok`` only when built with ``judge_sites=True``).

    Attributes:
        metrics: per output name (see :func:`attnopt.validate.flatten_outputs`), its metrics.
        sites: per attention site, in layer order.
        failures: human-readable reasons the report is not ok.
        warnings: things worth knowing that do not fail it (NaN in the reference, ...).
        tolerance: the tolerance's name.
        oracle: whether a float64 oracle was used.
        batches: how many input batches the metrics aggregate.
        logits: names of the outputs judged as logits.
    """

    metrics: dict[str, MetricDict] = field(default_factory=dict)
    sites: list[SiteReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tolerance: str = "exact"
    oracle: bool = False
    batches: int = 1
    logits: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no output failed."""
        return not self.failures

    @property
    def first_failing_site(self) -> SiteReport | None:
        """The earliest site that is not ok, or None."""
        return next((site for site in self.sites if not site.ok), None)

    def to_dict(self) -> dict:
        """Plain-data form of the report (non-finite floats kept as floats).

        Returns:
            A dict with ``ok``, ``tolerance``, ``oracle``, ``batches``, ``logits``,
            ``metrics``, ``sites``, ``failures`` and ``warnings``.
        """
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "oracle": self.oracle,
            "batches": self.batches,
            "logits": list(self.logits),
            "metrics": {name: dict(values) for name, values in self.metrics.items()},
            "sites": [site.to_dict() for site in self.sites],
            "failures": list(self.failures),
            "warnings": list(self.warnings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON; inf/-inf/NaN become the strings "inf", "-inf", "nan".

        Args:
            indent: JSON indentation (None: one line).

        Returns:
            JSON text that ``json.loads`` reads back.
        """
        return json.dumps(_jsonable(self.to_dict()), indent=indent, allow_nan=False)

    def render(self, width: int = 120) -> str:
        """The report as plain-text tables (rendered with rich, styles stripped).

        Args:
            width: the line width of the tables.

        Returns:
            Multi-line text: a status line, the outputs table, the sites table, failures.
        """
        from rich.console import Console

        console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
        status = "OK" if self.ok else "FAILED"
        oracle = ", fp64 oracle" if self.oracle else ""
        batches = f", {self.batches} batches" if self.batches != 1 else ""
        console.print(
            f"attnopt numerics: {status} (tolerance {self.tolerance}{oracle}{batches})",
            markup=False,
            highlight=False,
        )
        rows = [(name, values, None) for name, values in self.metrics.items()]
        console.print(self._table("outputs", "output", _OUTPUT_COLUMNS, rows))
        if self.sites:
            site_rows = [(f"{s.index}: {s.name}", s.metrics, s.ok) for s in self.sites]
            console.print(self._table("attention sites", "site", _SITE_COLUMNS, site_rows))
        for header, lines in (("failures", self.failures), ("warnings", self.warnings)):
            if lines:
                console.print(f"{header}:", markup=False, highlight=False)
                for line in lines:
                    console.print(f"  - {line}", markup=False, highlight=False)
        return console.export_text()

    def _table(self, title: str, label: str, columns, rows):
        from rich import box
        from rich.table import Table
        from rich.text import Text

        shown = [(key, header) for key, header in columns if any(key in m for _, m, _ in rows)]
        if ("ref_nonfinite", "ref NaN/inf") in shown and not any(
            m.get("ref_nonfinite") for _, m, _ in rows
        ):
            shown.remove(("ref_nonfinite", "ref NaN/inf"))
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column(label, overflow="fold")
        for _, header in shown:
            table.add_column(header, justify="right")
        if any(ok is not None for _, _, ok in rows):
            table.add_column("ok")
        for name, values, ok in rows:
            cells = [Text(name)]
            cells += [
                Text(format_metric(key, values[key]) if key in values else "-") for key, _ in shown
            ]
            if ok is not None:
                cells.append(Text("yes" if ok else "NO"))
            table.add_row(*cells)
        return table

    def __str__(self) -> str:
        return self.render()

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``report.json``, ``report.txt`` and, with matplotlib and sites, plots.

        The plot ``error_per_layer.png`` shows SQNR and relative L2 error per site index.

        Args:
            directory: created when missing.

        Returns:
            The paths written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / "report.json"
        json_path.write_text(self.to_json() + "\n")
        text_path = directory / "report.txt"
        text_path.write_text(self.render())
        written = [json_path, text_path]
        if self.sites and have_matplotlib():
            written.append(
                plot_error_per_layer(
                    [site.index for site in self.sites],
                    [site.metrics.get("sqnr_db", math.nan) for site in self.sites],
                    [site.metrics.get("rel_l2", math.nan) for site in self.sites],
                    directory / "error_per_layer.png",
                    failing=[not site.ok for site in self.sites],
                )
            )
        return written
