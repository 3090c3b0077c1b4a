"""Shared test helpers: building zoo models once per process and exactness checks."""

from __future__ import annotations

import copy
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


def _float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


def assert_matches_eager(
    model: torch.nn.Module, compiled: Any, args: tuple, kwargs: dict, *, table=EXACT
) -> None:
    """The compiled output equals eager within the per-dtype table or, when it does not, its
    root-mean-square error against a float64 run of the model is at most
    :data:`attnopt.tolerances.ORACLE_ERROR_RATIO` times eager's own (the fp64 oracle rule that
    ``attnopt.validate`` applies)."""
    from attnopt.tolerances import ORACLE_ERROR_RATIO

    with torch.no_grad():
        expected = zoo.primary_output(model(*args, **kwargs))
        actual = zoo.primary_output(compiled(*args, **kwargs))
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    tol = table[expected.dtype]
    if torch.allclose(actual, expected, atol=tol.atol, rtol=tol.rtol):
        return
    with torch.no_grad():
        oracle = zoo.primary_output(
            _float64_copy(model)(*_to64(args), **{k: _to64(v) for k, v in kwargs.items()})
        )
    # Root-mean-square error against float64, as attnopt.validate's oracle rule measures it.
    eager_err = (expected.double() - oracle).pow(2).mean().sqrt().item()
    ours_err = (actual.double() - oracle).pow(2).mean().sqrt().item()
    assert ours_err <= max(tol.atol, ORACLE_ERROR_RATIO * eager_err), (
        f"max diff vs eager {(actual - expected).abs().max().item():.3g}; error vs fp64: "
        f"attnopt rmse {ours_err:.3g}, eager rmse {eager_err:.3g}"
    )


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, tuple):
        return tuple(_to64(v) for v in x)
    return x


__all__ = ["NO_REWRITE", "assert_matches_eager", "impls", "zoo_cases", "zoo_model"]
