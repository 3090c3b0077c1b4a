"""Capture: every zoo model captures, prints, parses back and runs with passes="none"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnopt
from attnopt.ir import parse, verify
from attnopt.tolerances import NO_REWRITE
from tests import zoo
from tests.helpers import assert_matches_eager, zoo_cases, zoo_model


@pytest.mark.parametrize("name, impl", zoo_cases())
def test_capture_print_parse_round_trip(name, impl):
    model = zoo_model(name, impl)
    args, kwargs = zoo.get(name).example(2, 8)
    graph = attnopt.capture(model, args, kwargs)
    verify(graph)
    text = str(graph)
    assert parse(text) == graph
    assert str(parse(text)) == text


@pytest.mark.parametrize("name, impl", zoo_cases())
def test_compile_none_matches_eager_at_two_signatures(name, impl):
    model = zoo_model(name, impl)
    entry = zoo.get(name)
    args, kwargs = entry.example(2, 8)
    cm = attnopt.compile(model, args, kwargs, passes="none")
    for batch, seq in ((2, 8), (3, 13)):
        a, k = entry.example(batch, seq)
        assert_matches_eager(model, cm, a, k, table=NO_REWRITE)
    assert cm.stats["compilations"] == 2 and cm.stats["cache_hits"] >= 1


def test_output_structure_is_preserved():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    cm = attnopt.compile(model, args, kwargs, passes="none")
    out = cm(*args, **kwargs)
    ref = model(*args, **kwargs)
    assert type(out) is type(ref)
    assert list(out.keys()) == list(ref.keys())


class _Tuple(nn.Module):
    def forward(self, x, y):
        return {"sum": x + y, "pair": (x * 2, [y - 1])}


def test_nested_python_outputs_are_rebuilt():
    x, y = torch.randn(3), torch.randn(3)
    cm = attnopt.compile(_Tuple(), (x, y), passes="none")
    out = cm(x, y)
    assert set(out) == {"sum", "pair"} and isinstance(out["pair"], tuple)
    assert torch.equal(out["pair"][1][0], y - 1)


class _DataDependent(nn.Module):
    def forward(self, x):
        return x[x > 0].sum() if x.sum() > 0 else x.sum()  # python branch on data


def test_capture_error_names_model_and_methods():
    with pytest.raises(attnopt.CaptureError) as info:
        attnopt.capture(_DataDependent(), (torch.randn(4),), method="export")
    message = str(info.value)
    assert "_DataDependent" in message and "export" in message and "Next:" in message


def test_failed_symbolic_capture_leaves_the_inputs_unmarked(monkeypatch):
    """torch.export marks its inputs dynamic and keeps the marks when it fails: a later capture
    of the same tensors (the per-shape fallback, the user's own torch.compile) turned symbolic.
    The fuzzer's program: bmm attention at batch 2 with a [1, 1, 1, 1] bias input, every batch
    axis marked (as before size-1 broadcast axes stayed static), fails symbolically."""
    from torch.export import Dim

    from attnopt.frontend import capture
    from tests.regressions.modules import _fuzz_program

    build, inputs = _fuzz_program(
        batch=2, heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=1, score="bmm", bias="input"
    )
    every_batch = {name: {0: Dim.AUTO} for name in ("q", "k", "v", "bias")}
    monkeypatch.setattr(capture, "dynamic_shapes_for", lambda *_: every_batch)
    args, kwargs = inputs()
    with pytest.raises(attnopt.CaptureError):
        capture.capture_program(build().eval(), args, kwargs, dynamic=True)
    for tensor in [*args, *kwargs.values()]:
        assert not [key for key in vars(tensor) if key.startswith("_dynamo")], vars(tensor)


def test_size_one_axis_beside_a_larger_one_stays_static():
    """A ``[1, 1, S]`` bias beside a batch of 2 is a broadcast, not a batch of one."""

    class Biased(nn.Module):
        def forward(self, x, bias):
            return torch.softmax(x + bias, dim=-1)

    x, bias = torch.randn(2, 3, 5), torch.randn(1, 1, 5)
    cm = attnopt.compile(Biased(), (x, bias), passes="none")
    assert cm.stats["mode"] == "symbolic"
    for batch in (1, 3):
        y = torch.randn(batch, 4, 5)
        torch.testing.assert_close(cm(y, bias), torch.softmax(y + bias, dim=-1))


def test_capture_rejects_non_modules():
    with pytest.raises(attnopt.CaptureError, match="nn.Module"):
        attnopt.capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="nn.Module"):
        attnopt.compile(lambda x: x)


def test_unknown_ops_become_opaque_and_still_run():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.erfcx(x).cumsum(0).flip(0)

    x = torch.randn(5)
    cm = attnopt.compile(Odd(), (x,), passes="none")
    targets = {n.attrs.target for n in cm.graph.nodes if n.op == "aten"}
    assert "aten.special_erfcx.default" in targets
    torch.testing.assert_close(cm(x), Odd()(x))


def test_mismatched_inputs_give_a_signature_error():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    cm = attnopt.compile(model, args, kwargs, passes="none")
    with pytest.raises(attnopt.SignatureError, match="do not fit"):
        cm(input_ids=torch.zeros(2, 8, 3, dtype=torch.long))


def test_decoder_with_kv_cache_captures_without_cache():
    model = zoo_model("llama", "sdpa")
    args, kwargs = zoo.get("llama").example(1, 6)
    graph = attnopt.capture(model, args, kwargs)
    assert graph.outputs and all(v is not None for v in graph.outputs)


class _TransformerWithMask(torch.nn.Module):
    """``nn.Transformer`` given a causal ``tgt_mask`` but no ``tgt_is_causal``: torch inspects the
    mask's values to decide a fast-path hint, which export cannot trace."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t = torch.nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, tgt_mask):
        return self.t(src, tgt, tgt_mask=tgt_mask)


def test_nn_transformer_with_a_mask_value_hint_captures():
    model = _TransformerWithMask().eval()
    src, tgt = torch.randn(2, 8, 32), torch.randn(2, 6, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    cm = attnopt.compile(model, (src, tgt, causal))
    assert len(cm.sites) == 3  # encoder self, decoder self, decoder cross
    with torch.no_grad():
        torch.testing.assert_close(cm(src, tgt, causal), model(src, tgt, causal))
        other = torch.zeros(6, 6).masked_fill(torch.rand(6, 6) > 0.5, float("-inf"))
        other.fill_diagonal_(0.0)
        torch.testing.assert_close(cm(src, tgt, other), model(src, tgt, other))
    from torch.nn.modules import transformer

    assert transformer._detect_is_causal_mask.__name__ == "_detect_is_causal_mask"


def test_budget_is_not_silently_ignored():
    import warnings

    import attnopt
    from attnopt.errors import CalibrationError
    from attnopt.validate import Budget

    model = torch.nn.Linear(4, 4).eval()
    # A budget without passes is the budgeted search, which needs the user's data.
    with pytest.raises(CalibrationError, match="needs calibration"):
        attnopt.compile(model, (torch.randn(2, 4),), budget=Budget(cosine=0.99))
    # With explicit passes the budget is not searched with, and the user is told.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnopt.compile(model, (torch.randn(2, 4),), passes="exact", budget=Budget(cosine=0.99))
    assert any("budget" in str(w.message) and "not searched" in str(w.message) for w in caught)


def test_compiled_module_forwards_the_models_attributes():
    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.config = {"hidden_size": 4}

        def describe(self) -> str:
            return "tagged"

        def forward(self, x):
            return self.proj(x)

    model = Tagged().eval()
    cm = attnopt.compile(model, (torch.randn(2, 4),))
    assert cm.config is model.config
    assert cm.describe() == "tagged"
    assert cm.proj is model.proj  # submodules too
    assert cm.stats["compilations"] >= 1 and "mode" in cm.stats  # its own attributes win
    with pytest.raises(AttributeError):
        _ = cm.no_such_attribute
