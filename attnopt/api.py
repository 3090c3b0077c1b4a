"""The public entry points ``attnopt.compile`` and ``attnopt.capture``.

Entry points: :func:`compile`, :func:`capture`.
"""

from __future__ import annotations

import builtins
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from attnopt.compiled import CompiledModule
from attnopt.errors import CaptureError, PipelineError
from attnopt.frontend import capture as _torch_capture
from attnopt.frontend.onnx_import import OnnxModule, import_onnx, is_onnx_source
from attnopt.passes.base import Pass, PassManager, as_pipeline, parse_pass
from attnopt.passes.plan import Plan


def capture(
    model: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool | None = None,
    method: str = "auto",
) -> Any:
    """Capture a model into an IR graph.

    Args:
        model: an ``nn.Module`` (captured with torch.export), or an ONNX model: a path to a
            ``.onnx`` file, an ``onnx.ModelProto`` or an :class:`~attnopt.frontend.onnx_import.OnnxModule`
            (imported for the example inputs' shapes; see docs/onnx.md).
        args: example positional inputs (for ONNX: the graph's inputs in order).
        kwargs: example keyword inputs (for ONNX: by input name; optional when every input dim
            is fixed in the file).
        dynamic: symbolic batch and sequence dims (torch models; ONNX graphs are imported for
            the example's shapes).
        method: torch capture method: "auto", "export", "export-strict" or "fx".

    Returns:
        The IR graph (:class:`attnopt.ir.Graph`).

    Raises:
        CaptureError: the model cannot be captured; for ONNX, a file that is not ONNX, an opset
            outside 13..onnx's newest, missing external data or control flow.
    """
    if isinstance(model, OnnxModule):
        model = model.proto
    if not isinstance(model, torch.nn.Module) and is_onnx_source(model):
        if dynamic:
            raise CaptureError(
                "ONNX graphs are imported for the example inputs' shapes (dynamic=True is for "
                "torch models); compile them with attnopt.compile, which imports once per shape"
            )
        if not isinstance(args, builtins.tuple):
            args = (args,)
        return import_onnx(model, args, kwargs)
    return _torch_capture.capture(model, args, kwargs, dynamic=dynamic, method=method)


def compile(  # noqa: A001 - the public name is fixed by the design
    model: torch.nn.Module | str | os.PathLike[str] | Any,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    passes: str | Sequence[Pass] | PassManager | None = None,
    backend: str = "auto",
    calibration: Any = None,
    budget: Any = None,
    method: str = "auto",
    max_signatures: int = 8,
    retain_memory: bool = True,
    plan: Plan | str | os.PathLike[str] | None = None,
    dynamic: bool | None = None,
    strict: bool = False,
    precision: str = "fp32",
    validation: Any = None,
    max_seconds: float = 300.0,
    progress: bool = True,
) -> CompiledModule:
    """Compile ``model`` for the attention in it.

    Args:
        model: the module to compile (use ``model.eval()`` for inference graphs), or an ONNX
            model (a ``.onnx`` path or ``onnx.ModelProto``): its graph is imported and compiled
            once per input shape, and the module runs in torch (see docs/onnx.md).
        args: example positional inputs; when given (or ``kwargs``), compilation happens now.
        kwargs: example keyword inputs.
        passes: "exact" (canonicalize + fuse attention), "none", "auto" (the budgeted search:
            needs ``budget`` and ``calibration``), pipeline text such as
            ``"fuse-attention,sliding-window{window=512,sinks=4}"``, a list of passes, or a
            PassManager. None (the default): the plan's pipeline when ``plan`` is given, the
            budgeted search when ``budget`` is, else "exact".
        backend: "auto" (Triton on CUDA, fast torch kernels on CPU), "torch", "triton" or
            "triton-interpret" (the generated Triton kernels in Triton's interpreter, for tests).
            The interpreter needs ``TRITON_INTERPRET=1`` in the environment before anything
            imports triton: Triton fixes its library's mode for the whole process at that
            import. attnopt never sets it (it only decorates its own kernels for the
            interpreter); without it, compile warns and attention runs on the torch kernels.
        calibration: iterable of ``(args, kwargs)`` batches (or dicts of keyword inputs) of
            your own data: passes that score heads/layers/tokens read it, and the budgeted
            search measures error and speed on it.
        budget: an accuracy budget (``attnopt.Budget(cosine=0.98)``, ...): with ``passes``
            None or "auto", the budgeted search (:mod:`attnopt.search`) measures candidate plans
            on ``calibration`` and compiles the fastest within the budget (``cm.plan``,
            ``cm.search_report``). A budget no plan meets gives the exact plan with a warning
            (``strict``: :class:`attnopt.PlanError`). With explicit passes, a budget is not
            searched with (a warning says so).
        method: capture method: "auto", "export", "export-strict" or "fx".
        max_signatures: input signatures kept compiled at once.
        retain_memory: on the CPU, tune glibc malloc (process-wide) so freed activations are reused
            instead of unmapped and faulted in again on every op; see attnopt.runtime.memory.
        plan: an :class:`attnopt.Plan` or the path of one saved with ``cm.plan.save(path)``: the
            passes reapply its decisions (heads kept, sites linearised, static block patterns)
            instead of calibrating, so no calibration data is needed and the outputs are those of
            the compile that recorded it. Without one, the first compilation records
            ``cm.plan`` and later input signatures replay it.
        dynamic: None (the default): capture once with symbolic batch and sequence dims, so any
            batch size and length runs the same program (``cm.stats["specialisations"]`` counts
            the new shapes it served); when the model cannot be captured that way, or fuses less,
            compile once per input shape instead, with a warning giving the reason. True: the
            same. False: always once per input shape.
        precision: ``"fp32"`` (the default) or ``"bf16"``: appends ``precision{dtype=bf16}`` to
            the pipeline (weights converted once, projections and attention in bf16, norms'
            statistics in fp32; lossy: check it with ``attnopt.validate``). On a CPU without
            native bf16 the pass declines and the model runs fp32, with a warning (``strict``:
            an error). A pipeline that already has a ``precision`` pass keeps it.
        strict: raise :class:`attnopt.PassError` instead of warning when a pass leaves a site
            its options select as it is (or drops an option there). Without it, compile warns
            once, listing the sites and the reason.
        validation: held-out batches (like ``calibration``) the budgeted search re-checks its
            chosen plan on (stepping back to a safer plan when the chosen one breaks the budget
            there); ``cm.search_report.validation`` reports it.
        max_seconds: the budgeted search's time limit; it keeps the best plan found by then.
        progress: the budgeted search shows a progress bar and prints its Pareto table on
            stderr.

    Raises:
        PlanError: the plan cannot be read, or does not fit the model or the pipeline (checked
            before anything is rewritten).
        PassError: with ``strict=True``, a pass left a selected site alone.

    Returns:
        A :class:`CompiledModule` with the model's call signature.
    """
    if not isinstance(model, torch.nn.Module) and is_onnx_source(model):
        model = OnnxModule(model)
    if isinstance(model, OnnxModule):
        dynamic = False  # imported for each input shape (see docs/onnx.md)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"attnopt.compile takes a torch.nn.Module or an ONNX model (path or ModelProto), "
            f"not {type(model).__name__}"
        )
    if model.training and any(
        isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm))
        for m in model.modules()
    ):
        warnings.warn(
            f"{type(model).__name__} is in training mode: dropout stays active in the compiled "
            "graph; call model.eval() for inference",
            stacklevel=2,
        )
    if not isinstance(args, builtins.tuple):
        args = (args,)
    if isinstance(passes, str) and passes == "auto" or (passes is None and budget is not None):
        if plan is not None:
            passes = None  # replaying a searched plan: no search
        elif budget is None:
            raise PipelineError(
                "passes='auto' is the budgeted search: give budget=attnopt.Budget(...) and "
                "calibration=[...] (your own data), or name the passes"
            )
        else:
            return _searched(
                model,
                args,
                kwargs,
                budget,
                calibration,
                validation,
                backend,
                strict,
                max_seconds,
                progress,
                precision,
            )
    if plan is not None and not isinstance(plan, Plan):
        if not isinstance(plan, (str, os.PathLike)):
            raise TypeError(f"plan must be an attnopt.Plan or a path, not {type(plan).__name__}")
        plan = Plan.load(plan)
    if passes is None:
        passes = plan.pipeline if plan is not None else "exact"
    if plan is not None and calibration is not None:
        warnings.warn(
            "attnopt.compile(plan=..., calibration=...): the plan's decisions are replayed, the "
            "calibration data is not used",
            UserWarning,
            stacklevel=2,
        )
    if precision not in ("fp32", "bf16"):
        raise PipelineError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    pipeline = as_pipeline(passes)
    if precision == "bf16" and not any(p.name == "precision" for p in pipeline.passes):
        pipeline = as_pipeline([*pipeline.passes, parse_pass("precision{dtype=bf16}")])
    if budget is not None and plan is None:
        warnings.warn(
            f"attnopt.compile(budget=...) with explicit passes ({pipeline}): the budget is not "
            "searched with; use passes='auto' for the budgeted search, or check this pipeline "
            "against the budget with attnopt.validate(..., tolerance=budget)",
            UserWarning,
            stacklevel=2,
        )
    if backend == "triton-interpret":
        from attnopt.runtime.triton.loader import interpreter_reason

        reason = interpreter_reason()
        if reason is not None:
            warnings.warn(
                f"backend='triton-interpret': {reason}. Attention runs on the torch kernels.",
                RuntimeWarning,
                stacklevel=2,
            )
    compiled = CompiledModule(
        model,
        pipeline,
        backend=backend,
        calibration=calibration,
        budget=budget,
        max_signatures=max_signatures,
        method=method,
        retain_memory=retain_memory,
        plan=plan,
        dynamic=dynamic,
        strict=strict,
    )
    if args or kwargs:
        compiled.compile_for(args, kwargs or {})
    return compiled


def _searched(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None,
    budget: Any,
    calibration: Any,
    validation: Any,
    backend: str,
    strict: bool,
    max_seconds: float,
    progress: bool,
    precision: str,
) -> CompiledModule:
    """``attnopt.compile`` with a budget and no passes: the budgeted search."""
    from attnopt.search import search
    from attnopt.validate import Budget

    if not isinstance(budget, Budget):
        raise TypeError(
            f"budget must be an attnopt.Budget (e.g. attnopt.Budget(cosine=0.98)), not "
            f"{type(budget).__name__}"
        )
    families = None
    if precision == "bf16":
        warnings.warn(
            "precision='bf16' with a budget: the search decides the precision (it tries bf16 "
            "where the CPU computes it natively)",
            UserWarning,
            stacklevel=3,
        )
    example = (args, kwargs or {}) if (args or kwargs) else None
    compiled, _ = search(
        model,
        example,
        calibration,
        budget,
        validation=validation,
        max_seconds=max_seconds,
        families=families,
        backend=backend,
        strict=strict,
        progress=progress,
    )
    return compiled


def export_onnx(
    cm: CompiledModule,
    path: str | os.PathLike[str],
    *,
    opset: int = 23,
    dynamic: bool = True,
) -> Any:
    """Export a compiled module's program to ONNX (torch's dynamo exporter, onnxscript).

    Dense attention sites become the standard ``Attention`` op (opset 23: query and key/value
    head counts, scale, causal, bool or additive masks); the other variants (sliding window,
    block-sparse, linear, ...) are decomposed into standard ops that compute the same thing;
    projections and the rest of the model are exported as torch ops are. The graph's symbolic
    batch and sequence dims become dynamic axes (``dynamic=True``); the file passes
    ``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime's CPU provider.

    Args:
        cm: a compiled module that has compiled (called, or compiled with example inputs).
        path: the ``.onnx`` file to write.
        opset: the ONNX opset (23 or more for the ``Attention`` op).
        dynamic: export the symbolic dims as dynamic axes (else the example's shapes).

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        BackendError: nothing compiled yet, a pass whose ops are not exportable yet (padding
            removal, token merging or pruning), or onnxscript missing.
    """
    from pathlib import Path

    from attnopt.errors import BackendError
    from attnopt.runtime.export import export_program

    if not isinstance(cm, CompiledModule):
        raise TypeError(f"export_onnx takes an attnopt.CompiledModule, not {type(cm).__name__}")
    entry = cm.symbolic_entry() if dynamic else None
    if entry is None:
        try:
            entry = cm._latest()
        except RuntimeError as err:
            raise BackendError(f"export_onnx: {err}") from None
    graph = entry.graph
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise BackendError(
            "export_onnx needs onnxscript (torch's ONNX exporter): pip install onnxscript"
        ) from None
    fn = export_program(graph)
    hints = graph.meta.get("symbol_hints", {})

    class _Program(torch.nn.Module):
        def forward(self, *inputs: torch.Tensor) -> Any:
            return tuple(fn(*inputs))

    examples, shapes = [], []
    for value in graph.inputs:
        dims = []
        spec = {}
        for axis, dim in enumerate(value.type.shape):
            if isinstance(dim, str):
                dims.append(max(int(hints.get(dim, 2)), 2))  # size 1 would be specialised
                spec[axis] = torch.export.Dim.DYNAMIC
            else:
                dims.append(int(dim))
        dtype = value.type.dtype
        example = torch.ones(dims, dtype=dtype) if not dtype.is_floating_point else None
        examples.append(example if example is not None else torch.randn(dims, dtype=dtype))
        shapes.append(spec if dynamic else {})
    path = Path(path)
    variants = sorted({site.variant for site in entry.sites})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress warnings
        try:
            program = _onnx_export(
                _Program(), tuple(examples), graph, opset, tuple(shapes) if dynamic else None
            )
        except Exception as err:  # noqa: BLE001 - the exporter's failure, named for the user
            first = " ".join(str(err).split())[:300]
            raise BackendError(
                f"torch's ONNX exporter could not export this program (its sites run as "
                f"{', '.join(variants)}): {type(err).__name__}: {first}"
            ) from err
    program.save(str(path))
    return path


def _onnx_export(
    module: torch.nn.Module, examples: tuple, graph: Any, opset: int, shapes: tuple | None
) -> Any:
    return torch.onnx.export(
        module,
        examples,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=(shapes,) if shapes is not None else None,
        input_names=[value.name for value in graph.inputs],
        output_names=[value.name for value in graph.outputs],
        # The exporter's own fusions (rotary embeddings) are not always valid for the
        # program's layouts; attention is already one op.
        optimize=False,
    )


__all__ = ["capture", "compile", "export_onnx"]
