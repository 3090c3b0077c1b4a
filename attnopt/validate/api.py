"""Run a reference and a candidate on the same inputs and report how their outputs differ.

Entry points: :func:`run_and_compare` (``attnopt.validate`` is built on it), :func:`compare_runs`
(outputs already computed), :func:`input_batches`.

Several input batches aggregate into one report: each output's leaves are concatenated across
batches (flattened, or as rows of classes for logits) and the metrics are computed over the
union, so ``max_abs`` is the worst over all batches and ``rel_l2``/``cosine``/``sqnr_db`` weigh
every element once.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from attnopt.validate.budget import Budget, resolve_tolerance
from attnopt.validate.compare import (
    build_report,
    check_same_structure,
    flatten_outputs,
    is_logits_name,
)
from attnopt.validate.errors import ValidationError
from attnopt.validate.report import NumericsReport

Batch = tuple[tuple, dict]


def _normalise_batch(item: object, position: int | None) -> Batch:
    where = "" if position is None else f" (inputs item {position})"
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValidationError(
            f"inputs must be (args, kwargs) pairs, got {type(item).__name__}{where}"
        )
    args, kwargs = item
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise ValidationError(f"args must be a tuple, got {type(args).__name__}{where}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ValidationError(f"kwargs must be a dict or None, got {type(kwargs).__name__}{where}")
    return tuple(args), dict(kwargs)


def input_batches(args: tuple, kwargs: dict | None, inputs: Iterable | None) -> list[Batch]:
    """The ``(args, kwargs)`` batches a comparison runs on, checked and normalised.

    Args:
        args: positional inputs of a single batch (a bare tensor counts as ``(tensor,)``).
        kwargs: keyword inputs of a single batch, or None.
        inputs: instead of args/kwargs, an iterable of ``(args, kwargs)`` pairs.

    Returns:
        One ``(tuple, dict)`` pair per batch, never empty.

    Raises:
        ValidationError: both forms given, an empty ``inputs``, or a malformed pair.
    """
    if inputs is None:
        return [_normalise_batch((args, kwargs), None)]
    if args or kwargs:
        raise ValidationError("pass either inputs=[(args, kwargs), ...] or args/kwargs, not both")
    batches = [_normalise_batch(item, position) for position, item in enumerate(inputs)]
    if not batches:
        raise ValidationError("inputs is empty: nothing to run the models on")
    return batches


def _to_float64(obj: Any) -> Any:
    """Floating tensors (nested in tuples, lists, dicts) as float64, the rest unchanged."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            return obj.to(torch.float64)
        return obj.to(torch.complex128) if obj.is_complex() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_float64(item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_float64(value) for key, value in obj.items()}
    return obj


def _call(model: Callable, batch: Batch) -> Any:
    args, kwargs = batch
    with torch.no_grad():
        return model(*args, **kwargs)


def _float64_copy(reference: Callable) -> Callable:
    model = copy.deepcopy(reference)
    if isinstance(model, torch.nn.Module):
        model = model.to(torch.float64)
    return model


def _concat(per_batch: list[dict[str, torch.Tensor]], logits: set[str]) -> dict[str, torch.Tensor]:
    """One tensor per output name over all batches (see the module docstring)."""
    names = list(per_batch[0])
    for position, outputs in enumerate(per_batch[1:], start=1):
        if list(outputs) != names:
            raise ValidationError(
                f"batch {position} returns outputs {list(outputs)}, batch 0 returns {names}"
            )
    merged = {}
    for name in names:
        tensors = [outputs[name].detach().cpu() for outputs in per_batch]
        if name in logits:
            num_classes = tensors[0].shape[-1]
            if any(tensor.shape[-1] != num_classes for tensor in tensors):
                raise ValidationError(f"logits {name!r} change class count across batches")
            merged[name] = torch.cat([tensor.reshape(-1, num_classes) for tensor in tensors])
        else:
            merged[name] = torch.cat([tensor.reshape(-1) for tensor in tensors])
    return merged


def _run_oracle(
    reference: Callable, batches: list[Batch], ref_outputs: list, fallback: str
) -> tuple[list | None, str | None]:
    """The fp64 oracle's outputs per batch, or None and a one-line reason it is unusable."""
    try:
        model = _float64_copy(reference)
        outputs = [_call(model, _to_float64(batch)) for batch in batches]
    except Exception as error:  # the oracle is advisory: judge without it
        return None, (
            f"the fp64 oracle could not run ({type(error).__name__}: {error}); {fallback}"
        )
    for position, (ref, oracle) in enumerate(zip(ref_outputs, outputs)):
        try:
            check_same_structure(flatten_outputs(ref), flatten_outputs(oracle), "fp64 oracle")
        except ValidationError as error:
            where = f" in batch {position}" if len(batches) > 1 else ""
            return None, f"the fp64 oracle is unusable{where} ({error}); {fallback}"
    return outputs, None


def run_and_compare(
    reference: Callable,
    candidate: Callable,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    inputs: Iterable[tuple[tuple, dict | None]] | None = None,
    tolerance: str | Budget = "exact",
    oracle: bool = False,
    logits_keys: Iterable[str] = ("logits",),
) -> NumericsReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare their outputs.

    Both run under ``torch.no_grad()``; neither is put in eval mode (a reference in training
    mode gets a warning, since dropout makes runs disagree). NaN/inf in the reference's outputs
    are reported in the returned report, not raised.

    Args:
        reference: the model (or any callable) taken as correct.
        candidate: the model under test, with the same call signature and output structure.
        args: positional inputs of a single batch.
        kwargs: keyword inputs of a single batch.
        inputs: instead of args/kwargs, an iterable of ``(args, kwargs)`` pairs; the report
            aggregates over all of them.
        tolerance: ``"exact"`` (the fp64-oracle rule), ``"exact-elementwise"``, ``"none"``, a
            lossy preset name, or a :class:`Budget` (see :mod:`attnopt.validate.budget`).
        oracle: run the fp64 oracle (a deep copy of the reference converted to float64, on
            float64 copies of the floating inputs) also for a tolerance that does not judge by
            it: its errors are then recorded, and an elementwise tolerance accepts an output
            that meets the fp64-oracle rule. ``"exact"`` always runs it. When the oracle cannot
            run or returns other outputs, one warning says so and ``"exact"`` is judged
            elementwise.
        logits_keys: output names judged as logits (top-1 agreement, KL divergence).

    Returns:
        The :class:`NumericsReport`.

    Raises:
        ValidationError: when the reference cannot take the inputs, the inputs are malformed,
            or the outputs' structures or shapes differ. An exception raised by the candidate
            itself propagates unchanged (it is a bug in the candidate, not in the inputs).
    """
    batches = input_batches(args, kwargs, inputs)
    criterion = resolve_tolerance(tolerance)
    warnings: list[str] = []
    if isinstance(reference, torch.nn.Module) and reference.training:
        warnings.append("the reference is in training mode (dropout?); call .eval() first")
    ref_outputs = []
    for batch in batches:
        try:
            ref_outputs.append(_call(reference, batch))
        except Exception as error:
            raise ValidationError(
                f"the reference model cannot take these inputs: {type(error).__name__}: {error}"
            ) from error
    cand_outputs = [_call(candidate, batch) for batch in batches]
    padding_input = getattr(candidate, "removed_padding", None)
    oracle_outputs = None
    if oracle or criterion.oracle_rule:
        fallback = "judged elementwise" if criterion.oracle_rule else "judged without it"
        oracle_outputs, why_not = _run_oracle(reference, batches, ref_outputs, fallback)
        warnings += [why_not] if why_not else []
    return compare_runs(
        ref_outputs,
        cand_outputs,
        batches,
        tolerance=criterion,
        padding_input=padding_input if isinstance(padding_input, str) else None,
        oracle_outputs=oracle_outputs,
        logits_keys=logits_keys,
        warnings=warnings,
    )


def compare_runs(
    ref_outputs: list,
    cand_outputs: list,
    batches: list[Batch],
    *,
    tolerance: Any = "exact",
    padding_input: str | None = None,
    real_positions_only: bool = False,
    oracle_outputs: list | None = None,
    logits_keys: Iterable[str] = ("logits",),
    warnings: list[str] | None = None,
) -> NumericsReport:
    """The report for outputs already computed, batch by batch (``run_and_compare`` runs the
    models and calls this; the budgeted search calls it with the reference's outputs cached).

    Args:
        ref_outputs: the reference's outputs, one per batch.
        cand_outputs: the candidate's outputs, one per batch.
        batches: the ``(args, kwargs)`` batches they ran on.
        tolerance: as for :func:`run_and_compare` (a name, a Budget or a resolved Criterion).
        padding_input: the keyword input whose nonzero entries are real tokens when the
            candidate removed padding (the reference's padded positions are then zeroed).
        real_positions_only: zero the candidate's padded positions too, so only real positions
            are compared (the budgeted search: what a model computes at padding is not used).
        oracle_outputs: the fp64 oracle's outputs per batch, if it ran.
        logits_keys: output names judged as logits.
        warnings: warnings to put first in the report.

    Returns:
        The :class:`NumericsReport`, including the budget's user metric when it has one.

    Raises:
        ValidationError: different output structures, or a user metric that fails.
    """
    criterion = resolve_tolerance(tolerance)
    warnings = list(warnings or [])
    if padding_input is not None:
        ref_outputs = _real_positions(ref_outputs, batches, padding_input, warnings)
        if real_positions_only:
            cand_outputs = _real_positions(cand_outputs, batches, padding_input, [])
        if oracle_outputs is not None:
            oracle_outputs = _real_positions(oracle_outputs, batches, padding_input, [])
    if len(batches) == 1:
        report = build_report(
            ref_outputs[0],
            cand_outputs[0],
            tolerance=criterion,
            oracle_outputs=oracle_outputs[0] if oracle_outputs else None,
            logits_keys=logits_keys,
        )
    else:
        report = _aggregate(ref_outputs, cand_outputs, oracle_outputs, criterion, logits_keys)
    report.warnings[:0] = warnings
    report.batches = len(batches)
    if criterion.budget is not None and criterion.budget.metric is not None:
        budget = criterion.budget
        value = user_metric(budget, ref_outputs, cand_outputs, batches)
        report.metrics[budget.metric_name] = {"value": value, "batches": len(batches)}
        report.failures += budget.judge_metric(value)
    return report


def user_metric(budget: Budget, ref_outputs: list, cand_outputs: list, batches: list) -> float:
    """The worst value of ``budget.metric`` over the batches (lowest for ``metric_min``,
    highest for ``metric_max``).

    Args:
        budget: a budget with a ``metric`` callable.
        ref_outputs: the reference's outputs per batch (padded positions zeroed when the
            candidate removed padding).
        cand_outputs: the candidate's outputs per batch.
        batches: the ``(args, kwargs)`` of each batch.

    Returns:
        The worst value.

    Raises:
        ValidationError: the callable raised, or returned something that is not a finite real
            number.
    """
    metric = budget.metric
    assert metric is not None
    name = budget.metric_name
    try:
        takes_inputs = "inputs" in inspect.signature(metric).parameters
    except (TypeError, ValueError):
        takes_inputs = False
    values = []
    for position, (ref, cand, batch) in enumerate(zip(ref_outputs, cand_outputs, batches)):
        try:
            raw = metric(ref, cand, inputs=batch) if takes_inputs else metric(ref, cand)
        except Exception as error:
            raise ValidationError(
                f"the budget's {name} raised on batch {position}: {type(error).__name__}: "
                f"{error}. It is called as metric(reference_outputs, candidate_outputs) with "
                "one batch's model outputs"
            ) from error
        if isinstance(raw, torch.Tensor) and raw.numel() == 1:
            raw = raw.item()
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
            raise ValidationError(
                f"the budget's {name} returned {type(raw).__name__} on batch {position}: it must "
                "return a float"
            )
        if not math.isfinite(float(raw)):
            raise ValidationError(
                f"the budget's {name} returned {float(raw)} on batch {position}: it must return "
                "a finite float (check it for 0/0 or an empty selection)"
            )
        values.append(float(raw))
    return min(values) if budget.metric_min is not None else max(values)


def _zero_padding(obj: Any, valid: torch.Tensor) -> Any:
    """Floating tensors whose leading dims are the padded batch, zeroed at padded positions."""
    if isinstance(obj, torch.Tensor):
        if (
            obj.is_floating_point()
            and obj.dim() >= 2
            and tuple(obj.shape[:2]) == tuple(valid.shape)
        ):
            shape = (*valid.shape, *([1] * (obj.dim() - 2)))
            return obj * valid.reshape(shape).to(obj.dtype)
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_zero_padding(item, valid) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_zero_padding(item, valid) for item in obj)
    if isinstance(obj, dict):
        items = {key: _zero_padding(value, valid) for key, value in obj.items()}
        try:
            return type(obj)(**items)  # model outputs (ModelOutput) keep their type
        except TypeError:
            return items
    return obj


def _real_positions(
    ref_outputs: list, batches: list[Batch], name: str, warnings: list[str]
) -> list:
    """The reference's outputs with padded positions zeroed, as the candidate (which removed
    padding) returns them: the comparison then covers the real positions only."""
    result = []
    for outputs, (_, kwargs) in zip(ref_outputs, batches):
        mask = kwargs.get(name)
        if not isinstance(mask, torch.Tensor):
            warnings.append(
                f"the candidate removed padding, but input {name!r} is not a keyword input: "
                "padded positions are compared too"
            )
            return ref_outputs
        result.append(_zero_padding(outputs, mask != 0))
    warnings.append(
        f"the candidate removed padding: outputs are compared at real positions only (where "
        f"{name} != 0); its padded positions are zeros by contract"
    )
    return result


def _aggregate(
    ref_outputs: list, cand_outputs: list, oracle_outputs: list | None, tolerance, logits_keys
) -> NumericsReport:
    """One report over several batches: outputs concatenated per name, then compared."""
    logits_keys = tuple(logits_keys)
    skipped: list[str] = []
    flat_refs = [flatten_outputs(outputs, skipped=skipped) for outputs in ref_outputs]
    flat_cands = [flatten_outputs(outputs) for outputs in cand_outputs]
    for position, (flat_ref, flat_cand) in enumerate(zip(flat_refs, flat_cands)):
        try:
            check_same_structure(flat_ref, flat_cand, "candidate")
        except ValidationError as error:
            raise ValidationError(f"batch {position}: {error}") from error
    logits = {
        name
        for name, tensor in flat_refs[0].items()
        if is_logits_name(name, logits_keys) and tensor.is_floating_point() and tensor.ndim >= 1
    }
    oracle = None
    if oracle_outputs:
        oracle = _concat([flatten_outputs(outputs) for outputs in oracle_outputs], logits)
    report = build_report(
        _concat(flat_refs, logits),
        _concat(flat_cands, logits),
        tolerance=tolerance,
        oracle_outputs=oracle,
        logits_keys=logits_keys,
    )
    report.warnings += [
        f"output {item} is not a tensor and was not compared" for item in sorted(set(skipped))
    ]
    return report
