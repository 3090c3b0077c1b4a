"""Shared test helpers: building zoo models once per process and exactness checks."""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnopt.tolerances import EXACT, NO_REWRITE
from tests import zoo


@functools.cache
def zoo_model(name: str, impl: str | None) -> torch.nn.Module:
    """A zoo model, built once per process (tests must not mutate it)."""
    return zoo.get(name).build(impl)


def impls(name: str) -> list[str | None]:
    """Attention implementations to test for a zoo entry."""
    return ["eager", "sdpa"] if zoo.get(name).hf else [None]


def zoo_cases() -> list[tuple[str, str | None]]:
    """Every (zoo entry, implementation) pair."""
    return [(name, impl) for name in sorted(zoo.ZOO) for impl in impls(name)]


def assert_matches_eager(
    model: torch.nn.Module, compiled: Any, args: tuple, kwargs: dict, *, table=EXACT
) -> None:
    """``attnopt.validate`` judges the compiled model exact against eager.

    The per-dtype table decides first (``"exact"``, or ``"none"`` with ``table=NO_REWRITE``); an
    output outside it is still exact when its error against a float64 run of the model is no larger
    than :data:`attnopt.tolerances.ORACLE_ERROR_RATIO` times eager's own (the fp64 oracle rule).
    """
    import attnopt

    tolerance = "none" if table is NO_REWRITE else "exact"
    with torch.no_grad():
        expected = zoo.primary_output(model(*args, **kwargs))
        actual = zoo.primary_output(compiled(*args, **kwargs))
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    report = attnopt.validate(model, compiled, args, kwargs, tolerance=tolerance, sites=False)
    if not report.ok:
        report = attnopt.validate(
            model, compiled, args, kwargs, tolerance=tolerance, sites=False, oracle=True
        )
    assert report.ok, str(report)


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, tuple):
        return tuple(_to64(v) for v in x)
    return x


__all__ = ["NO_REWRITE", "assert_matches_eager", "impls", "zoo_cases", "zoo_model"]
