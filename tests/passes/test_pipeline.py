"""Pass API: pipeline text, option type checks, provenance, dumps, errors naming the pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import attnopt
from attnopt import PassManager, PipelineError
from attnopt.errors import PassError
from attnopt.ir import parse
from attnopt.passes import BlockSparse, SlidingWindow
from attnopt.passes.base import PassContext, PassResult, parse_pass

SIMPLE = """graph(%x: f32[2,3]) {
  %y: f32[2,3] = exp(%x)
  %z: f32[2,3] = tanh(%y)
  return (%z)
}"""


def test_parse_and_print_round_trip():
    text = "canonicalize,fuse-attention,sliding-window{window=512,sinks=4}"
    pipeline = PassManager.parse(text)
    assert [p.name for p in pipeline.passes] == ["canonicalize", "fuse-attention", "sliding-window"]
    assert pipeline.passes[2] == SlidingWindow(window=512, sinks=4)
    assert str(pipeline) == text
    assert str(PassManager.parse(str(pipeline))) == text
    assert not pipeline.exact and PassManager.parse("canonicalize").exact


def test_list_and_float_options():
    p = parse_pass("block-sparse{block=32,density=0.25,layers=[0,2],sinks=1}")
    assert p == BlockSparse(block=32, density=0.25, layers=(0, 2), sinks=1)
    assert str(parse_pass(str(p))) == str(p)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("sliding-window{window=abc}", "option window='abc' must be int"),
        ("sliding-window{window=-4}", "option window=-4 must be > 0"),
        ("sliding-window{windw=4}", "unknown option 'windw'"),
        ("block-sparse{density=1.5}", "option density=1.5 must be in (0, 1]"),
        ("block-sparse{routing=topk}", "routing=topk needs density"),
        ("block-sparse{density=0.1,routing=magic}", "must be one of topk, threshold, static"),
        ("sliding-window{window}", "needs a value"),
        ("sliding-window", "option window is required"),
        ("sliding-window{window=4", "unbalanced"),
        ("neighborhood{kernel=4}", "must be odd"),
        ("linearize{feature_map=sigmoid}", "must be one of elu, relu, favor, cosformer"),
        ("linearize{budget=0}", "budget=0.0 must be in (0, 1]"),
    ],
)
def test_invalid_pipelines_fail_at_parse_time_naming_the_option(text, message):
    with pytest.raises(PipelineError) as info:
        PassManager.parse(text)
    assert message in str(info.value)


def test_constructor_checks_types_too():
    with pytest.raises(PipelineError, match="window"):
        SlidingWindow(window="512")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="must be > 0"):
        SlidingWindow(window=0)


@dataclass(frozen=True)
class _ExpToSigmoid(attnopt.Pass):
    name: ClassVar[str] = "test-exp-to-sigmoid"
    exact: ClassVar[bool] = False

    def run(self, graph, ctx):
        count = 0
        for node in graph.find("exp"):
            node.op = "sigmoid"
            count += 1
        return PassResult(changed=bool(count), rewrites=count)


@dataclass(frozen=True)
class _Breaks(attnopt.Pass):
    name: ClassVar[str] = "test-breaks-graph"

    def run(self, graph, ctx):
        graph.nodes[0].inputs = [graph.nodes[1].output]  # use before definition
        return PassResult(changed=True)


@dataclass(frozen=True)
class _Raises(attnopt.Pass):
    name: ClassVar[str] = "test-raises"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


def test_provenance_and_dumps(tmp_path):
    graph = parse(SIMPLE)
    ctx = PassContext()
    pm = PassManager([_ExpToSigmoid()], dump_dir=tmp_path)
    (result,) = pm.run(graph, ctx)
    assert result.rewrites == 1
    record = ctx.history[0]
    assert record["pass"] == "test-exp-to-sigmoid" and record["rewrites"] == 1
    assert record["seconds"] >= 0 and graph.meta["provenance"][0] is record
    before = (tmp_path / "00-before-test-exp-to-sigmoid.ir").read_text()
    after = (tmp_path / "00-after-test-exp-to-sigmoid.ir").read_text()
    assert "exp(%x)" in before and "sigmoid(%x)" in after
    assert parse(after) == graph


def test_invalid_graph_error_names_pass_and_predecessors():
    pm = PassManager([_ExpToSigmoid(), _Breaks()])
    with pytest.raises(PassError) as info:
        pm.run(parse(SIMPLE))
    assert "test-breaks-graph" in str(info.value) and "after: test-exp-to-sigmoid" in str(
        info.value
    )


def test_exception_in_pass_is_wrapped():
    with pytest.raises(PassError, match="pass test-raises failed: RuntimeError: boom"):
        PassManager([_Raises()]).run(parse(SIMPLE))


def test_custom_pass_registered_by_name_and_usable_in_compile():
    assert PassManager.parse("test-exp-to-sigmoid").passes[0] == _ExpToSigmoid()

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.exp(x)

    x = torch.randn(4)
    cm = attnopt.compile(M(), (x,), passes="test-exp-to-sigmoid")
    torch.testing.assert_close(cm(x), torch.sigmoid(x))
    assert cm.history[-1]["pass"] == "test-exp-to-sigmoid"


def test_kebab_case_names_are_enforced():
    with pytest.raises(ValueError, match="kebab-case"):

        @dataclass(frozen=True)
        class Bad(attnopt.Pass):
            name: ClassVar[str] = "Bad_Name"


def test_compile_rejects_bad_passes_argument():
    with pytest.raises(PipelineError, match="passes must be"):
        attnopt.compile(torch.nn.Identity(), passes=42)  # type: ignore[arg-type]


def test_layer_of_prefers_the_layer_container():
    from attnopt.passes.select import layer_of

    assert layer_of("encoder.layer.3.attention.self") == 3
    assert layer_of("encoder.block.3.layer.1.EncDecAttention") == 3  # T5: block, then sublayer
    assert layer_of("transformer.h.7.attn") == 7
    assert layer_of("model.layers.12.self_attn") == 12
    assert layer_of("blocks.2.attn") == 2
    assert layer_of("stage.4.mixer") == 4  # no container: the last number
    assert layer_of("attention") is None and layer_of(None) is None
