"""Pair up two models' outputs and build a numerics report from them.

Entry points: :func:`flatten_outputs`, :func:`compare_outputs`, :func:`build_report`,
:func:`check_same_structure`, :func:`site_reports`.

Outputs are compared leaf by leaf. :func:`flatten_outputs` names every tensor leaf of a nested
output by its path: dict keys and dataclass / ``ModelOutput`` / namedtuple field names, sequence
indices, joined by dots (``"logits"``, ``"hidden_states.3"``, ``"0.1"``). A bare tensor is
``"output"``. ``None`` fields are absent (as ``ModelOutput`` drops them), Python numbers become
0-d tensors, KV caches with ``layers[i].keys/values`` (transformers' ``Cache``) become
``name.i.keys`` / ``name.i.values``; other objects are skipped and reported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from attnopt.tolerances import oracle_allowed_error, oracle_error_ratio, oracle_floor
from attnopt.validate.budget import Budget, Criterion, judge_metrics, resolve_tolerance
from attnopt.validate.errors import ValidationError
from attnopt.validate.metrics import (
    MetricDict,
    logits_metrics,
    oracle_metrics,
    tensor_metrics,
    tolerance_metrics,
)
from attnopt.validate.report import NumericsReport, SiteReport


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _cache_items(obj: object) -> list[tuple[str, object]] | None:
    """``Cache.layers[i].keys/values`` as named items, or None if ``obj`` is no such cache."""
    layers = getattr(obj, "layers", None)
    if not isinstance(layers, (list, tuple)) or not layers:
        return None
    if not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return None
    items: list[tuple[str, object]] = []
    for index, layer in enumerate(layers):
        items += [(f"{index}.keys", layer.keys), (f"{index}.values", layer.values)]
    return items


def _children(obj: object) -> Iterable[tuple[object, object]] | None:
    """Named children of a container, or None for a leaf."""
    if isinstance(obj, Mapping):  # dict, OrderedDict, HF ModelOutput
        return list(obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple, torch.return_types
        return list(zip(obj._fields, obj))
    if isinstance(obj, (tuple, list)):
        return list(enumerate(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(item.name, getattr(obj, item.name)) for item in dataclasses.fields(obj)]
    return _cache_items(obj)


def _flatten(obj: object, prefix: str, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    name = prefix or "output"
    if obj is None:
        return
    if isinstance(obj, torch.Tensor) or isinstance(obj, (bool, int, float, complex)):
        if name in out:
            raise ValidationError(f"two output leaves are both named {name!r}")
        out[name] = obj if isinstance(obj, torch.Tensor) else torch.tensor(obj)
        return
    children = _children(obj)
    if children is None and callable(getattr(obj, "to_legacy_cache", None)):
        children = list(enumerate(obj.to_legacy_cache()))
    if children is None:
        skipped.append(f"{name} ({type(obj).__name__})")
        return
    for key, value in children:
        _flatten(value, _join(prefix, key), out, skipped)


def flatten_outputs(obj: Any, *, skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Name every tensor leaf of a (nested) model output.

    Args:
        obj: a tensor, or tuples / lists / dicts / dataclasses / ``ModelOutput`` of them.
        skipped: when given, receives ``"name (TypeName)"`` for each leaf that is neither a
            tensor nor a number nor a container (such leaves are not compared).

    Returns:
        ``{name: tensor}`` in output order, e.g. ``{"last_hidden_state": ..., "0.1": ...}``.

    Raises:
        ValidationError: when two leaves get the same name (e.g. key ``"a.b"`` next to ``a.b``).
    """
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out, skipped if skipped is not None else [])
    return out


def check_same_structure(
    reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise unless two flattened outputs have the same leaf names and shapes.

    Args:
        reference: the reference's leaves, from :func:`flatten_outputs`.
        candidate: the other model's leaves, named the same way.
        what: what ``candidate`` is, for the message (``"candidate"``, ``"fp64 oracle"``).

    Raises:
        ValidationError: naming the missing or extra leaves, or the leaves whose shapes differ.
    """
    missing = [name for name in reference if name not in candidate]
    extra = [name for name in candidate if name not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the {what}: {missing}")
        if extra:
            parts.append(f"only in the {what}: {extra}")
        raise ValidationError(f"output structures differ; {'; '.join(parts)}")
    shapes = [
        f"{name!r}: reference {tuple(reference[name].shape)} vs {what} "
        f"{tuple(candidate[name].shape)}"
        for name in reference
        if reference[name].shape != candidate[name].shape
    ]
    if shapes:
        raise ValidationError(f"output shapes differ; {'; '.join(shapes)}")


def is_logits_name(name: str, logits_keys: Iterable[str]) -> bool:
    """Whether the output ``name`` is logits: it, or its last dotted part, is a logits key.

    Args:
        name: a flattened output name.
        logits_keys: e.g. ``("logits",)``.

    Returns:
        True for ``"logits"`` and ``"0.logits"`` with the default keys.
    """
    keys = set(logits_keys)
    return name in keys or name.rsplit(".", 1)[-1] in keys


def _is_logits(name: str, tensor: torch.Tensor, logits_keys: Iterable[str]) -> bool:
    return is_logits_name(name, logits_keys) and tensor.is_floating_point() and tensor.ndim >= 1


def compare_outputs(
    ref: Any, cand: Any, *, logits_keys: Iterable[str] = ("logits",)
) -> dict[str, MetricDict]:
    """Metrics for every output leaf of two models' outputs.

    Args:
        ref: the reference model's output (any nesting :func:`flatten_outputs` reads).
        cand: the candidate model's output, same structure and shapes.
        logits_keys: output names that get :func:`logits_metrics` instead of
            :func:`tensor_metrics`.

    Returns:
        ``{output name: metric dict}``.

    Raises:
        ValidationError: when the structures (names) or shapes differ; the message names them.
    """
    ref_flat, cand_flat = flatten_outputs(ref), flatten_outputs(cand)
    check_same_structure(ref_flat, cand_flat, "candidate")
    return {
        name: (
            logits_metrics(tensor, cand_flat[name])
            if _is_logits(name, tensor, logits_keys)
            else tensor_metrics(tensor, cand_flat[name])
        )
        for name, tensor in ref_flat.items()
    }


def _metrics_for(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    criterion: Criterion,
    *,
    is_logits: bool,
    oracle: torch.Tensor | None = None,
) -> MetricDict:
    metrics = (
        logits_metrics(reference, candidate) if is_logits else tensor_metrics(reference, candidate)
    )
    if criterion.table is not None:
        tol = criterion.tolerance_for(reference.dtype)
        metrics.update(tolerance_metrics(reference, candidate, atol=tol.atol, rtol=tol.rtol))
    if oracle is not None and reference.is_floating_point():
        metrics.update(oracle_metrics(reference, candidate, oracle))
        numel, dtype = reference.numel(), reference.dtype
        metrics["fp64_ratio_limit"] = oracle_error_ratio(numel, dtype)
        metrics["fp64_floor"] = oracle_floor(metrics["fp64_rms"], dtype)
        metrics["fp64_allowed_rmse"] = oracle_allowed_error(
            metrics["eager_fp64_rmse"], metrics["fp64_rms"], numel, dtype
        )
    return metrics


def _oracle_leaf(
    name: str, reference: torch.Tensor, oracle_flat: Mapping[str, torch.Tensor] | None
) -> tuple[torch.Tensor | None, str | None]:
    """The oracle output for a floating output, or None and why it cannot serve as one."""
    if oracle_flat is None or not reference.is_floating_point():
        return None, None
    if reference.dtype == torch.float64:
        return None, (
            f"output {name!r} is float64 already: the fp64 oracle is no more precise, "
            "judged without it"
        )
    oracle = oracle_flat[name]
    if oracle.dtype != torch.float64:
        return None, (
            f"output {name!r}: the fp64 oracle returned it as {oracle.dtype}, not float64: "
            "judged without the oracle"
        )
    return oracle, None


_SITE_INDEX = re.compile(r"^\s*site\s+(\d+)\b")


def site_reports(
    site_pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], criterion: Criterion
) -> list[SiteReport]:
    """Judge each attention site's output against its reference output.

    Args:
        site_pairs: ``{name: (reference, candidate)}``; a name starting ``"site <i>"`` gives the
            site index, otherwise the position in ``site_pairs`` is used.
        criterion: the resolved tolerance every site is judged by.

    Returns:
        One :class:`SiteReport` per pair, in the order given.

    Raises:
        ValidationError: when a pair is not two tensors or their metrics cannot be computed.
    """
    sites = []
    for position, (name, pair) in enumerate(site_pairs.items()):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValidationError(f"site {name!r}: expected (reference, candidate) tensors")
        reference, candidate = pair
        try:
            metrics = _metrics_for(reference, candidate, criterion, is_logits=False)
        except ValidationError as error:
            raise ValidationError(f"site {name!r}: {error}") from error
        reasons = judge_metrics(metrics, criterion)
        match = _SITE_INDEX.match(name)
        index = int(match.group(1)) if match else position
        sites.append(SiteReport(index, name, metrics, ok=not reasons, reasons=reasons))
    return sites


def _output_warnings(name: str, reference: torch.Tensor, candidate: torch.Tensor, metrics):
    warnings = []
    if metrics.get("ref_has_nonfinite"):
        warnings.append(
            f"reference output {name!r} has {metrics['ref_nonfinite']} non-finite values "
            f"(NaN/inf): compared where finite; the candidate must reproduce them"
        )
    if metrics.get("positions_skipped"):
        warnings.append(
            f"output {name!r}: {metrics['positions_skipped']} positions skipped in top-1/KL "
            f"(the reference row is not a distribution)"
        )
    if reference.dtype != candidate.dtype:
        warnings.append(
            f"output {name!r}: dtype {reference.dtype} in the reference vs {candidate.dtype}"
        )
    return warnings


def build_report(
    ref_outputs: Any,
    cand_outputs: Any,
    *,
    tolerance: str | Budget | Criterion = "exact",
    site_pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    oracle_outputs: Any = None,
    logits_keys: Iterable[str] = ("logits",),
    judge_sites: bool = False,
) -> NumericsReport:
    """Compare two models' outputs (and optionally per-site outputs) into a report.

    Args:
        ref_outputs: the reference model's output (any nesting :func:`flatten_outputs` reads).
        cand_outputs: the candidate's output, same structure and shapes.
        tolerance: ``"exact"``, ``"exact-elementwise"``, ``"none"``, a lossy preset name, a
            :class:`Budget` or a resolved :class:`Criterion` (see :mod:`attnopt.validate.budget`).
        site_pairs: ``{site name: (reference site output, candidate site output)}`` in layer
            order. A name starting ``"site N"`` gives the site index N; otherwise its position.
        oracle_outputs: the output of a float64 copy of the reference on float64 inputs; when
            given, the reference's and the candidate's errors against it are recorded, and
            ``"exact"`` judges floating outputs by the fp64-oracle rule (other table tolerances
            accept an output outside the table that meets it). Without it ``"exact"`` is
            judged elementwise. Floating outputs the oracle returns in another dtype than
            float64 are judged without it (with a warning).
        logits_keys: output names judged as logits (top-1 agreement, KL).
        judge_sites: when True, a failing site also fails the report.

    Returns:
        The :class:`NumericsReport`.

    Raises:
        ValidationError: when output structures or shapes differ (also for the oracle).
        ValueError, TypeError: for an invalid ``tolerance``.
    """
    criterion = resolve_tolerance(tolerance)
    logits_keys = tuple(logits_keys)
    skipped: list[str] = []
    ref_flat = flatten_outputs(ref_outputs, skipped=skipped)
    cand_flat = flatten_outputs(cand_outputs)
    check_same_structure(ref_flat, cand_flat, "candidate")
    oracle_flat = None
    if oracle_outputs is not None:
        oracle_flat = flatten_outputs(oracle_outputs)
        check_same_structure(ref_flat, oracle_flat, "fp64 oracle")
    report = NumericsReport(tolerance=criterion.name)
    report.warnings += [f"output {item} is not a tensor and was not compared" for item in skipped]
    if not ref_flat:
        report.warnings.append("the outputs hold no tensors: nothing was compared")
    for name, reference in ref_flat.items():
        candidate = cand_flat[name]
        is_logits = _is_logits(name, reference, logits_keys)
        oracle, why_not = _oracle_leaf(name, reference, oracle_flat)
        report.warnings += [why_not] if why_not else []
        report.oracle = report.oracle or oracle is not None
        metrics = _metrics_for(reference, candidate, criterion, is_logits=is_logits, oracle=oracle)
        report.metrics[name] = metrics
        if is_logits:
            report.logits.append(name)
        report.failures += [
            f"output {name!r}: {reason}"
            for reason in judge_metrics(metrics, criterion, is_logits=is_logits)
        ]
        report.warnings += _output_warnings(name, reference, candidate, metrics)
    report.rule = criterion.rule(oracle=report.oracle)
    if site_pairs:
        report.sites = site_reports(site_pairs, criterion)
        if judge_sites:
            report.failures += [
                f"site {site.name!r}: {reason}" for site in report.sites for reason in site.reasons
            ]
    return report
