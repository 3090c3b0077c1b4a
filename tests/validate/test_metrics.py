"""Metrics against hand-computed values: attnopt.validate.metrics and flatten/compare."""

from __future__ import annotations

import math
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch

from attnopt.validate import (
    ValidationError,
    compare_outputs,
    flatten_outputs,
    logits_metrics,
    oracle_metrics,
    tensor_metrics,
    tolerance_metrics,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_cosine_of_orthogonal_identical_and_opposite_vectors():
    assert tensor_metrics(t(1.0, 0.0), t(0.0, 1.0))["cosine"] == 0.0
    assert tensor_metrics(t(1.0, 2.0), t(1.0, 2.0))["cosine"] == pytest.approx(1.0)
    assert tensor_metrics(t(1.0, 2.0), t(-1.0, -2.0))["cosine"] == pytest.approx(-1.0)
    assert tensor_metrics(t(0.0, 0.0), t(0.0, 0.0))["cosine"] == 1.0
    assert tensor_metrics(t(0.0, 0.0), t(1.0, 0.0))["cosine"] == 0.0


def test_max_abs_and_max_rel_by_hand():
    metrics = tensor_metrics(t(1.0, -2.0, 0.5), t(1.1, -2.0, 0.25))
    assert metrics["max_abs"] == pytest.approx(0.25)
    # |diff| / |ref| = [0.1, 0, 0.5]
    assert metrics["max_rel"] == pytest.approx(0.5)
    assert metrics["numel"] == 3


def test_max_rel_floors_a_zero_reference_at_tiny_of_its_dtype():
    metrics = tensor_metrics(t(0.0, dtype=torch.float32), t(1e-3, dtype=torch.float32))
    assert metrics["max_rel"] == pytest.approx(1e-3 / torch.finfo(torch.float32).tiny, rel=1e-6)
    assert math.isfinite(metrics["max_rel"])


def test_rel_l2_and_sqnr_by_hand():
    metrics = tensor_metrics(t(3.0, 4.0), t(3.0, 4.5))
    assert metrics["rel_l2"] == pytest.approx(0.5 / 5.0)  # ||d|| / ||ref||
    assert metrics["sqnr_db"] == pytest.approx(20.0)  # 10 log10(25 / 0.25)


def test_sqnr_of_known_noise():
    reference = torch.full((100,), 2.0)  # ||ref||^2 = 400
    noise = torch.tensor([0.2, -0.2] * 50)  # ||noise||^2 = 4
    assert tensor_metrics(reference, reference + noise)["sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert tensor_metrics(reference, reference + noise / 10)["sqnr_db"] == pytest.approx(
        40.0, abs=1e-4
    )


def test_identical_tensors_have_zero_error_and_infinite_sqnr():
    values = torch.randn(4, 5, dtype=torch.float16)
    metrics = tensor_metrics(values, values.clone())
    assert metrics["max_abs"] == 0.0 and metrics["max_rel"] == 0.0 and metrics["rel_l2"] == 0.0
    assert metrics["sqnr_db"] == math.inf
    assert metrics["ref_has_nonfinite"] is False


def test_metrics_are_computed_in_float64():
    # In float32, 1 + 1e-9 == 1; in float64 the candidate's extra precision is visible.
    reference = torch.tensor([1.0], dtype=torch.float32)
    candidate = torch.tensor([1.0 + 1e-9], dtype=torch.float64)
    assert tensor_metrics(reference, candidate)["max_abs"] == pytest.approx(1e-9, rel=1e-6)


def test_nan_in_reference_is_counted_never_divided_by():
    metrics = tensor_metrics(t(1.0, math.nan, 3.0), t(1.0, math.nan, 3.0))
    assert metrics["ref_nonfinite"] == 1 and metrics["ref_has_nonfinite"] is True
    assert metrics["nonfinite_mismatch"] == 0
    assert metrics["max_abs"] == 0.0 and metrics["sqnr_db"] == math.inf
    assert not math.isnan(metrics["max_rel"])


def test_candidate_must_reproduce_reference_nonfinite_values():
    assert tensor_metrics(t(1.0, math.nan), t(1.0, 5.0))["nonfinite_mismatch"] == 1
    assert tensor_metrics(t(math.inf, 1.0), t(math.inf, 1.0))["nonfinite_mismatch"] == 0
    assert tensor_metrics(t(math.inf, 1.0), t(-math.inf, 1.0))["nonfinite_mismatch"] == 1


def test_nan_in_candidate_where_reference_is_finite_makes_errors_infinite():
    metrics = tensor_metrics(t(1.0, 2.0), t(1.0, math.nan))
    assert metrics["nonfinite_mismatch"] == 1 and metrics["cand_nonfinite"] == 1
    assert metrics["max_abs"] == math.inf and metrics["rel_l2"] == math.inf
    assert metrics["sqnr_db"] == -math.inf and math.isnan(metrics["cosine"])


def test_shape_mismatch_raises_validation_error():
    with pytest.raises(ValidationError, match=r"\(2,\) vs candidate \(3,\)"):
        tensor_metrics(torch.zeros(2), torch.zeros(3))
    assert issubclass(ValidationError, ValueError)


def test_top1_agreement_and_kl_against_hand_formula():
    ref = torch.tensor([[0.0, math.log(3.0)], [2.0, 1.0], [0.0, 1.0]])
    cand = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 0.0]])
    metrics = logits_metrics(ref, cand)
    # argmax: row 0 ref=1 cand=0 (tie -> first), row 1 agree, row 2 disagree
    assert metrics["top1_agreement"] == pytest.approx(1 / 3)
    # row 0: p = [1/4, 3/4], q = [1/2, 1/2]; row 1: 0; row 2: p = softmax([0, 1]), q = reversed
    kl_row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    e = math.e
    p = [1 / (1 + e), e / (1 + e)]
    kl_row2 = p[0] * math.log(p[0] / p[1]) + p[1] * math.log(p[1] / p[0])
    assert metrics["kl_divergence"] == pytest.approx((kl_row0 + kl_row2) / 3)
    assert metrics["positions"] == 3 and metrics["positions_skipped"] == 0


def test_logits_positions_span_leading_dims_and_allow_masked_classes():
    ref = torch.randn(2, 3, 5)
    ref[..., 4] = -math.inf  # a class masked out everywhere
    metrics = logits_metrics(ref, ref.clone())
    assert metrics["positions"] == 6
    assert metrics["top1_agreement"] == 1.0 and metrics["kl_divergence"] == pytest.approx(0.0)


def test_logits_nan_rows_in_reference_are_skipped_and_bad_candidate_rows_count():
    ref = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, 0.0]])
    cand = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [math.nan, 0.0]])
    metrics = logits_metrics(ref, cand)
    assert metrics["positions_skipped"] == 1 and metrics["positions"] == 2
    assert metrics["top1_agreement"] == pytest.approx(0.5)
    assert metrics["kl_divergence"] == math.inf


def test_tolerance_metrics_measure_error_in_units_of_allclose():
    metrics = tolerance_metrics(t(1.0, 100.0), t(1.0 + 3e-5, 100.0), atol=1e-5, rtol=1e-5)
    assert metrics["tol_ratio"] == pytest.approx(1.5)  # 3e-5 / (1e-5 + 1e-5 * 1)
    assert metrics["tol_violations"] == 1
    exact = tolerance_metrics(t(1, dtype=torch.int64), t(2, dtype=torch.int64), atol=0, rtol=0)
    assert exact["tol_ratio"] == math.inf


def test_oracle_metrics_are_rmse_against_fp64():
    metrics = oracle_metrics(t(1.1, 2.0), t(1.0, 2.2), t(1.0, 2.0))
    assert metrics["eager_fp64_rmse"] == pytest.approx(math.sqrt(0.01 / 2))
    assert metrics["candidate_fp64_rmse"] == pytest.approx(math.sqrt(0.04 / 2))
    assert metrics["fp64_error_ratio"] == pytest.approx(2.0)


@dataclass
class FakeModelOutput(OrderedDict):
    """Mimics transformers' ModelOutput: an OrderedDict of its non-None fields."""

    last_hidden_state: torch.Tensor | None = None
    attentions: tuple | None = None

    def __post_init__(self):
        for name in ("last_hidden_state", "attentions"):
            if getattr(self, name) is not None:
                self[name] = getattr(self, name)


def test_flatten_outputs_names_leaves_of_nested_outputs():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert list(flatten_outputs(a)) == ["output"]
    assert list(flatten_outputs((a, (b, c)))) == ["0", "1.0", "1.1"]
    assert list(flatten_outputs({"logits": a, "past": [b, None, c]})) == [
        "logits",
        "past.0",
        "past.2",
    ]
    model_output = FakeModelOutput(last_hidden_state=a, attentions=(b, c))
    assert list(flatten_outputs(model_output)) == [
        "last_hidden_state",
        "attentions.0",
        "attentions.1",
    ]
    Pair = namedtuple("Pair", ["values", "indices"])
    assert list(flatten_outputs(Pair(a, b))) == ["values", "indices"]
    assert flatten_outputs((a, 3))["1"].item() == 3


def test_flatten_outputs_reads_caches_and_reports_unknown_leaves():
    class Layer:
        def __init__(self):
            self.keys, self.values = torch.zeros(2), torch.ones(2)

    class Cache:
        layers = [Layer(), Layer()]

    skipped: list[str] = []
    flat = flatten_outputs({"past_key_values": Cache(), "tag": "x"}, skipped=skipped)
    assert list(flat) == [
        f"past_key_values.{i}.{kind}" for i in (0, 1) for kind in ("keys", "values")
    ]
    assert skipped == ["tag (str)"]


def test_flatten_outputs_reads_a_real_transformers_model_output():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    output = modeling_outputs.CausalLMOutput(
        logits=torch.zeros(1, 2, 3), hidden_states=(torch.zeros(1),)
    )
    assert list(flatten_outputs(output)) == ["logits", "hidden_states.0"]


def test_compare_outputs_names_differing_keys_and_shapes():
    with pytest.raises(ValidationError, match=r"missing from the candidate: \['b'\]"):
        compare_outputs({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(ValidationError, match=r"'1': reference \(2,\) vs candidate \(3,\)"):
        compare_outputs((torch.zeros(1), torch.zeros(2)), (torch.zeros(1), torch.zeros(3)))
    metrics = compare_outputs({"logits": torch.randn(2, 4)}, {"logits": torch.randn(2, 4)})
    assert "top1_agreement" in metrics["logits"]
