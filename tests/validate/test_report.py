"""Budgets, tolerance presets, NumericsReport, plots and run_and_compare."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from attnopt.tolerances import ORACLE_ERROR_RATIO
from attnopt.validate import (
    Budget,
    NumericsReport,
    ValidationError,
    build_report,
    plot_attention_map,
    resolve_tolerance,
    run_and_compare,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"cosine": 0.0}, ValueError, "cosine"),
        ({"cosine": 1.5}, ValueError, "cosine"),
        ({"cosine": "0.9"}, TypeError, "cosine"),
        ({"top1": True}, TypeError, "top1"),
        ({"top1": 0.0}, ValueError, "top1"),
        ({"max_abs": -1.0}, ValueError, "max_abs"),
        ({"rel_l2": math.nan}, ValueError, "rel_l2"),
        ({"sqnr_db": math.inf}, ValueError, "sqnr_db"),
    ],
)
def test_budget_validation_names_the_field(kwargs, error, field):
    with pytest.raises(error, match=rf"Budget\.{field}"):
        Budget(**kwargs)


def test_budget_is_frozen_needs_a_limit_and_accepts_edges():
    budget = Budget(cosine=1, max_abs=0)
    assert budget.cosine == 1.0 and isinstance(budget.cosine, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.cosine = 0.5
    with pytest.raises(ValueError, match="at least one limit"):
        Budget()


def test_tolerance_presets_resolve_and_unknown_names_fail():
    assert resolve_tolerance("exact").table is not None
    assert resolve_tolerance("none").table is resolve_tolerance("no-rewrite").table
    assert resolve_tolerance("lossy").budget == Budget(cosine=0.999, sqnr_db=25.0, top1=0.99)
    with pytest.raises(ValueError, match="'exact'"):
        resolve_tolerance("exactly")
    with pytest.raises(TypeError):
        resolve_tolerance(0.1)


def perturbed(values: torch.Tensor, scale: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return values + scale * torch.randn(values.shape, generator=generator, dtype=values.dtype)


def test_report_ok_for_identical_outputs_and_not_ok_beyond_exact_tolerance():
    outputs = {"last_hidden_state": torch.randn(2, 4, 8)}
    assert build_report(outputs, copy.deepcopy(outputs)).ok
    noisy = {"last_hidden_state": perturbed(outputs["last_hidden_state"], 1e-3)}
    report = build_report(outputs, noisy, tolerance="exact")
    assert not report.ok
    assert "last_hidden_state" in report.failures[0] and "exact tolerance" in report.failures[0]
    assert build_report(outputs, noisy, tolerance=Budget(cosine=0.999)).ok
    assert not build_report(outputs, noisy, tolerance=Budget(sqnr_db=80.0)).ok


def test_top1_budget_applies_to_logits_only():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    flipped = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    budget = Budget(top1=0.9)
    report = build_report({"logits": logits}, {"logits": flipped}, tolerance=budget)
    assert report.logits == ["logits"] and not report.ok
    assert "top1_agreement 0.500000 < 0.9" in report.failures[0]
    assert build_report({"hidden": logits}, {"hidden": flipped}, tolerance=budget).ok


def test_nan_in_reference_is_reported_not_raised():
    reference = torch.tensor([1.0, math.nan, 2.0])
    report = build_report((reference,), (reference.clone(),))
    assert report.ok
    assert report.metrics["0"]["ref_has_nonfinite"] is True
    assert any("non-finite" in warning for warning in report.warnings)
    broken = build_report((reference,), (torch.tensor([1.0, 0.0, 2.0]),))
    assert not broken.ok and "NaN/inf differ" in broken.failures[0]


def test_build_report_rejects_mismatched_structures():
    with pytest.raises(ValidationError, match=r"only in the candidate: \['extra'\]"):
        build_report({"a": torch.zeros(1)}, {"a": torch.zeros(1), "extra": torch.zeros(1)})
    with pytest.raises(ValidationError, match="fp64 oracle"):
        build_report((torch.zeros(2),), (torch.zeros(2),), oracle_outputs=(torch.zeros(3),))


def test_fp64_oracle_accepts_a_candidate_about_as_close_to_fp64_as_eager():
    truth = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    eager = perturbed(truth, 1e-2, seed=1).float()  # eager itself is far from fp64
    close = perturbed(truth, 1.2e-2, seed=2).float()  # about as far: exact in the fp64 sense
    far = perturbed(truth, 1e-2 * ORACLE_ERROR_RATIO * 2, seed=3).float()
    assert not build_report((eager,), (close,)).ok  # without the oracle: too far from eager
    report = build_report((eager,), (close,), oracle_outputs=(truth,))
    assert report.ok and report.oracle
    assert report.metrics["0"]["eager_fp64_rmse"] == pytest.approx(1e-2, rel=0.1)
    assert report.metrics["0"]["tol_ratio"] > 1
    rejected = build_report((eager,), (far,), oracle_outputs=(truth,))
    assert not rejected.ok and "vs fp64" in rejected.failures[0]


def make_sites(count: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    base = torch.randn(2, 4, 6, 6)
    return {
        f"site {index} (encoder.layer.{index}.attention)": (base, perturbed(base, index * 1e-4))
        for index in range(count)
    }


def test_report_sites_are_judged_individually():
    outputs = (torch.ones(3),)
    report = build_report(outputs, outputs, site_pairs=make_sites())
    assert [site.index for site in report.sites] == [0, 1, 2, 3]
    assert report.sites[0].ok and not report.sites[1].ok
    assert report.ok and report.first_failing_site is report.sites[1]
    strict = build_report(outputs, outputs, site_pairs=make_sites(), judge_sites=True)
    assert not strict.ok and "encoder.layer.1.attention" in strict.failures[0]


def test_to_json_round_trips_through_json_loads():
    outputs = {"logits": torch.randn(2, 3, 5)}
    report = build_report(outputs, copy.deepcopy(outputs), site_pairs=make_sites(2))
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["tolerance"] == "exact"
    assert data["metrics"]["logits"]["sqnr_db"] == "inf"
    assert float(data["metrics"]["logits"]["sqnr_db"]) == math.inf
    assert data["metrics"]["logits"]["top1_agreement"] == 1.0
    assert data["sites"][1]["name"] == "site 1 (encoder.layer.1.attention)"
    assert isinstance(data["sites"][1]["ok"], bool)


def test_str_renders_readable_tables():
    outputs = {"logits": torch.randn(2, 5)}
    noisy = {"logits": perturbed(outputs["logits"], 0.1)}
    text = str(build_report(outputs, noisy, site_pairs=make_sites(2)))
    assert text.startswith("attnopt numerics: FAILED (tolerance exact)")
    for expected in (
        "outputs",
        "max_abs",
        "cosine",
        "sqnr dB",
        "top1",
        "logits",
        "attention sites",
    ):
        assert expected in text
    assert "site 1 (encoder.layer.1.attention)" in text and "failures:" in text
    assert "OK" in str(build_report(outputs, copy.deepcopy(outputs))).splitlines()[0]


def test_save_writes_json_text_and_error_per_layer_png(tmp_path):
    report = build_report((torch.ones(3),), (torch.ones(3),), site_pairs=make_sites())
    written = report.save(tmp_path / "out")
    names = {path.name for path in written}
    assert {"report.json", "report.txt", "error_per_layer.png"} <= names
    assert json.loads((tmp_path / "out" / "report.json").read_text())["ok"] is True
    assert (tmp_path / "out" / "error_per_layer.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_attention_map_writes_two_heatmaps(tmp_path):
    before = torch.softmax(torch.randn(2, 4, 8, 8), dim=-1)
    after = before * torch.tril(torch.ones(8, 8))
    path = plot_attention_map(before, after, tmp_path / "site0.png", title="site 0")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="differ in shape"):
        plot_attention_map(before, after[..., :4], tmp_path / "bad.png")


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, *, scale: float = 1.0):
        hidden = torch.tanh(self.proj(x)) * scale
        return {"last_hidden_state": hidden, "logits": self.head(hidden)}


def test_run_and_compare_identical_modules_is_ok():
    reference = TinyBlock().eval()
    report = run_and_compare(reference, copy.deepcopy(reference), (torch.randn(2, 3, 8),))
    assert isinstance(report, NumericsReport) and report.ok
    assert report.logits == ["logits"] and report.warnings == []


def test_run_and_compare_perturbed_module_fails_a_cosine_budget():
    reference = TinyBlock().eval()
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.proj.weight.add_(0.2 * torch.randn_like(candidate.proj.weight))
    report = run_and_compare(
        reference, candidate, (torch.randn(2, 3, 8),), tolerance=Budget(cosine=0.9999)
    )
    assert not report.ok and any("cosine" in failure for failure in report.failures)


def test_run_and_compare_aggregates_batches_of_different_lengths():
    reference = TinyBlock().eval()
    inputs = [((torch.randn(1, 3, 8),), None), ((torch.randn(2, 5, 8),), {"scale": 0.5})]
    report = run_and_compare(reference, copy.deepcopy(reference), inputs=inputs)
    assert report.ok and report.batches == 2
    assert report.metrics["logits"]["positions"] == 3 + 10
    assert report.metrics["last_hidden_state"]["numel"] == (3 + 10) * 8


def test_run_and_compare_bad_inputs_raise_validation_error():
    reference = TinyBlock().eval()
    with pytest.raises(ValidationError, match="the reference model cannot take these inputs"):
        run_and_compare(reference, reference, (torch.randn(2, 3, 7),))
    with pytest.raises(ValidationError, match="not both"):
        run_and_compare(reference, reference, (torch.randn(1, 8),), inputs=[])
    with pytest.raises(ValidationError, match="empty"):
        run_and_compare(reference, reference, inputs=[])


def test_run_and_compare_oracle_runs_a_float64_copy():
    reference = TinyBlock().eval()
    x = torch.randn(2, 3, 8)
    report = run_and_compare(reference, copy.deepcopy(reference), (x,), oracle=True)
    assert report.ok and report.oracle
    assert 0 < report.metrics["logits"]["eager_fp64_rmse"] < 1e-5
    assert reference.proj.weight.dtype == torch.float32  # the copy was converted, not the model

    def float32_only(tensor):
        if tensor.dtype == torch.float64:
            raise RuntimeError("no fp64 here")
        return tensor * 2

    fallback = run_and_compare(float32_only, float32_only, (x,), oracle=True)
    assert fallback.ok and not fallback.oracle
    assert "fp64 oracle could not run" in fallback.warnings[0]


def test_run_and_compare_reports_nan_and_training_mode():
    report = run_and_compare(torch.log, torch.log, (torch.tensor([-1.0, 1.0]),))
    assert report.ok and report.metrics["output"]["ref_nonfinite"] == 1
    training = TinyBlock()
    report = run_and_compare(training, copy.deepcopy(training), (torch.randn(1, 8),))
    assert "training mode" in report.warnings[0]
