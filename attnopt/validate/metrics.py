"""Per-tensor numerics metrics, all computed in float64.

Entry points: :func:`tensor_metrics`, :func:`logits_metrics`, :func:`tolerance_metrics`,
:func:`oracle_metrics`. Each returns a flat ``dict[str, float | int | bool]`` so a report can
merge, print and serialise them without knowing where they came from; :func:`format_metric` is
one value's text, as reports and budget checks print it.

Non-finite values. Positions where the reference is NaN or +-inf are never divided by: they are
counted (``ref_nonfinite``, flag ``ref_has_nonfinite``) and the candidate must reproduce them
exactly (NaN for NaN, the same signed inf for inf); every position where reference and candidate
disagree about being non-finite counts in ``nonfinite_mismatch``. The error metrics are computed
over the positions where the reference is finite. If the candidate is non-finite at one of those,
the error metrics say so: ``max_abs``, ``max_rel`` and ``rel_l2`` are inf, ``sqnr_db`` is -inf and
``cosine`` is NaN (so any ``>=`` budget check fails).
"""

from __future__ import annotations

import math

import torch

from attnopt.validate.errors import ValidationError

MetricValue = float | int | bool
MetricDict = dict[str, MetricValue]


def _check_shapes(reference: torch.Tensor, candidate: torch.Tensor, what: str = "tensor") -> None:
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        raise ValidationError(
            f"{what}: expected two tensors, got {type(reference).__name__} and "
            f"{type(candidate).__name__}"
        )
    if reference.shape != candidate.shape:
        raise ValidationError(
            f"{what}: shape mismatch, reference {tuple(reference.shape)} vs candidate "
            f"{tuple(candidate.shape)}"
        )


def _as_float64(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.to(device=device or tensor.device, dtype=torch.float64)


def _tiny(dtype: torch.dtype) -> float:
    """Smallest normal magnitude of ``dtype``: the floor of ``|ref|`` in ``max_rel``."""
    if dtype.is_floating_point:
        return torch.finfo(dtype).tiny
    if dtype.is_complex:
        return torch.finfo(torch.empty((), dtype=dtype).real.dtype).tiny
    return 1.0  # integers and bools: the smallest nonzero magnitude


def _nonfinite_counts(ref: torch.Tensor, cand: torch.Tensor) -> MetricDict:
    ref_finite = torch.isfinite(ref)
    cand_finite = torch.isfinite(cand)
    both_nan = torch.isnan(ref) & torch.isnan(cand)
    same_inf = torch.isinf(ref) & (ref == cand)
    mismatch = (~ref_finite | ~cand_finite) & ~(both_nan | same_inf)
    ref_nonfinite = int((~ref_finite).sum().item())
    return {
        "ref_nonfinite": ref_nonfinite,
        "ref_has_nonfinite": ref_nonfinite > 0,
        "cand_nonfinite": int((~cand_finite).sum().item()),
        "nonfinite_mismatch": int(mismatch.sum().item()),
    }


def _error_metrics(ref: torch.Tensor, cand: torch.Tensor, tiny: float) -> MetricDict:
    """Error metrics over 1-D float64 ``ref`` (all finite) and ``cand`` of the same length."""
    if ref.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "rel_l2": 0.0, "cosine": 1.0, "sqnr_db": math.inf}
    if not bool(torch.isfinite(cand).all()):
        return {
            "max_abs": math.inf,
            "max_rel": math.inf,
            "rel_l2": math.inf,
            "cosine": math.nan,
            "sqnr_db": -math.inf,
        }
    diff = cand - ref
    abs_diff = diff.abs()
    ref_norm = float(torch.linalg.vector_norm(ref))
    cand_norm = float(torch.linalg.vector_norm(cand))
    diff_norm = float(torch.linalg.vector_norm(diff))
    return {
        "max_abs": float(abs_diff.max()),
        "max_rel": float((abs_diff / ref.abs().clamp_min(tiny)).max()),
        "rel_l2": _safe_ratio(diff_norm, ref_norm),
        "cosine": _cosine(ref, cand, ref_norm, cand_norm),
        "sqnr_db": _sqnr_db(ref_norm, diff_norm),
    }


def _safe_ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def _cosine(ref: torch.Tensor, cand: torch.Tensor, ref_norm: float, cand_norm: float) -> float:
    if ref_norm == 0 and cand_norm == 0:
        return 1.0  # two zero vectors: identical
    if ref_norm == 0 or cand_norm == 0:
        return 0.0  # one zero vector: no direction in common
    # Normalise before the dot product so huge values cannot overflow.
    dot = torch.dot(ref / ref_norm, cand / cand_norm)
    return float(dot.clamp(-1.0, 1.0))


def _sqnr_db(ref_norm: float, diff_norm: float) -> float:
    if diff_norm == 0:
        return math.inf
    if ref_norm == 0:
        return -math.inf
    # 10 log10(|ref|^2 / |diff|^2), written with norms so nothing is squared.
    return 20.0 * math.log10(ref_norm / diff_norm)


def tensor_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> MetricDict:
    """Error of ``candidate`` against ``reference``, elementwise and as vectors, in float64.

    Metrics (over the positions where the reference is finite):

    - ``max_abs``: ``max |cand - ref|``.
    - ``max_rel``: ``max |cand - ref| / max(|ref|, tiny)`` elementwise, ``tiny`` being the
      smallest normal number of the reference dtype (1 for integer dtypes), so a zero reference
      is never divided by and a tiny error next to a zero shows up as a large relative error.
    - ``rel_l2``: ``||cand - ref||_2 / ||ref||_2`` (0 when both are zero, inf when only ref is).
    - ``cosine``: ``<ref, cand> / (||ref|| ||cand||)``; 1 for two zero vectors, 0 for one.
    - ``sqnr_db``: ``10 log10(||ref||^2 / ||ref - cand||^2)``; inf when identical.

    Plus ``numel`` and the non-finite counts described in the module docstring.

    Args:
        reference: the reference tensor (any dtype; complex is compared as real pairs).
        candidate: the candidate tensor, same shape (its dtype and device may differ).

    Returns:
        A flat metric dict.

    Raises:
        ValidationError: when the shapes differ or an argument is not a tensor.
    """
    _check_shapes(reference, candidate)
    ref = _as_float64(reference)
    cand = _as_float64(candidate, device=ref.device)
    metrics: MetricDict = {"numel": reference.numel()}
    metrics.update(_nonfinite_counts(ref, cand))
    ref_finite = torch.isfinite(ref)
    metrics.update(_error_metrics(ref[ref_finite], cand[ref_finite], _tiny(reference.dtype)))
    return metrics


def _valid_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows that softmax turns into a distribution: no NaN, no +inf, one finite value at least."""
    return (
        ~torch.isnan(rows).any(dim=1)
        & ~(rows == math.inf).any(dim=1)
        & torch.isfinite(rows).any(dim=1)
    )


def logits_metrics(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> MetricDict:
    """:func:`tensor_metrics` plus distribution metrics over the last (class) dimension.

    Every index of the leading dimensions is a position (e.g. ``[batch, seq, vocab]`` has
    ``batch * seq`` positions). Added metrics:

    - ``top1_agreement``: fraction of positions where ``argmax`` of both agrees.
    - ``kl_divergence``: ``KL(softmax(ref) || softmax(cand))`` in nats, mean over positions;
      ``-inf`` logits are allowed (masked classes; ``0 log 0 = 0``).
    - ``positions`` and ``positions_skipped``: positions whose reference row is not a
      distribution (a NaN or +inf, or all -inf) are skipped and counted, never divided by.

    A candidate row that is not a distribution counts as a disagreement with infinite KL. With no
    valid position, ``top1_agreement`` and ``kl_divergence`` are NaN.

    Args:
        ref_logits: reference logits, at least 1-D.
        cand_logits: candidate logits of the same shape.

    Returns:
        A flat metric dict.

    Raises:
        ValidationError: when the shapes differ or the logits are 0-D.
    """
    metrics = tensor_metrics(ref_logits, cand_logits)
    if ref_logits.ndim == 0:
        raise ValidationError("logits: need a class dimension, got a 0-d tensor")
    num_classes = ref_logits.shape[-1]
    ref_rows = _as_float64(ref_logits).reshape(-1, num_classes)
    cand_rows = _as_float64(cand_logits, device=ref_rows.device).reshape(-1, num_classes)
    ref_ok = _valid_rows(ref_rows)
    ref_rows, cand_rows = ref_rows[ref_ok], cand_rows[ref_ok]
    cand_ok = _valid_rows(cand_rows)
    positions = int(ref_rows.shape[0])
    metrics["positions"] = positions
    metrics["positions_skipped"] = int((~ref_ok).sum().item())
    if positions == 0 or num_classes == 0:
        metrics["top1_agreement"] = math.nan
        metrics["kl_divergence"] = math.nan
        return metrics
    agree = (ref_rows.argmax(dim=1) == cand_rows.argmax(dim=1)) & cand_ok
    log_p = torch.log_softmax(ref_rows, dim=1)
    log_q = torch.log_softmax(cand_rows, dim=1)
    prob = log_p.exp()
    terms = torch.where(prob > 0, prob * (log_p - log_q), torch.zeros_like(prob))
    row_kl = terms.sum(dim=1).clamp_min(0.0)  # rounding can make a ~0 KL slightly negative
    row_kl = torch.where(cand_ok, row_kl, torch.full_like(row_kl, math.inf))
    metrics["top1_agreement"] = float(agree.double().mean())
    metrics["kl_divergence"] = float(row_kl.mean())
    return metrics


def tolerance_metrics(
    reference: torch.Tensor, candidate: torch.Tensor, *, atol: float, rtol: float
) -> MetricDict:
    """How far ``candidate`` is from ``reference`` in units of an ``allclose`` tolerance.

    Over the positions where the reference is finite, the allowed error is
    ``atol + rtol * |ref|`` (as in ``torch.allclose``).

    Args:
        reference: the reference tensor.
        candidate: the candidate tensor, same shape.
        atol: absolute tolerance.
        rtol: relative tolerance.

    Returns:
        ``tol_ratio`` (worst ``|cand - ref| / allowed``; <= 1 means within tolerance; inf where
        the allowance is zero but the error is not, or the candidate is non-finite),
        ``tol_violations`` (positions with ratio > 1), and the ``atol``/``rtol`` used.

    Raises:
        ValidationError: when the shapes differ.
    """
    _check_shapes(reference, candidate)
    ref = _as_float64(reference)
    cand = _as_float64(candidate, device=ref.device)
    finite = torch.isfinite(ref)
    ref, cand = ref[finite], cand[finite]
    abs_diff = (cand - ref).abs()
    allowed = atol + rtol * ref.abs()
    ratio = torch.where(
        allowed > 0,
        abs_diff / allowed.clamp_min(torch.finfo(torch.float64).tiny),
        torch.where(abs_diff == 0, 0.0, math.inf),
    )
    # A NaN candidate is infinitely far (and nan_to_num must not clip inf to the max float).
    ratio = torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)
    return {
        "tol_ratio": float(ratio.max()) if ratio.numel() else 0.0,
        "tol_violations": int((ratio > 1.0).sum().item()),
        "atol": float(atol),
        "rtol": float(rtol),
    }


def _rmse(values: torch.Tensor, target: torch.Tensor) -> float:
    if values.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(values).all()):
        return math.inf
    return float(torch.linalg.vector_norm(values - target)) / math.sqrt(values.numel())


def oracle_metrics(
    reference: torch.Tensor, candidate: torch.Tensor, oracle: torch.Tensor
) -> MetricDict:
    """Errors of the reference and of the candidate against a float64 oracle.

    Both are root-mean-square errors over the positions where the oracle and the reference are
    finite (where the reference is not, the candidate must reproduce it: ``nonfinite_mismatch``
    of :func:`tensor_metrics`); a non-finite candidate value at such a position makes its error
    inf.

    Args:
        reference: the reference (original model's) output, in the model's dtype.
        candidate: the candidate output.
        oracle: the same output computed by a float64 copy of the reference.

    Returns:
        ``eager_fp64_rmse`` (the reference's error), ``candidate_fp64_rmse``,
        ``fp64_error_ratio`` (candidate over reference; 1 when both are zero, inf when only the
        reference's is) and ``fp64_rms`` (root mean square of the oracle over those positions).

    Raises:
        ValidationError: when the shapes differ.
    """
    _check_shapes(reference, candidate)
    _check_shapes(reference, oracle, what="oracle")
    target = _as_float64(oracle)
    ref = _as_float64(reference, device=target.device)
    finite = torch.isfinite(target) & torch.isfinite(ref)
    target = target[finite]
    eager_err = _rmse(ref[finite], target)
    cand_err = _rmse(_as_float64(candidate, device=target.device)[finite], target)
    ratio = 1.0 if eager_err == 0 and cand_err == 0 else _safe_ratio(cand_err, eager_err)
    rms = float(torch.linalg.vector_norm(target)) / math.sqrt(max(target.numel(), 1))
    return {
        "eager_fp64_rmse": eager_err,
        "candidate_fp64_rmse": cand_err,
        "fp64_error_ratio": ratio,
        "fp64_rms": rms,
    }


def format_metric(key: str, value: float | int | bool) -> str:
    """Short text for one metric value, as the report tables print it.

    Args:
        key: the metric name (chooses the format).
        value: its value.

    Returns:
        e.g. ``"3.1e-06"``, ``"1-2.0e-09"`` (a cosine just below 1), ``"inf"``.
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if key in ("cosine", "top1_agreement"):
        if value == 1.0:
            return "1"
        if 0.999999 <= value < 1.0:
            return f"1-{1.0 - value:.1e}"
        return f"{value:.6f}"
    if key in ("sqnr_db", "tol_ratio", "fp64_error_ratio", "fp64_ratio_limit"):
        return f"{value:.1f}" if key == "sqnr_db" else f"{value:.3g}"
    return "0" if value == 0 else f"{value:.2e}"
