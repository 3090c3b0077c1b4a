"""What the budgeted search measured: every candidate, the Pareto front, the chosen plan.

Entry points: :class:`SearchPoint`, :class:`SearchReport` (``cm.search_report``: ``print()``,
``table()``, ``pareto()``, ``to_json()``, ``save(path)``, ``plot(path)``),
:func:`progress_reporter`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SearchPoint", "SearchReport", "progress_reporter"]

#: Metric -> whether higher is better (the Pareto front's direction).
HIGHER_IS_BETTER = {
    "cosine": True,
    "sqnr_db": True,
    "top1": True,
    "rel_l2": False,
    "max_abs": False,
}


@dataclass
class SearchPoint:
    """One candidate plan the search measured.

    Attributes:
        label: the steps on top of exact fusion (``"remove-padding + token-merge{...}"``).
        pipeline: the full pipeline text.
        stage: where the search tried it (``"exact"``, ``"alone: token-merge@L2"``, ...).
        seconds: one pass over the calibration batches (best of the timed passes); inf when it
            failed to compile or run.
        speedup: the exact plan's seconds over this one's.
        eager_speedup: the original model's seconds over this one's.
        compile_seconds: its compile time (capture shared).
        metrics: the worst value of each budget metric over the outputs, on calibration.
        ok: within the budget on calibration.
        failures: why not (budget limits broken, or the error that stopped it).
        declined: what its passes left alone, as compile warned.
        no_effect: its last step rewrote nothing.
        validation: the worst metrics on the validation data, when it was re-checked there.
    """

    label: str
    pipeline: str
    stage: str
    seconds: float
    speedup: float = 0.0
    eager_speedup: float = 0.0
    compile_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    no_effect: bool = False
    validation: dict[str, float] | None = None


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {key: _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(value) for value in obj]
    return obj


@dataclass
class SearchReport:
    """The budgeted search's measurements (``cm.search_report``).

    Attributes:
        budget: the budget, as text.
        points: every candidate measured, in the order tried.
        chosen: the plan the compiled module runs.
        eager_seconds: the original model on the calibration batches.
        calibration_batches: how many batches error and speed were measured on.
        cut_short: the search stopped at ``max_seconds``.
        notes: families not tried and why, fallbacks.
        validation: the chosen plan re-checked on validation data (``plan``, ``ok``,
            ``metrics``, ``failures``, ``batches``), when given.
        seconds: the whole search, compiles and validation included.
    """

    budget: str
    points: list[SearchPoint]
    chosen: SearchPoint
    eager_seconds: float
    calibration_batches: int
    cut_short: bool = False
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    seconds: float = 0.0

    def metric_names(self) -> list[str]:
        """The metrics measured, in a stable order (budget metrics first)."""
        names: list[str] = []
        for point in self.points:
            for name in point.metrics:
                if name not in names:
                    names.append(name)
        order = ["cosine", "sqnr_db", "rel_l2", "max_abs", "top1"]
        return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))

    def pareto(self, metric: str | None = None) -> list[SearchPoint]:
        """The points no other point beats on speed and error together, fastest first.

        Args:
            metric: the error metric to trade against speed; None: every measured metric
                (a point is dominated only when another is at least as good on all of them).

        Returns:
            The front, fastest first (failed compiles excluded).
        """
        names = [metric] if metric else self.metric_names()
        points = [p for p in self.points if math.isfinite(p.seconds)]

        def better_or_equal(a: SearchPoint, b: SearchPoint) -> bool:
            if a.seconds > b.seconds:
                return False
            for name in names:
                va, vb = a.metrics.get(name), b.metrics.get(name)
                if va is None or vb is None:
                    continue
                if (va < vb) if HIGHER_IS_BETTER.get(name, False) else (va > vb):
                    return False
            return True

        def strictly(a: SearchPoint, b: SearchPoint) -> bool:
            return better_or_equal(a, b) and not better_or_equal(b, a)

        front = [p for p in points if not any(strictly(q, p) for q in points if q is not p)]
        unique: dict[str, SearchPoint] = {}
        for point in sorted(front, key=lambda p: p.seconds):
            unique.setdefault(point.pipeline, point)
        return list(unique.values())

    def table(self, points: list[SearchPoint] | None = None) -> Any:
        """A rich Table of ``points`` (default: the Pareto front), the chosen plan marked."""
        from rich.table import Table

        points = self.pareto() if points is None else points
        names = self.metric_names()
        table = Table(title=f"budgeted search: {self.budget} (Pareto front, calibration data)")
        for column in ("", "plan", "ms", "x exact", "x eager", *names, "in budget"):
            table.add_column(column, justify="left" if column == "plan" else "right")
        for point in points:
            table.add_row(
                "*" if point.pipeline == self.chosen.pipeline else "",
                point.label,
                f"{point.seconds * 1000:.0f}",
                f"{point.speedup:.2f}",
                f"{point.eager_speedup:.2f}",
                *[_cell(point.metrics.get(name)) for name in names],
                "yes" if point.ok else "no",
            )
        return table

    def print(self, file: Any = None) -> None:
        """Print the Pareto table, the chosen plan and the notes (default: stderr)."""
        from rich.console import Console

        stream = file or sys.stderr
        console = Console(file=stream, width=None if stream.isatty() else 140)
        console.print(self.table())
        console.print(
            f"chosen: {self.chosen.label}  ({self.chosen.speedup:.2f}x exact, "
            f"{self.chosen.eager_speedup:.2f}x the original model, {len(self.points)} plans "
            f"measured in {self.seconds:.0f} s{', cut short' if self.cut_short else ''})"
        )
        if self.validation:
            status = "within budget" if self.validation["ok"] else "BREAKS the budget"
            metrics = ", ".join(f"{k}={_cell(v)}" for k, v in self.validation["metrics"].items())
            console.print(f"validation ({self.validation['batches']} batches): {status}: {metrics}")
        for note in self.notes:
            console.print(f"note: {note}")

    def __str__(self) -> str:
        import io

        buffer = io.StringIO()
        self.print(file=buffer)
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-safe data (``inf`` as the string ``"inf"``)."""
        data = asdict(self)
        data["pareto"] = [p.pipeline for p in self.pareto()]
        return _json_safe(data)

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (and return it)."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    def plot(self, path: str | Path, metric: str | None = None) -> Path:
        """A PNG of speed (x exact) against ``metric`` for every point, Pareto front joined.

        Args:
            path: the PNG to write.
            metric: the error metric (default: the budget's first, e.g. cosine).

        Returns:
            The path written.
        """
        from attnopt.validate.plots import _figure

        names = self.metric_names()
        if not names:
            raise ValueError("no metrics were measured: nothing to plot")
        metric = metric or names[0]
        fig, axes = _figure(7.0, 4.5, 1, 1)
        ax = axes[0][0]
        points = [p for p in self.points if math.isfinite(p.seconds) and metric in p.metrics]
        for ok, colour, label in ((True, "tab:blue", "within budget"), (False, "tab:red", "over")):
            chosen = [p for p in points if p.ok == ok]
            ax.scatter(
                [p.speedup for p in chosen],
                [p.metrics[metric] for p in chosen],
                color=colour,
                label=label,
                s=18,
            )
        front = [p for p in self.pareto(metric) if metric in p.metrics]
        ax.plot([p.speedup for p in front], [p.metrics[metric] for p in front], color="gray")
        ax.scatter(
            [self.chosen.speedup],
            [self.chosen.metrics.get(metric, math.nan)],
            marker="*",
            s=160,
            color="gold",
            edgecolor="black",
            label="chosen",
            zorder=3,
        )
        ax.set_xlabel("speed-up over exact fusion (measured)")
        ax.set_ylabel(metric)
        ax.set_title(f"budgeted search: {self.budget}")
        ax.legend()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


@contextlib.contextmanager
def progress_reporter(enabled: bool, max_seconds: float) -> Iterator[Callable[[str], None]]:
    """A rich progress bar over the search's time budget; yields ``tell(text)`` to update it.

    Args:
        enabled: show it (on stderr); when False, ``tell`` does nothing.
        max_seconds: the time budget the bar fills up to.

    Yields:
        The update function.
    """
    if not enabled:
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    with Progress(
        TextColumn("attnopt search"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(file=sys.stderr),
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=max_seconds)
        count = [0]

        def tell(text: str) -> None:
            count[0] += 1
            bar.update(
                task,
                completed=min(max_seconds, time.perf_counter() - start),
                description=f"plan {count[0]}: {text[:60]}",
            )

        yield tell
