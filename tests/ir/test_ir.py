"""IR: types, printer/parser round trips, verifier rules, type re-inference, networkx view."""

from __future__ import annotations

import pytest
import torch

import attnopt  # noqa: F401 - registers every op
from attnopt.ir import (
    Graph,
    IRParseError,
    IRVerifyError,
    ScalarType,
    TensorType,
    dtype_from_name,
    dtype_name,
    get_op,
    parse,
    register_op,
    verify,
)
from attnopt.ir.core_ops import DimAttrs, ShapeAttrs
from attnopt.ir.ops import OpDef

TEXT = """graph(%x: f32[2,8,64], %mask: b8[2,1,1,8], %keep: b8[16]) {
  %w: f32[64,64] = param() {name="proj.weight"}
  %y: f32[2,8,64] = linear(%x, %w, _)
  %h: f32[2,8,4,16] = reshape(%y) {shape=[2, 8, 4, 16]}
  %q: f32[2,4,8,16] = transpose(%h) {dim0=1, dim1=2}
  %o: f32[2,4,8,16] = attention(%q, %q, %q, %mask, _) {scale=0.25, causal=true}
  %m: f32[2,4,8,16] = masked_fill(%o, %keep) {value=-inf}
  return (%m, %y)
}"""


def _graph() -> Graph:
    return parse(TEXT, tensors={"proj.weight": torch.randn(64, 64)})


def test_dtype_names_round_trip():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        assert dtype_from_name(dtype_name(dtype)) == dtype
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name("f12")


def test_tensor_type_text_and_numel():
    t = TensorType((2, 3, 4), torch.float16)
    assert str(t) == "f16[2,3,4]" and t.numel() == 24 and t.nbytes() == 48
    assert not TensorType((2, "s0"), torch.float32).is_static
    with pytest.raises(ValueError):
        TensorType((2, "s0"), torch.float32).numel()
    assert str(ScalarType("int")) == "int"


def test_print_parse_round_trip_is_identity():
    graph = _graph()
    verify(graph)
    assert str(parse(str(graph))) == str(graph)
    assert parse(str(graph)) == graph
    assert "attention(%q, %q, %q, %mask, _) {scale=0.25, causal=true}" in str(graph)


def test_structural_equality_detects_differences():
    other = parse(TEXT.replace("scale=0.25", "scale=0.5"))
    assert other != _graph()


def test_symbolic_dims_parse_and_print():
    text = "graph(%x: f32[s0,8]) {\n  %y: f32[s0,8] = exp(%x)\n  return (%y)\n}"
    assert str(parse(text)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "graph(%x: f32[2]) {\n  %y: f32[2] = exp(%z)\n  return (%y)\n}",
            "used before it is defined",
        ),
        ("graph(%x: f32[2]) {\n  %y: f32[2] = nosuchop(%x)\n  return (%y)\n}", "unknown op"),
        (
            "graph(%x: f32[2]) {\n  %y: f32[2] = softmax(%x) {bogus=1}\n  return (%y)\n}",
            "no attribute",
        ),
        ("graph(%x: f32[2]) {\n  %x: f32[2] = exp(%x)\n  return (%x)\n}", "defined twice"),
        ("grph(%x: f32[2]) {\n}", "must start"),
    ],
)
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(IRParseError, match=message):
        parse(text)


def test_verifier_checks_types_against_inference():
    graph = parse("graph(%x: f32[2,3]) {\n  %y: f32[3,3] = exp(%x)\n  return (%y)\n}")
    with pytest.raises(IRVerifyError, match="differ from inferred"):
        verify(graph)


def test_verifier_runs_op_rules():
    graph = parse(
        "graph(%x: f32[2,3]) {\n  %y: f32[3,2] = permute(%x) {dims=[1, 1]}\n  return (%y)\n}"
    )
    with pytest.raises(IRVerifyError, match="not a permutation"):
        verify(graph, check_types=False)
    bad = parse(
        "graph(%q: f32[1,3,4,8], %k: f32[1,2,4,8]) {\n"
        "  %o: f32[1,3,4,8] = attention(%q, %k, %k, _, _) {scale=1.0}\n  return (%o)\n}"
    )
    with pytest.raises(IRVerifyError, match="not a multiple"):
        verify(bad)


def test_infer_types_after_shape_change():
    graph = _graph()
    graph.inputs[0].type = TensorType((2, 5, 64), torch.float32)
    graph.inputs[1].type = TensorType((2, 1, 1, 5), torch.bool)
    reshape = next(n for n in graph.nodes if n.op == "reshape")
    reshape.attrs = ShapeAttrs(shape=(2, 5, 4, 16))
    graph.infer_types()
    verify(graph)
    assert graph.outputs[0].shape == (2, 4, 5, 16)


def test_dead_code_elimination_and_users():
    graph = parse(
        "graph(%x: f32[2]) {\n  %a: f32[2] = exp(%x)\n  %b: f32[2] = tanh(%x)\n  return (%a)\n}"
    )
    assert graph.dead_code_elimination() == 1
    assert [n.op for n in graph.nodes] == ["exp"]
    assert len(graph.users()[graph.inputs[0]]) == 1


def test_networkx_view_is_read_only():
    view = _graph().to_networkx()
    assert view.number_of_nodes() == 3 + 6
    with pytest.raises(Exception):  # noqa: B017 - networkx raises NetworkXError on frozen graphs
        view.add_node("x")


def test_register_custom_op_round_trips():
    try:
        register_op(
            OpDef(
                "test_double",
                DimAttrs,
                lambda inputs, attrs: inputs[0] * 2,
                emit=lambda n, a: f"{n[0]} * 2",
            )
        )
    except ValueError:
        pass  # already registered by an earlier run in this process
    text = "graph(%x: f32[3]) {\n  %y: f32[3] = test_double(%x) {dim=0}\n  return (%y)\n}"
    graph = parse(text)
    verify(graph)
    assert str(graph) == text
    assert (
        get_op("test_double")
        .cost_of([graph.inputs[0].type], [graph.outputs[0].type], DimAttrs())
        .flops
        == 3
    )


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_op(OpDef("softmax", DimAttrs, lambda inputs, attrs: None))


def test_attention_cost_counts_causal_half():
    graph = parse(
        "graph(%q: f32[1,2,8,4]) {\n  %o: f32[1,2,8,4] = attention(%q, %q, %q) {scale=1.0, causal=true}\n"
        "  return (%o)\n}"
    )
    node = graph.nodes[0]
    types = [v.type for v in node.inputs]
    causal = get_op("attention").cost_of(types, [node.output.type], node.attrs).flops
    from attnopt.ir.attention import AttentionAttrs

    dense = get_op("attention").cost_of(types, [node.output.type], AttentionAttrs()).flops
    assert causal < dense
