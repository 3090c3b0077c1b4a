"""attnopt.validate on real models: exact compiles pass with every site in tolerance; a lossy
pass shows where error enters and how it grows; JSON and PNG are written."""

from __future__ import annotations

import json

import pytest
import torch

import attnopt
from attnopt.validate import ValidationError
from tests import zoo
from tests.helpers import zoo_model


def test_minilm_exact_report_every_site_within_tolerance(tmp_path):
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(4, 24)
    cm = attnopt.compile(model, args, kwargs)
    report = attnopt.validate(model, cm, args, kwargs)  # "exact": judged by the fp64 oracle
    assert report.ok and report.oracle, report
    assert len(report.sites) == 6 and all(site.ok for site in report.sites)
    written = report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ok"] is True and len(data["sites"]) == 6
    assert any(p.suffix == ".png" for p in written)


def test_lossy_pass_shows_per_layer_error_growth(tmp_path):
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(4, 24)
    cm = attnopt.compile(
        model, args, kwargs, passes="canonicalize,fuse-attention,sliding-window{window=2}"
    )
    report = attnopt.validate(model, cm, args, kwargs, tolerance=attnopt.Budget(cosine=0.999))
    errors = [site.metrics["rel_l2"] for site in sorted(report.sites, key=lambda s: s.index)]
    assert len(errors) == 6 and errors[0] > 0
    assert errors[-1] > errors[0]  # error compounds through the layers
    assert not report.ok and report.failures
    report.save(tmp_path)
    assert (tmp_path / "report.json").exists()
    assert list(tmp_path.glob("*.png"))


def test_different_output_structures_are_rejected():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)

    class Other(torch.nn.Module):
        def forward(self, **kw):
            return (model(**kw).last_hidden_state,)

    with pytest.raises(ValidationError):
        attnopt.validate(model, Other(), args, kwargs, sites=False)


def test_inputs_the_reference_cannot_take():
    model = zoo_model("bert", "eager")
    with pytest.raises(ValidationError, match="cannot take these inputs"):
        attnopt.validate(model, model, (), {"input_ids": torch.zeros(2, 3, 4, 5)}, sites=False)


def test_nan_in_reference_is_reported_not_divided_by():
    class Nan(torch.nn.Module):
        def forward(self, x):
            return x / 0.0 * 0.0

    report = attnopt.validate(Nan(), Nan(), (torch.randn(4),), sites=False)
    assert report.warnings and "non-finite" in " ".join(report.warnings)
