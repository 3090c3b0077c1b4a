"""Per-dtype numerical tolerances, kept in one place.

Entry points: :data:`EXACT`, :func:`exact_tolerance`, :func:`assert_close`.
"Exact" passes and kernels must match their torch reference within these; tests and
`attnopt.validate` both read them from here.
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


#: fp64-oracle judgement of "exact" (see ``attnopt.validate``): a candidate whose error against a
#: float64 run of the reference is at most this many times eager's own error is as exact as eager.
#: 2 is what torch._dynamo's accuracy checker uses; the extra 0.1 absorbs the noise of estimating
#: both errors from one batch.
ORACLE_ERROR_RATIO: float = 2.1

#: Named accuracy budgets for lossy rewrites (``tolerance="lossy"`` etc.), as the keyword
#: arguments of ``attnopt.validate.Budget``. Starting points, not guarantees: cosine and SQNR are
#: judged on every output, top-1 agreement on logits outputs only. For small noise
#: ``1 - cosine ~ 0.5 * 10 ** (-sqnr_db / 10)``, so each pair is roughly consistent.
LOSSY_BUDGETS: dict[str, dict[str, float]] = {
    "lossy-tight": {"cosine": 0.9999, "sqnr_db": 35.0, "top1": 0.999},
    "lossy": {"cosine": 0.999, "sqnr_db": 25.0, "top1": 0.99},
    "lossy-loose": {"cosine": 0.99, "sqnr_db": 15.0, "top1": 0.95},
}
