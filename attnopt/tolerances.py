"""Per-dtype numerical tolerances, kept in one place.

Entry points: :data:`EXACT`, :func:`exact_tolerance`, :func:`assert_close` (elementwise tables),
:func:`oracle_allowed_error` (the fp64-oracle rule of ``attnopt.validate(tolerance="exact")``),
:data:`LOSSY_BUDGETS`. "Exact" passes and kernels must match their torch reference within these;
tests and `attnopt.validate` both read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Absolute and relative tolerance for one dtype."""

    atol: float
    rtol: float


#: Exact rewrites and kernels (fp32 accumulation everywhere): the budget per input dtype.
EXACT: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}

#: Whole-model comparison of a compile with ``passes="none"`` against eager (same ops, same order).
NO_REWRITE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-12, rtol=1e-12),
    torch.float32: Tolerance(atol=1e-6, rtol=1e-6),
    torch.float16: Tolerance(atol=1e-3, rtol=1e-3),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1e-2),
}


def exact_tolerance(dtype: torch.dtype) -> Tolerance:
    """Tolerance for an exact rewrite or kernel whose inputs have ``dtype``.

    Args:
        dtype: the dtype of the inputs (integer and bool dtypes compare exactly).

    Returns:
        The :class:`Tolerance` for that dtype.
    """
    if not dtype.is_floating_point:
        return Tolerance(atol=0.0, rtol=0.0)
    return EXACT.get(dtype, EXACT[torch.float32])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, table=EXACT) -> None:
    """Assert two tensors agree within the per-dtype tolerance of ``expected``.

    Args:
        actual: the candidate tensor.
        expected: the reference tensor.
        table: the tolerance table to use (:data:`EXACT` or :data:`NO_REWRITE`).

    Raises:
        AssertionError: with the max abs difference when they disagree.
    """
    tol = table.get(expected.dtype, table[torch.float32]) if expected.is_floating_point() else None
    if tol is None:
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    else:
        torch.testing.assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol, equal_nan=True)


#: The fp64-oracle verdict of ``tolerance="exact"`` (see :func:`oracle_allowed_error`): a
#: candidate whose RMSE against a float64 run of the reference is at most this many times the
#: reference's own RMSE against it (plus a floor) is as exact as the reference. 2 is the multiplier
#: torch._dynamo's accuracy checker uses for fp32 outputs.
ORACLE_ERROR_RATIO: float = 2.0

#: The multiplier for outputs with fewer than :data:`ORACLE_SMALL_NUMEL` elements and for
#: float16/bfloat16 outputs, where the RMSE of one run is a noisy estimate (torch._dynamo uses 3
#: in the same cases).
ORACLE_ERROR_RATIO_LOOSE: float = 3.0

#: Outputs with fewer elements than this get :data:`ORACLE_ERROR_RATIO_LOOSE`.
ORACLE_SMALL_NUMEL: int = 1000

#: The floor of the fp64-oracle rule, in machine epsilons of the output dtype times the RMS of the
#: oracle output: about one rounding of every element. It decides only for outputs the reference
#: computes (almost) exactly, where twice a zero error would allow no rounding at all.
ORACLE_FLOOR_EPS: float = 1.0


def oracle_error_ratio(numel: int, dtype: torch.dtype) -> float:
    """The multiplier of the fp64-oracle rule for an output.

    Args:
        numel: the output's number of elements (over all batches compared).
        dtype: the reference output's dtype.

    Returns:
        :data:`ORACLE_ERROR_RATIO_LOOSE` for small or float16/bfloat16 outputs, else
        :data:`ORACLE_ERROR_RATIO`.
    """
    if numel < ORACLE_SMALL_NUMEL or dtype in (torch.float16, torch.bfloat16):
        return ORACLE_ERROR_RATIO_LOOSE
    return ORACLE_ERROR_RATIO


def oracle_floor(oracle_rms: float, dtype: torch.dtype) -> float:
    """The floor of the fp64-oracle rule: ``ORACLE_FLOOR_EPS * eps(dtype) * oracle_rms``.

    Args:
        oracle_rms: root mean square of the float64 oracle output.
        dtype: the reference output's (floating) dtype.

    Returns:
        The smallest RMSE the rule always allows.
    """
    return ORACLE_FLOOR_EPS * torch.finfo(dtype).eps * oracle_rms


def oracle_allowed_error(
    reference_error: float, oracle_rms: float, numel: int, dtype: torch.dtype
) -> float:
    """The largest RMSE against the fp64 oracle that the fp64-oracle rule accepts.

    ``allowed = k * reference_error + ORACLE_FLOOR_EPS * eps(dtype) * oracle_rms`` with
    ``k = oracle_error_ratio(numel, dtype)``: the candidate is exact when it is about as close to
    the float64 result as the reference model itself, whose fp32 rounding is the yardstick.

    Args:
        reference_error: RMSE of the reference (the original model in its own dtype) against
            the oracle.
        oracle_rms: root mean square of the oracle output.
        numel: the output's number of elements.
        dtype: the reference output's (floating) dtype.

    Returns:
        The allowed RMSE of the candidate (inf when the reference error is inf).
    """
    ratio = oracle_error_ratio(numel, dtype)
    return ratio * reference_error + oracle_floor(oracle_rms, dtype)


#: Named accuracy budgets for lossy rewrites (``tolerance="lossy"`` etc.), as the keyword
#: arguments of ``attnopt.validate.Budget``. Starting points, not guarantees: cosine and SQNR are
#: judged on every output, top-1 agreement on logits outputs only. For small noise
#: ``1 - cosine ~ 0.5 * 10 ** (-sqnr_db / 10)``, so each pair is roughly consistent.
LOSSY_BUDGETS: dict[str, dict[str, float]] = {
    "lossy-tight": {"cosine": 0.9999, "sqnr_db": 35.0, "top1": 0.999},
    "lossy": {"cosine": 0.999, "sqnr_db": 25.0, "top1": 0.99},
    "lossy-loose": {"cosine": 0.99, "sqnr_db": 15.0, "top1": 0.95},
}
