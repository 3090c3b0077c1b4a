"""The numerics report: per-output and per-site metrics, judged, rendered and saved.

Entry points: :class:`NumericsReport` (``ok``, ``to_dict``, ``to_json``, ``render``, ``save``)
and :class:`SiteReport`. Reports are built by :mod:`attnopt.validate.compare`; how outputs are
judged (tolerances, :class:`~attnopt.validate.budget.Budget`) is in :mod:`attnopt.validate.budget`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from attnopt.validate.metrics import MetricDict, format_metric
from attnopt.validate.plots import have_matplotlib, plot_error_per_layer

__all__ = [
    "NumericsReport",
    "SiteReport",
]


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
    ("ref_nonfinite", "ref NaN/inf"),
]
# The fp64-oracle rule per output: RMSE against the oracle, their ratio, the allowed RMSE.
_ORACLE_COLUMNS = [
    ("eager_fp64_rmse", "ref vs fp64"),
    ("candidate_fp64_rmse", "cand vs fp64"),
    ("fp64_error_ratio", "cand/ref"),
    ("fp64_ratio_limit", "k"),
    ("fp64_floor", "floor"),
    ("fp64_allowed_rmse", "allowed"),
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
        oracle: whether a float64 oracle judged (or was measured against) some output.
        rule: the verdict rule applied to the outputs, as one line (see
            :meth:`attnopt.validate.budget.Criterion.rule`).
        batches: how many input batches the metrics aggregate.
        logits: names of the outputs judged as logits.
    """

    metrics: dict[str, MetricDict] = field(default_factory=dict)
    sites: list[SiteReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tolerance: str = "exact"
    oracle: bool = False
    rule: str = ""
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
            A dict with ``ok``, ``tolerance``, ``oracle``, ``rule``, ``batches``, ``logits``,
            ``metrics``, ``sites``, ``failures`` and ``warnings``. With an fp64 oracle, each
            floating output's metrics hold ``eager_fp64_rmse`` (the reference's RMSE against
            the oracle), ``candidate_fp64_rmse``, ``fp64_error_ratio`` (candidate over
            reference), ``fp64_allowed_rmse`` and its parts ``fp64_ratio_limit`` and
            ``fp64_floor``.
        """
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "oracle": self.oracle,
            "rule": self.rule,
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
            Multi-line text: a status line, the verdict rule, the outputs table, the sites
            table, failures and warnings.
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
        if self.rule:
            console.print(f"rule: {self.rule}", markup=False, highlight=False, soft_wrap=True)
        rows = [(name, values, None) for name, values in self.metrics.items()]
        console.print(self._table("outputs vs the reference", "output", _OUTPUT_COLUMNS, rows))
        oracle_rows = [row for row in rows if "eager_fp64_rmse" in row[1]]
        if oracle_rows:
            title = "outputs against the fp64 oracle (RMSE; allowed = k * ref vs fp64 + floor)"
            console.print(self._table(title, "output", _ORACLE_COLUMNS, oracle_rows))
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
