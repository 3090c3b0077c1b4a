"""Compile once, run any shape: symbolic batch and sequence dims from capture to the program.

A model captured with symbolic dims serves every later batch size and length with the same
program (no capture, no passes, no codegen); a model that cannot be, or that would fuse less,
is compiled once per shape and the user is told why. Either way every call matches eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnopt
from attnopt.ir import parse
from attnopt.ir.symbolic import bind_symbols, canonical_dim, dim_source, evaluate_dim
from attnopt.ir.types import TensorType
from attnopt.signature import SymbolicSignature
from tests import zoo
from tests.helpers import assert_matches_eager, zoo_model

SHAPES = [(3, 9), (1, 20), (5, 13), (2, 16)]


def _compile_quietly(model, args, kwargs, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(model, args, kwargs, **options)
    return cm, [str(w.message) for w in caught]


@pytest.mark.parametrize("name, impl", [("minilm", "sdpa"), ("minilm", "eager"), ("bert", "sdpa")])
def test_encoder_compiles_once_and_runs_every_shape(name, impl):
    model = zoo_model(name, impl)
    args, kwargs = zoo.get(name).example(2, 16)
    cm, messages = _compile_quietly(model, args, kwargs)
    assert cm.stats["mode"] == "symbolic", (cm.symbolic_refusal, messages)
    assert not [m for m in messages if "once per input shape" in m]
    captures = cm.stats["captures"]
    assert captures == 2  # the symbolic capture and the per-shape check it is compared with
    for batch, seq in SHAPES:
        args, kwargs = zoo.get(name).example(batch, seq)
        assert_matches_eager(model, cm, args, kwargs)
    assert cm.stats["captures"] == captures  # no new shape captured or compiled again
    assert cm.stats["compilations"] == 2
    assert cm.stats["specialisations"] == len(SHAPES) - 1  # (2, 16) is the example itself
    assert any(isinstance(d, str) for v in cm.graph.inputs for d in v.shape)
    assert "sym_" in cm.source  # sizes are read from the inputs at run time


def test_dynamic_false_compiles_per_shape():
    model = zoo_model("minilm", "sdpa")
    args, kwargs = zoo.get("minilm").example(2, 16)
    cm = attnopt.compile(model, args, kwargs, dynamic=False)
    assert cm.stats["mode"] == "per-shape" and cm.stats["captures"] == 1
    args, kwargs = zoo.get("minilm").example(3, 9)
    assert_matches_eager(model, cm, args, kwargs)
    assert cm.stats["captures"] == 2 and cm.stats["specialisations"] == 0


def test_a_decoder_whose_causal_mask_needs_static_lengths_compiles_per_shape_and_says_so():
    model = zoo_model("gpt2", "sdpa")
    args, kwargs = zoo.get("gpt2").example(2, 16)
    cm, messages = _compile_quietly(model, args, kwargs)
    if cm.stats["mode"] == "symbolic":  # the causal fact survived symbolic capture: fine too
        assert cm.symbolic_refusal is None
    else:
        assert cm.symbolic_refusal and any("once per input shape" in m for m in messages)
    for batch, seq in [(3, 9), (1, 20)]:
        args, kwargs = zoo.get("gpt2").example(batch, seq)
        assert_matches_eager(model, cm, args, kwargs)
    site = cm.sites[0]
    assert site.causal or site.mask_causal  # never traded for a slower, non-causal site


def test_other_dtype_or_structure_is_a_new_signature():
    model = zoo_model("minilm", "sdpa")
    args, kwargs = zoo.get("minilm").example(2, 16)
    cm = attnopt.compile(model, args, kwargs)
    assert cm.stats["mode"] == "symbolic"
    fewer = {k: v for k, v in kwargs.items() if k != "token_type_ids"}
    assert_matches_eager(model, cm, args, fewer)
    assert cm.stats["captures"] > 2  # another structure: compiled for it


def test_symbolic_ir_text_round_trips():
    text = """graph(%x: f32[s0,s1,8]) {
  %w: f32[8,8] = param() {name="w"}
  %y: f32[s0,s1,8] = linear(%x, %w, _)
  %z: f32["s0*s1",8] = reshape(%y) {shape=["s0*s1", 8]}
  return (%z)
}"""
    graph = parse(text)
    assert graph.outputs[0].shape == ("s0*s1", 8)
    assert parse(str(graph)) == graph
    assert str(TensorType(("s1*s0", 4), torch.float32)) == 'f32["s1*s0",4]'


def test_symbolic_dims_evaluate_and_print():
    assert canonical_dim("s1*s0") == canonical_dim("s0*s1")
    assert canonical_dim("s0 - s0 + 3") == 3
    assert evaluate_dim("s0*s1 + 1", {"s0": 3, "s1": 5}) == 16
    assert dim_source("s0*s1") == "sym_s0*sym_s1"
    with pytest.raises(KeyError):
        evaluate_dim("s2", {"s0": 1})


def test_binding_symbols_checks_every_dim():
    types = [
        TensorType(("s0", "s1"), torch.int64),
        TensorType(("s0", "s1"), torch.int64),
        TensorType(("s0*s1", 4), torch.float32),
    ]
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert bind_symbols(types, [ids, ids, torch.zeros(10, 4)]) == {"s0": 2, "s1": 5}
    with pytest.raises(ValueError, match="s1 is 5"):
        bind_symbols(types, [ids, torch.zeros(2, 6, dtype=torch.long), torch.zeros(10, 4)])
    with pytest.raises(ValueError, match="dim 1 is 3"):
        bind_symbols(types, [ids, ids, torch.zeros(10, 3)])
    with pytest.raises(ValueError, match="s0\\*s1 = 10"):
        bind_symbols(types, [ids, ids, torch.zeros(11, 4)])


def test_symbolic_signature_rejects_what_the_program_cannot_serve():
    import torch.utils._pytree as pytree

    example = {"ids": torch.zeros(2, 5, dtype=torch.long)}
    flat, spec = pytree.tree_flatten(((), example))
    signature = SymbolicSignature(
        flat, spec, [0], [TensorType(("s0", "s1"), torch.int64)], {"s1": (2, 512)}
    )

    def bind(ids):
        return signature.bind(*pytree.tree_flatten(((), {"ids": ids})))

    assert bind(torch.zeros(7, 300, dtype=torch.long)) == {"s0": 7, "s1": 300}
    assert bind(torch.zeros(7, 513, dtype=torch.long)) is None  # outside the proven range
    assert bind(torch.zeros(7, 30, dtype=torch.int32)) is None  # another dtype
    assert bind(torch.zeros(7, 30, 2, dtype=torch.long)) is None  # another rank


@pytest.mark.parametrize(
    "passes",
    [
        "canonicalize,fuse-attention,sliding-window{window=4,sinks=1,min_len=12}",
        "canonicalize,fuse-attention,block-sparse{block=4,density=0.5}",
    ],
)
def test_lossy_passes_run_symbolically_as_they_do_per_shape(passes):
    model = zoo_model("minilm", "sdpa")
    args, kwargs = zoo.get("minilm").example(2, 16)
    symbolic, _ = _compile_quietly(model, args, kwargs, passes=passes)
    per_shape = attnopt.compile(model, args, kwargs, passes=passes, dynamic=False)
    assert symbolic.stats["mode"] == "symbolic", symbolic.symbolic_refusal
    assert symbolic.sites[0].variant != "dense"
    for batch, seq in [(3, 9), (1, 20), (4, 33)]:  # 9 < min_len: that length stays dense
        args, kwargs = zoo.get("minilm").example(batch, seq)
        with torch.no_grad():
            expected = per_shape(*args, **kwargs)[0]
            actual = symbolic(*args, **kwargs)[0]
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert symbolic.stats["captures"] == 2


def test_non_tensor_keywords_through_kwargs_stay_symbolic():
    # sentence-transformers calls model(**features, return_dict=True): return_dict goes through
    # BertModel.forward's **kwargs, which torch.export cannot take dynamic shapes for.
    model = zoo_model("minilm", "sdpa")
    args, kwargs = zoo.get("minilm").example(2, 16)
    cm, _ = _compile_quietly(model, args, dict(kwargs, return_dict=True))
    assert cm.stats["mode"] == "symbolic", cm.symbolic_refusal
    assert cm.sites[0].module == "encoder.layer.0.attention.self"  # the model's own paths
    for batch, seq in [(3, 9), (1, 20)]:
        args, kwargs = zoo.get("minilm").example(batch, seq)
        with torch.no_grad():
            expected = model(**kwargs, return_dict=True).last_hidden_state
            actual = cm(**kwargs, return_dict=True).last_hidden_state
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert cm.stats["captures"] == 2 and cm.stats["specialisations"] == 2
