"""The driver keeps a plan: calibrate once, run any shape; save and reapply it without calibration;
ship a compiled module to spawned workers as (model, plan, options)."""

from __future__ import annotations

import copy
import multiprocessing
import pickle

import pytest
import torch
from torch import nn

import attnopt
import attnopt.compiled
from attnopt.tolerances import assert_close
from tests import zoo
from tests.helpers import zoo_model

FUSE = "canonicalize,fuse-attention,"
PRUNE = FUSE + "head-prune{keep=0.5}"
OTHER_SHAPES = [(1, 8), (3, 17), (5, 32), (12, 20), (2, 48)]


def refuse_graph_runs(*args, **kwargs):
    """Stands in for the driver's graph runner once a plan must be replayed."""
    raise AssertionError("calibration ran again: the plan should have been replayed")


def _pruned_reference(model: nn.Module, plan: attnopt.Plan) -> nn.Module:
    """An eager copy of a BertModel with the plan's heads sliced out of its weights."""
    [decisions] = plan.decisions.values()
    pruned = copy.deepcopy(model)
    for key, decision in decisions.items():
        attention = pruned.encoder.layer[plan.site(key).layer].attention
        size = attention.self.attention_head_size
        kept = torch.tensor(decision["heads_kept"])
        rows = (kept[:, None] * size + torch.arange(size)).reshape(-1)
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight = nn.Parameter(linear.weight[rows].clone())
            linear.bias = nn.Parameter(linear.bias[rows].clone())
        dense = attention.output.dense
        dense.weight = nn.Parameter(dense.weight[:, rows].clone())
    return pruned


def _hidden(module: nn.Module, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return zoo.primary_output(module(*args, **kwargs))


def test_head_pruned_bert_calibrated_once_runs_five_other_shapes(monkeypatch):
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(8, 24)
    cm = attnopt.compile(model, args, kwargs, passes=PRUNE, calibration=[(args, kwargs)])
    monkeypatch.setattr(attnopt.compiled, "run_graph", refuse_graph_runs)
    reference = _pruned_reference(model, cm.plan)
    assert_close(_hidden(cm, args, kwargs), _hidden(reference, args, kwargs))
    for batch, seq in OTHER_SHAPES:
        other_args, other_kwargs = zoo.get("bert").example(batch, seq)
        out = _hidden(cm, other_args, other_kwargs)
        assert [s.heads_kept for s in cm.sites] == [2, 2]
        assert_close(out, _hidden(reference, other_args, other_kwargs))


def _peaked_bert() -> nn.Module:
    """The zoo's BERT with 3 layers and larger weights: its attention is peaked enough that
    linearising costs each layer a different amount of accuracy."""
    from transformers import BertModel

    config = copy.deepcopy(zoo_model("bert", "eager").config)
    config.num_hidden_layers, config.initializer_range = 3, 0.2
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


def test_budget_linearised_bert_keeps_its_sites_at_five_other_shapes(monkeypatch):
    model = _peaked_bert()
    args, kwargs = zoo.get("bert").example(8, 24)
    pipeline = FUSE + "linearize{budget=0.97}"
    cm = attnopt.compile(model, args, kwargs, passes=pipeline, calibration=[(args, kwargs)])
    linear = tuple(s.index for s in cm.sites if s.variant == "linear")
    assert 0 < len(linear) < len(cm.sites), "the budget must select some sites, not all"
    # The same sites chosen by hand: no calibration, no plan.
    chosen = attnopt.compile(
        model, passes=FUSE + f"linearize{{sites=[{','.join(map(str, linear))}]}}"
    )
    monkeypatch.setattr(attnopt.compiled, "run_graph", refuse_graph_runs)
    for batch, seq in OTHER_SHAPES:
        other_args, other_kwargs = zoo.get("bert").example(batch, seq)
        out = _hidden(cm, other_args, other_kwargs)
        assert tuple(s.index for s in cm.sites if s.variant == "linear") == linear
        assert torch.equal(out, _hidden(chosen, other_args, other_kwargs))


def test_head_pruned_minilm_compiled_at_one_batch_runs_a_smaller_one():
    """The issue's failure: calibrated at batch 16, the last, smaller batch re-calibrated with
    data of the wrong shape and raised PassError."""
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(16, 48)
    cm = attnopt.compile(model, args, kwargs, passes=PRUNE, calibration=[(args, kwargs)])
    reference = _pruned_reference(model, cm.plan)
    for batch, seq in [(12, 48), (3, 40), *OTHER_SHAPES]:
        small_args, small_kwargs = zoo.get("minilm").example(batch, seq)
        out = _hidden(cm, small_args, small_kwargs)
        # oneDNN projections against eager's: a few 1e-5 differences on MiniLM's scale
        torch.testing.assert_close(
            out, _hidden(reference, small_args, small_kwargs), atol=1e-4, rtol=1e-4
        )
    assert [s.heads_kept for s in cm.sites] == [6] * 6


def test_budget_linearised_minilm_plan_reapplies_at_five_other_shapes(tmp_path, monkeypatch):
    """The real MiniLM linearised within a budget, calibrated at one shape: the chosen sites hold
    at five other shapes, and the saved plan reapplied without calibration gives equal outputs."""
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(8, 32)
    cm = attnopt.compile(
        model, args, kwargs, passes=FUSE + "linearize{budget=0.9}", calibration=[(args, kwargs)]
    )
    linear = [s.index for s in cm.sites if s.variant == "linear"]
    assert 0 < len(linear) < len(cm.sites), "the budget must select some sites, not all"
    path = cm.plan.save(tmp_path / "minilm.json")
    monkeypatch.setattr(attnopt.compiled, "run_graph", refuse_graph_runs)
    again = attnopt.compile(model, args, kwargs, plan=path, calibration=None)
    for batch, seq in OTHER_SHAPES:
        other_args, other_kwargs = zoo.get("minilm").example(batch, seq)
        out = _hidden(cm, other_args, other_kwargs)
        assert [s.index for s in cm.sites if s.variant == "linear"] == linear
        assert torch.equal(out, _hidden(again, other_args, other_kwargs))
    assert [s.variant for s in again.sites] == [s.variant for s in cm.sites]


def test_saved_plan_reapplies_without_calibration(tmp_path, monkeypatch):
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(4, 16)
    pipeline = PRUNE + ",linearize{count=1}"
    cm = attnopt.compile(model, args, kwargs, passes=pipeline, calibration=[(args, kwargs)])
    path = cm.plan.save(tmp_path / "plans" / "bert.json")
    assert attnopt.Plan.load(path) == cm.plan
    monkeypatch.setattr(attnopt.compiled, "run_graph", refuse_graph_runs)
    again = attnopt.compile(model, args, kwargs, plan=path, calibration=None)
    assert str(again.pipeline) == str(cm.pipeline)  # the plan's pipeline when passes= is left out
    assert torch.equal(_hidden(again, args, kwargs), _hidden(cm, args, kwargs))
    other_args, other_kwargs = zoo.get("bert").example(3, 11)
    assert torch.equal(
        _hidden(again, other_args, other_kwargs), _hidden(cm, other_args, other_kwargs)
    )
    assert [s.variant for s in again.sites] == [s.variant for s in cm.sites]


def test_pickle_holds_model_plan_and_options_and_recompiles_lazily(monkeypatch):
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(4, 16)
    cm = attnopt.compile(model, args, kwargs, passes=PRUNE, calibration=[(args, kwargs)])
    first_compile = cm.stats["compilations"]
    data = pickle.dumps(cm)
    assert cm.source.encode() not in data and b"make_program" not in data
    monkeypatch.setattr(attnopt.compiled, "run_graph", refuse_graph_runs)
    restored = pickle.loads(data)
    assert restored.plan == cm.plan and restored.stats["compilations"] == 0
    assert restored.calibration is None
    assert torch.equal(_hidden(restored, args, kwargs), _hidden(cm, args, kwargs))
    assert restored.stats["compilations"] == first_compile  # what the first call compiled


def test_pickling_before_the_plan_exists_refuses_to_drop_calibration():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    cm = attnopt.compile(model, passes=PRUNE, calibration=[(args, kwargs)])
    with pytest.raises(pickle.PicklingError, match="compile it once"):
        pickle.dumps(cm)


_WORKER_MODULE = None


def _start_worker(payload: bytes) -> None:
    global _WORKER_MODULE
    torch.set_num_threads(1)
    _WORKER_MODULE = pickle.loads(payload)


def _embed_in_worker(shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    import attnopt.compiled as compiled

    calls = []
    original = compiled.run_graph
    compiled.run_graph = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        args, kwargs = zoo.get("bert").example(*shape)
        out = _hidden(_WORKER_MODULE, args, kwargs)
    finally:
        compiled.run_graph = original
    return out, len(calls)


def test_spawned_pool_workers_replay_the_plan():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(8, 24)
    cm = attnopt.compile(model, args, kwargs, passes=PRUNE, calibration=[(args, kwargs)])
    shapes = [(2, 16), (3, 9)]
    expected = [_hidden(cm, *zoo.get("bert").example(*shape)) for shape in shapes]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2, initializer=_start_worker, initargs=(pickle.dumps(cm),)) as pool:
        results = pool.map(_embed_in_worker, shapes)
    for (out, calibration_runs), want in zip(results, expected):
        assert calibration_runs == 0
        assert_close(out, want)
