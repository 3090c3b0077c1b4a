"""attnopt: a compiler for the attention in PyTorch models.

Entry points: :func:`compile`, :func:`capture`, :func:`validate`, :class:`Pass`,
:class:`PassManager`, :class:`Plan`, :class:`Budget` (the budgeted search:
``compile(..., budget=..., calibration=...)``), :mod:`attnopt.passes`, :mod:`attnopt.ir`.
"""

from attnopt import ir
from attnopt.api import capture, compile, export_onnx
from attnopt.compiled import CompiledModule
from attnopt.errors import (
    AttnoptError,
    BackendError,
    CalibrationError,
    CaptureError,
    GenerationError,
    PassError,
    PipelineError,
    PlanError,
    SignatureError,
)
from attnopt.passes.base import Pass, PassContext, PassManager, PassResult
from attnopt.passes.plan import Plan
from attnopt.search import SearchReport
from attnopt.sites import AttentionSite
from attnopt.validate import Budget, NumericsReport, ValidationError
from attnopt.validate.sites import sensitivity
from attnopt.validate.sites import validate as _validate

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "Budget",
    "NumericsReport",
    "ValidationError",
    "AttnoptError",
    "BackendError",
    "CalibrationError",
    "GenerationError",
    "CaptureError",
    "CompiledModule",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "Plan",
    "PlanError",
    "SearchReport",
    "SignatureError",
    "capture",
    "compile",
    "export_onnx",
    "ir",
    "passes",
    "sensitivity",
    "validate",
]

from attnopt import passes  # noqa: E402 - registers the built-in passes

# ``attnopt.validate`` is the function; the subpackage stays importable as attnopt.validate.*.
validate = _validate
