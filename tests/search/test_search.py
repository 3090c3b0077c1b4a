"""The budgeted search: it finds a plan within the budget on the user's data, the plan replays
without calibration, and every bad input gets a typed error."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import attnopt
from attnopt import zoo
from attnopt.errors import CalibrationError, PipelineError, PlanError
from attnopt.search import EXACT_PIPELINE, SearchPoint, SearchReport, search
from attnopt.search.space import search_space
from attnopt.zoo import primary_output
from tests.helpers import zoo_model


def _bert():
    return zoo_model("bert", "sdpa").eval()


def _padded_batches(count: int, batch: int = 4, seq: int = 32, seed: int = 0):
    """Batches with real lengths spread over the sequence, like padded text."""
    entry = zoo.get("bert")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        _, kwargs = entry.example(batch, seq)
        kwargs = dict(kwargs)
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
        kwargs["attention_mask"] = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        batches.append(kwargs)
    return batches


def _params(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_search_keeps_the_budget_and_its_plan_replays_without_calibration(tmp_path):
    model = _bert()
    before = _params(model)
    calibration, validation = _padded_batches(2), _padded_batches(2, seed=1)
    budget = attnopt.Budget(cosine=0.99)
    cm, report = search(
        model,
        None,
        calibration,
        budget,
        validation=validation,
        families=["remove-padding", "token-merge"],
        max_seconds=120,
        progress=False,
    )
    # The chosen plan met the budget where it was measured, and on held-out data.
    assert report.chosen.ok and report.chosen.metrics["cosine"] >= 0.99
    assert report.validation is not None and report.validation["ok"]
    assert report.validation["metrics"]["cosine"] >= 0.99
    # Padding removal (exact) was tried; the chosen plan is the exact one or measured faster.
    assert any(point.label.startswith("remove-padding") for point in report.points)
    exact = report.points[0]
    assert report.chosen is exact or report.chosen.seconds < exact.seconds
    assert cm.plan.pipeline == report.chosen.pipeline
    assert cm.search_report is report
    assert len(report.points) >= 3 and report.points[0].label == "exact"
    # Every point within budget really is, and failing ones say why.
    for point in report.points:
        if point.ok:
            assert point.metrics["cosine"] >= 0.99
        else:
            assert point.failures
    # The search left the model as it was.
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    # The plan reapplies with no calibration and gives identical outputs.
    path = cm.plan.save(tmp_path / "plan.json")
    again = attnopt.compile(model, (), validation[0], plan=path)
    with torch.no_grad():
        for batch in validation:
            assert torch.equal(primary_output(again(**batch)), primary_output(cm(**batch)))
    # The report saves as JSON (Pareto front included) and plots.
    data = json.loads(report.save(tmp_path / "search.json").read_text())
    assert data["chosen"]["pipeline"] == cm.plan.pipeline
    assert data["pareto"] and all(isinstance(p, str) for p in data["pareto"])
    assert report.plot(tmp_path / "search.png").stat().st_size > 1000
    assert "budgeted search" in str(report)


def test_compile_with_a_budget_runs_the_search():
    model = _bert()
    calibration = _padded_batches(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = attnopt.compile(
            model,
            calibration=calibration,
            budget=attnopt.Budget(cosine=0.999),
            max_seconds=60,
            progress=False,
        )
    assert isinstance(cm.search_report, SearchReport)
    assert cm.plan.pipeline == cm.search_report.chosen.pipeline
    with torch.no_grad():
        got = primary_output(cm(**calibration[0]))
        want = primary_output(model(**calibration[0]))
    real = calibration[0]["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(got[real].flatten(), want[real].flatten(), 0)
    assert cosine >= 0.999


def _never(reference, candidate):
    return 0.0


def test_a_budget_no_plan_meets_falls_back_to_exact_with_a_warning():
    model = _bert()
    calibration = _padded_batches(1)
    budget = attnopt.Budget(metric=_never, metric_min=1.0)
    with pytest.warns(UserWarning, match="no plan meets the budget"):
        cm, report = search(model, None, calibration, budget, progress=False)
    assert cm.plan.pipeline == EXACT_PIPELINE
    assert not report.chosen.ok and "metric:_never" in report.chosen.failures[0]
    assert len(report.points) == 1  # nothing else is tried
    with torch.no_grad():
        torch.testing.assert_close(
            primary_output(cm(**calibration[0])), primary_output(model(**calibration[0]))
        )
    with pytest.raises(PlanError, match="no plan meets the budget"):
        search(model, None, calibration, budget, progress=False, strict=True)


def test_max_seconds_stops_the_search_with_the_best_plan_so_far():
    model = _bert()
    with pytest.warns(UserWarning, match="stopped at max_seconds"):
        cm, report = search(
            model,
            None,
            _padded_batches(1),
            attnopt.Budget(cosine=0.9),
            max_seconds=0.01,
            progress=False,
        )
    assert report.cut_short and cm.plan.pipeline == EXACT_PIPELINE


@pytest.mark.parametrize(
    "calibration, match",
    [
        (None, "needs calibration"),
        ([], "calibration is empty"),
        ({"input_ids": torch.ones(1, 4, dtype=torch.long)}, "not one dict"),
        (42, "must be an iterable"),
        ([("not args", {})], "calibration batch 0"),
    ],
)
def test_bad_calibration_gets_a_typed_error(calibration, match):
    with pytest.raises(CalibrationError, match=match):
        search(_bert(), None, calibration, attnopt.Budget(cosine=0.9), progress=False)


def test_calibration_batches_of_another_structure_or_shape_are_named():
    model = _bert()
    first = _padded_batches(1)[0]
    other = {"input_ids": first["input_ids"]}
    with pytest.raises(CalibrationError, match="batch 1 has inputs"):
        search(model, None, [first, other], attnopt.Budget(cosine=0.9), progress=False)
    wrong = {"input_ids": torch.ones(2, 3, 4, dtype=torch.long)}
    with pytest.raises(CalibrationError, match="cannot run calibration batch 0"):
        search(model, None, [wrong], attnopt.Budget(cosine=0.9), progress=False)


def _raises(reference, candidate):
    raise KeyError("pooler")


def _nan(reference, candidate):
    return math.nan


@pytest.mark.parametrize("metric, match", [(_raises, "raised on batch 0"), (_nan, "returned nan")])
def test_a_metric_that_raises_or_returns_nan_is_named(metric, match):
    budget = attnopt.Budget(metric=metric, metric_min=0.5)
    with pytest.raises(attnopt.ValidationError, match=match) as info:
        search(_bert(), None, _padded_batches(1), budget, progress=False)
    assert metric.__name__ in str(info.value)


def test_passes_auto_needs_a_budget_and_a_budget_needs_the_search_or_a_warning():
    model = _bert()
    batch = _padded_batches(1)[0]
    with pytest.raises(PipelineError, match="budget="):
        attnopt.compile(model, (), batch, passes="auto")
    with pytest.warns(UserWarning, match="not searched with"):
        attnopt.compile(model, (), batch, passes="exact", budget=attnopt.Budget(cosine=0.9))
    with pytest.raises(TypeError, match="attnopt.Budget"):
        attnopt.compile(model, calibration=[batch], budget={"cosine": 0.9})


def _mean_pooled_cosine(reference, candidate, inputs):
    mask = inputs[1]["attention_mask"].unsqueeze(-1).float()
    ref = (primary_output(reference) * mask).sum(1) / mask.sum(1)
    cand = (primary_output(candidate) * mask).sum(1) / mask.sum(1)
    return float(torch.nn.functional.cosine_similarity(ref, cand, dim=-1).min())


def test_a_user_metric_is_measured_by_validate_and_judged():
    model = _bert()
    batch = _padded_batches(1)[0]
    cm = attnopt.compile(model, (), batch, passes="exact")
    ok = attnopt.validate(
        model,
        cm,
        (),
        batch,
        tolerance=attnopt.Budget(metric=_mean_pooled_cosine, metric_min=0.999),
        sites=False,
    )
    assert ok.ok, ok
    assert ok.metrics["metric:_mean_pooled_cosine"]["value"] > 0.999
    failing = attnopt.validate(
        model,
        cm,
        (),
        batch,
        tolerance=attnopt.Budget(metric=_mean_pooled_cosine, metric_max=0.5),
        sites=False,
    )
    assert not failing.ok and "metric:_mean_pooled_cosine" in failing.failures[0]


def test_budget_metric_options_are_checked():
    with pytest.raises(ValueError, match="exactly one of metric_min"):
        attnopt.Budget(metric=_never)
    with pytest.raises(ValueError, match="needs metric="):
        attnopt.Budget(metric_min=0.5)
    with pytest.raises(TypeError, match="callable"):
        attnopt.Budget(metric="cosine", metric_min=0.5)


def _point(label, seconds, cosine, ok=True):
    return SearchPoint(label, label, "alone", seconds, metrics={"cosine": cosine}, ok=ok)


def test_the_pareto_front_keeps_only_undominated_points():
    points = [
        _point("exact", 10.0, 1.0),
        _point("a", 5.0, 0.99),
        _point("b", 6.0, 0.98),  # slower and worse than a
        _point("c", 3.0, 0.95, ok=False),
        _point("broken", math.inf, 0.0, ok=False),
    ]
    report = SearchReport("cosine>=0.98", points, points[1], 20.0, 1)
    assert [p.label for p in report.pareto()] == ["c", "a", "exact"]
    assert report.to_dict()["points"][-1]["seconds"] == "inf"


class _Site:
    def __init__(self, layer, causal=False, kv_len=64, heads=4, mask=True):
        self.layer, self.kind, self.causal, self.mask_causal = layer, "self", causal, False
        self.kv_len, self.num_heads, self.has_mask = kv_len, heads, mask


def test_the_space_follows_what_the_model_is():
    encoder = [_Site(i) for i in range(6)]
    space = search_space(encoder, {}, has_padding=True)
    kinds = {f.kind for f in space.families}
    assert {"remove-padding", "token-merge", "token-prune", "head-prune"} <= kinds
    assert "sliding-window" in space.skipped and "precision" in space.skipped
    long = search_space([_Site(i, kv_len="s1") for i in range(6)], {"s1": 1024})
    assert {"sliding-window", "block-sparse", "linearize"} <= {f.kind for f in long.families}
    vision = search_space([_Site(i, kv_len=197) for i in range(12)], {})  # 14 x 14 + class
    assert "neighborhood" in {f.kind for f in vision.families}
    assert "neighborhood" in space.skipped  # 64 tokens: an 8 x 8 grid is too small
    decoder = search_space([_Site(i, causal=True) for i in range(6)], {})
    assert "token-merge" in decoder.skipped and "remove-padding" in decoder.skipped
    with pytest.raises(ValueError, match="unknown search families"):
        search_space(encoder, {}, families=["token-mash"])
    # Ladders run from mild to aggressive.
    merge = next(f for f in space.families if f.kind == "token-merge")
    ratios = [float(level.split("ratio=")[1].split(",")[0]) for level in merge.levels]
    assert ratios == sorted(ratios, reverse=True)


def test_tokenizer_outputs_are_batches_as_they_come():
    """A tokenizer returns a BatchEncoding (a mapping, not a dict): each one is a batch of
    keyword inputs."""
    from transformers import BatchEncoding

    batch = BatchEncoding(_padded_batches(1)[0])
    with pytest.warns(UserWarning, match="no plan meets the budget"):
        cm, report = search(
            _bert(), None, [batch], attnopt.Budget(metric=_never, metric_min=1.0), progress=False
        )
    assert report.calibration_batches == 1 and cm.plan.pipeline == EXACT_PIPELINE
    with pytest.raises(CalibrationError, match="not one BatchEncoding"):
        search(_bert(), None, batch, attnopt.Budget(cosine=0.9), progress=False)
