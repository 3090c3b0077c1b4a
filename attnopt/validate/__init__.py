"""Numerics validation: how far a rewritten model's outputs are from the original's.

Entry points: :func:`run_and_compare` (run two models, get a :class:`NumericsReport`),
:func:`build_report` (from outputs already computed, plus optional per-site outputs),
:func:`compare_outputs`, :func:`tensor_metrics`, :func:`logits_metrics`, :class:`Budget`,
:func:`plot_attention_map`. Tolerances (``"exact"``, ``"none"``, lossy presets, a Budget) are
described in :mod:`attnopt.validate.budget`; per-dtype tables live in :mod:`attnopt.tolerances`.
This package does not depend on the compiler: callers supply outputs or callables.
"""

from attnopt.validate.api import run_and_compare
from attnopt.validate.budget import Budget, resolve_tolerance
from attnopt.validate.compare import build_report, compare_outputs, flatten_outputs
from attnopt.validate.errors import ValidationError
from attnopt.validate.metrics import (
    logits_metrics,
    oracle_metrics,
    tensor_metrics,
    tolerance_metrics,
)
from attnopt.validate.plots import plot_attention_map
from attnopt.validate.report import NumericsReport, SiteReport

__all__ = [
    "Budget",
    "NumericsReport",
    "SiteReport",
    "ValidationError",
    "build_report",
    "compare_outputs",
    "flatten_outputs",
    "logits_metrics",
    "oracle_metrics",
    "plot_attention_map",
    "resolve_tolerance",
    "run_and_compare",
    "tensor_metrics",
    "tolerance_metrics",
]
