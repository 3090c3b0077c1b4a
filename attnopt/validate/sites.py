"""``attnopt.validate`` and ``attnopt.sensitivity``: whole-model numerics plus per-site outputs.

Entry points: :func:`validate`, :func:`sensitivity`, :func:`site_outputs`.

Per-site metrics compare the output of every attention site in the reference (compiled with the
exact pipeline, whose sites compute exactly what eager computes) with the same site in the
candidate, matched by site index, so the user sees where error enters and how it grows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from attnopt.validate.api import input_batches, run_and_compare
from attnopt.validate.budget import Budget, resolve_tolerance
from attnopt.validate.compare import site_reports
from attnopt.validate.errors import ValidationError
from attnopt.validate.report import NumericsReport


def _compile(model: torch.nn.Module, args: tuple, kwargs: dict, pipeline: Any) -> Any:
    """``model`` compiled with ``pipeline`` for these inputs (the validator sits below
    ``attnopt.api``: it builds the compiled module itself)."""
    from attnopt.compiled import CompiledModule
    from attnopt.passes.base import as_pipeline

    compiled = CompiledModule(model, as_pipeline(pipeline))
    compiled.compile_for(args, kwargs)
    return compiled


def _compiled(model: Any, args: tuple, kwargs: dict) -> Any:
    from attnopt.compiled import CompiledModule

    if isinstance(model, CompiledModule):
        return model
    if not isinstance(model, torch.nn.Module):
        return None
    return _compile(model, args, kwargs, "exact")


def site_outputs(
    model: Any, args: tuple = (), kwargs: dict | None = None
) -> dict[int, tuple[str, torch.Tensor]]:
    """Every attention site's output for one call, by site index.

    Args:
        model: an ``nn.Module`` (compiled with the exact pipeline to find its sites) or a
            :class:`attnopt.CompiledModule`.
        args: positional inputs.
        kwargs: keyword inputs.

    Returns:
        ``{index: (name, output)}`` where name is ``"site i (module.path)"``.
    """
    kwargs = kwargs or {}
    compiled = _compiled(model, args, kwargs)
    if compiled is None:
        return {}
    with torch.no_grad():
        _, taps = compiled.run_with_taps(*args, **kwargs)
    names = {site.index: f"site {site.index} ({site.module or 'model'})" for site in compiled.sites}
    return {
        index: (names.get(index, f"site {index}"), tensor) for index, tensor in sorted(taps.items())
    }


def validate(
    reference: Any,
    candidate: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    inputs: Iterable[tuple[tuple, dict | None]] | None = None,
    tolerance: str | Budget = "exact",
    oracle: bool = False,
    sites: bool = True,
    logits_keys: Iterable[str] = ("logits",),
) -> NumericsReport:
    """Compare a candidate (usually a compiled, rewritten model) with its reference.

    Args:
        reference: the original model.
        candidate: the model under test (same call signature and output structure).
        args: positional inputs of one batch.
        kwargs: keyword inputs of one batch.
        inputs: instead, an iterable of ``(args, kwargs)`` batches; metrics aggregate over all.
        tolerance: ``"exact"`` (the default: each floating output's RMSE against a float64
            run of the reference at most a small multiple of the reference's own, see
            :mod:`attnopt.validate.budget`), ``"exact-elementwise"`` (the per-dtype allclose
            table alone), ``"none"``, a lossy preset name, or an :class:`attnopt.Budget` such
            as ``Budget(cosine=0.99)``. Sites are judged by the elementwise table.
        oracle: run the float64 oracle for other tolerances too (``"exact"`` always runs it);
            its errors are recorded and an elementwise tolerance accepts an output that meets
            the fp64-oracle rule.
        sites: also compare every attention site's output (on the first batch).
        logits_keys: output names treated as logits (top-1 agreement and KL divergence).

    Returns:
        The :class:`NumericsReport` (``ok``, ``metrics``, ``sites``, ``to_json()``, ``save()``).

    Raises:
        ValidationError: different output structures, inputs the reference cannot take.
    """
    report = run_and_compare(
        reference,
        candidate,
        args,
        kwargs,
        inputs=inputs,
        tolerance=tolerance,
        oracle=oracle,
        logits_keys=logits_keys,
    )
    if not sites:
        return report
    first_args, first_kwargs = input_batches(args, kwargs, inputs)[0]
    ref_sites = site_outputs(reference, first_args, first_kwargs)
    cand_sites = site_outputs(candidate, first_args, first_kwargs)
    padding_input = getattr(candidate, "removed_padding", None)
    real = first_kwargs.get(padding_input) if isinstance(padding_input, str) else None
    if isinstance(real, torch.Tensor) and real.dim() == 2:
        ref_sites = {  # a candidate without padding has zeros in its padded query rows
            index: (name, _real_queries(out, real != 0)) for index, (name, out) in ref_sites.items()
        }
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, (name, ref_out) in ref_sites.items():
        if index not in cand_sites:
            report.warnings.append(f"{name} has no counterpart in the candidate")
            continue
        cand_out = cand_sites[index][1]
        if cand_out.shape != ref_out.shape:
            report.warnings.append(
                f"{name}: output shape {tuple(cand_out.shape)} vs {tuple(ref_out.shape)} in the "
                "reference (tokens or heads were removed): not compared"
            )
            continue
        pairs[name] = (ref_out, cand_out)
    if pairs:
        report.sites = site_reports(pairs, resolve_tolerance(tolerance))
    return report


def _real_queries(out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, S, D]`` site output with its padded query rows zeroed (other shapes as they
    are)."""
    if out.dim() == 4 and tuple(out.shape[:1]) + tuple(out.shape[2:3]) == tuple(valid.shape):
        return out * valid[:, None, :, None].to(out.dtype)
    return out


def sensitivity(
    model: torch.nn.Module,
    pass_: Any,
    calibration: Iterable[tuple[tuple, dict | None]],
    *,
    tolerance: str | Budget = "exact",
) -> list[dict[str, Any]]:
    """Apply a lossy pass to one attention site at a time and measure the end-to-end error.

    Args:
        model: the model.
        pass_: a lossy pass with a ``sites`` option (a tuple of site indices).
        calibration: ``(args, kwargs)`` batches to measure on.
        tolerance: passed to :func:`validate` (only the metrics are used, so ``"exact"``
            runs as ``"exact-elementwise"``, without the fp64 oracle).

    Returns:
        One row per site, in site order: ``{"site", "module", "cosine", "rel_l2", "sqnr_db",
        "max_abs"}`` (worst output), sorted by site index. Least sensitive = highest cosine.
    """
    from attnopt.passes.base import PassManager

    if not any(f.name == "sites" for f in dataclasses.fields(pass_)):
        raise ValidationError(f"pass {pass_.name} has no 'sites' option to restrict it to one site")
    batches = [(tuple(a), dict(k or {})) for a, k in calibration]
    if not batches:
        raise ValidationError("calibration is empty: nothing to measure sensitivity on")
    if resolve_tolerance(tolerance).oracle_rule:
        tolerance = "exact-elementwise"  # the verdict is not used: spare the fp64 runs
    first_args, first_kwargs = batches[0]
    exact = _compile(model, first_args, first_kwargs, "exact")
    rows = []
    for site in exact.sites:
        single = dataclasses.replace(pass_, sites=(site.index,))
        pipeline = PassManager.parse("canonicalize,fuse-attention")
        pipeline.passes.append(single)
        candidate = _compile(model, first_args, first_kwargs, pipeline)
        report = validate(model, candidate, inputs=batches, tolerance=tolerance, sites=False)
        worst = min(report.metrics.values(), key=lambda m: m.get("cosine", 1.0))
        rows.append(
            {
                "site": site.index,
                "module": site.module,
                "cosine": worst.get("cosine"),
                "rel_l2": worst.get("rel_l2"),
                "sqnr_db": worst.get("sqnr_db"),
                "max_abs": worst.get("max_abs"),
            }
        )
    return rows
