"""The ``precision`` pass (bf16): where it places casts and bf16 weights (IR text), what it must
leave alone, its hardware check, and its budget on every zoo model, on the real MiniLM over real
text, and composed with the lossy attention passes.

The machines these tests run on may lack native bf16 (the pass then declines), so the rewrites are
tested with ``require_native=False``: the numerics of emulated bf16 are the same.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt import PassManager
from attnopt.errors import PipelineError
from attnopt.ir import parse
from attnopt.passes import precision as precision_module
from attnopt.passes.base import PassContext
from attnopt.passes.precision import BF16_BUDGET, Precision, native_bf16
from attnopt.runtime.cpu.projection import linear, onednn_linear_available
from tests import zoo
from tests.helpers import zoo_model

FUSE = "canonicalize,fuse-attention,"
BF16 = "precision{require_native=false}"
BUDGET = attnopt.Budget(**BF16_BUDGET)

BEFORE = """graph(%x: f32[2,4,8], %keep: b8[2,1,1,4]) {
  %w: f32[8,8] = param() {name="w"}
  %b: f32[8] = param() {name="b"}
  %wo: f32[8,8] = param() {name="wo"}
  %q: f32[2,4,8] = linear(%x, %w, %b)
  %h: f32[2,4,2,4] = reshape(%q) {shape=[2, 4, 2, 4]}
  %t: f32[2,2,4,4] = transpose(%h) {dim0=1, dim1=2}
  %a: f32[2,2,4,4] = attention(%t, %t, %t, %keep) {scale=0.5, site=0}
  %u: f32[2,4,2,4] = transpose(%a) {dim0=1, dim1=2}
  %m: f32[2,4,8] = reshape(%u) {shape=[2, 4, 8]}
  %o: f32[2,4,8] = linear(%m, %wo, _)
  %r: f32[2,4,8] = add(%o, %x)
  %e: f32[2,4,8] = exp(%x)
  return (%r, %e)
}"""

# One cast in (shared by the projection and the residual add), one out; weights are bf16 graph
# tensors; the mask and the branch that never meets a projection (exp) keep their types.
AFTER = """graph(%x: f32[2,4,8], %keep: b8[2,1,1,4]) {
  %w_bf16: bf16[8,8] = param() {name="w.bf16"}
  %b_bf16: bf16[8] = param() {name="b.bf16"}
  %wo_bf16: bf16[8,8] = param() {name="wo.bf16"}
  %cast: bf16[2,4,8] = cast(%x) {dtype=bf16}
  %q: bf16[2,4,8] = linear(%cast, %w_bf16, %b_bf16)
  %h: bf16[2,4,2,4] = reshape(%q) {shape=[2, 4, 2, 4]}
  %t: bf16[2,2,4,4] = transpose(%h) {dim0=1, dim1=2}
  %a: bf16[2,2,4,4] = attention(%t, %t, %t, %keep) {scale=0.5, site=0}
  %u: bf16[2,4,2,4] = transpose(%a) {dim0=1, dim1=2}
  %m: bf16[2,4,8] = reshape(%u) {shape=[2, 4, 8]}
  %o: bf16[2,4,8] = linear(%m, %wo_bf16, _)
  %r: bf16[2,4,8] = add(%o, %cast)
  %e: f32[2,4,8] = exp(%x)
  %cast_0: f32[2,4,8] = cast(%r)
  return (%cast_0, %e)
}"""


def _graph(text: str = BEFORE):
    graph = parse(text)
    generator = torch.Generator().manual_seed(0)
    graph.tensors = {
        "w": torch.randn(8, 8, generator=generator),
        "b": torch.randn(8, generator=generator),
        "wo": torch.randn(8, 8, generator=generator),
    }
    graph.meta["parameters"] = ["b", "w", "wo"]
    return graph


def _run(pipeline: str, graph):
    return PassManager.parse(pipeline).run(graph, PassContext())[-1]


def test_pipeline_text_round_trips_and_checks_options():
    text = "precision{keep_fp32=[0,5],residual=fp32,require_native=false}"
    assert str(PassManager.parse(text)) == text
    assert str(PassManager.parse("precision{dtype=bf16}")) == "precision"
    assert not Precision.exact
    with pytest.raises(PipelineError, match="dtype"):
        PassManager.parse("precision{dtype=fp16}")
    with pytest.raises(PipelineError, match="residual"):
        PassManager.parse("precision{residual=fp64}")


def test_casts_at_the_region_edges_and_weights_converted_once():
    graph = _graph()
    result = _run(BF16, graph)
    assert str(graph) == AFTER
    assert parse(str(graph)) == graph
    assert result.rewrites == 8 and not result.declined
    assert sorted(graph.tensors) == ["b.bf16", "w.bf16", "wo.bf16"]
    assert all(t.dtype == torch.bfloat16 for t in graph.tensors.values())
    assert {"w.bf16", "wo.bf16"} <= set(graph.meta["parameters"])


def test_residual_fp32_keeps_the_add_in_fp32():
    graph = _graph()
    _run("precision{require_native=false,residual=fp32}", graph)
    text = str(graph)
    assert "%r: f32[2,4,8] = add(" in text
    assert "%o: bf16[2,4,8] = linear(" in text


def test_an_additive_mask_computed_per_call_is_clamped_before_the_cast():
    graph = _graph(BEFORE.replace("%keep: b8[2,1,1,4]", "%keep: f32[2,1,1,4]"))
    _run(BF16, graph)
    expected = """\
  %aten: f32[2,1,1,4] = aten(%keep) {target="aten.clamp.default", args="[[{\\"$v\\": 0}, \
-3.3895313892515355e+38], {}]"}
  %aten_0: b8[2,1,1,4] = aten(%keep) {target="aten.isneginf.default", args="[[{\\"$v\\": 0}], {}]"}
  %where: f32[2,1,1,4] = where(%aten_0, %keep, %aten)
  %cast_1: bf16[2,1,1,4] = cast(%where) {dtype=bf16}
  %a: bf16[2,2,4,4] = attention(%t, %t, %t, %cast_1) {scale=0.5, site=0}
"""
    assert expected in str(graph) + "\n"


def test_must_not_fire():
    graph = _graph()
    result = _run("precision{dtype=fp32,require_native=false}", graph)
    assert str(graph) == str(_graph()) and not result.changed
    # no projection: nothing meets bf16, so nothing changes
    no_gemm = """graph(%x: f32[2,4,8]) {
  %e: f32[2,4,8] = exp(%x)
  %s: f32[2,4,8] = softmax(%e) {dim=-1}
  return (%s)
}"""
    graph = parse(no_gemm)
    result = _run(BF16, graph)
    assert str(graph) == str(parse(no_gemm)) and not result.changed


def test_keep_fp32_layers():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    cm = attnopt.compile(
        model, args, kwargs, passes=FUSE + "precision{require_native=false,keep_fp32=[1]}"
    )
    bf16 = {n for n, t in cm.graph.tensors.items() if t.dtype == torch.bfloat16}
    assert any(n.startswith("encoder.layer.0.") for n in bf16)
    assert not any(n.startswith("encoder.layer.1.") for n in bf16)
    assert "encoder.layer.1.attention.self.query.weight" in cm.graph.tensors
    assert attnopt.validate(model, cm, args, kwargs, tolerance=BUDGET, sites=False).ok


def test_declines_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device="cpu": (False, "no bf16"))
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(model, args, kwargs, passes=FUSE + "precision")
        cm(*args, **kwargs)
    told = [w for w in caught if "left attention sites" in str(w.message)]
    assert len(told) == 1 and "no bf16" in str(told[0].message)
    assert "bf16" not in str(cm.graph)
    declined = [r for r in cm.history if r["pass"] == "precision"][0]["declined"]
    assert sorted(i for i, _ in declined) == [0, 1]
    with pytest.raises(attnopt.PassError, match="no bf16"):
        attnopt.compile(model, args, kwargs, passes=FUSE + "precision", strict=True)


def test_rewrites_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device="cpu": (True, ""))
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "precision", strict=True)
    assert "bf16" in str(cm.graph)


def test_native_bf16_reads_the_cpu_flags():
    native, reason = native_bf16()
    assert isinstance(native, bool) and (native == (reason == ""))
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(line for line in handle if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return
    if not torch.backends.mkldnn.is_available():
        return
    expected = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags.split(":", 1)[1].split()))
    assert native == expected


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_within_the_bf16_budget(name):
    model = zoo_model(name, None)
    args, kwargs = zoo.get(name).example(2, 12)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + BF16)
    report = attnopt.validate(model, cm, args, kwargs, tolerance=BUDGET, sites=False)
    assert report.ok, str(report)
    assert all(m["rel_l2"] <= BF16_BUDGET["rel_l2"] for m in report.metrics.values())
    assert "bfloat16" in cm.source
    with torch.no_grad():
        assert zoo.primary_output(cm(*args, **kwargs)).dtype == torch.float32


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_real_minilm_embeddings_on_real_text():
    from attnopt.zoo.texts import varied_texts

    model = zoo_model("minilm", "sdpa")
    tokenizer = zoo.minilm_tokenizer()
    texts = varied_texts(tokenizer, 24, min_tokens=5, max_tokens=128, seed=0)
    batch = dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
    cm = attnopt.compile(model, (), batch, passes=FUSE + BF16)
    with torch.no_grad():
        expected = _mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])
        out = cm(**batch)
    assert out.last_hidden_state.dtype == torch.float32
    actual = _mean_pooled(out.last_hidden_state, batch["attention_mask"])
    cosine = F.cosine_similarity(actual.double(), expected.double(), dim=-1)
    assert cosine.min() >= 0.9999, cosine.min()
    # every projection reads a bf16 graph tensor; the program casts activations only: one cast
    # into bf16 (after the embeddings' LayerNorm) and one back per output
    linears = cm.graph.find("linear")
    assert linears and all(n.inputs[1].dtype == torch.bfloat16 for n in linears)
    casts = re.findall(r"= (v_\w+)\.to\(torch\.(bfloat16|float32)\)", cm.source)
    assert [dtype for _, dtype in casts] == ["bfloat16", "float32", "float32"]
    assert not any(name.startswith("v_p_") for name, _ in casts)  # no weight cast per call


def test_finite_fill_masks_stay_finite_in_bf16():
    """HF fills masked keys with finfo(float32).min, which rounds to -inf in bf16: a row whose
    keys are all masked must keep eager's uniform average, so the pass clamps the fill."""
    entry = zoo.get("minilm")
    model = zoo_model("minilm", "eager")
    args, kwargs = entry.example(2, 12)
    kwargs = dict(kwargs, attention_mask=kwargs["attention_mask"].clone())
    kwargs["attention_mask"][1] = 0
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + BF16)
    masks = [n.inputs[3] for n in cm.graph.find("attention")]
    assert all(m.dtype == torch.bfloat16 for m in masks)
    with torch.no_grad():
        expected = model(*args, **kwargs).last_hidden_state
        actual = cm(*args, **kwargs).last_hidden_state
    cosine = F.cosine_similarity(actual[1].flatten().double(), expected[1].flatten().double(), 0)
    assert cosine >= BF16_BUDGET["cosine"], cosine


@pytest.mark.parametrize(
    "lossy",
    [
        "sliding-window{window=4,sinks=1}",
        "block-sparse{block=4,density=0.5}",
        "linearize",
        "linearize{local_window=4}",
        "head-prune{keep=0.5}",
        "remove-padding",
    ],
)
def test_composes_with_lossy_passes(lossy):
    model = zoo_model("bert", None)
    args, kwargs = zoo.get("bert").example(2, 24)
    fp32 = attnopt.compile(model, args, kwargs, passes=FUSE + lossy)
    bf16 = attnopt.compile(model, args, kwargs, passes=FUSE + lossy + "," + BF16)
    assert [s.variant for s in bf16.sites] == [s.variant for s in fp32.sites]
    assert "bfloat16" in bf16.source
    report = attnopt.validate(fp32, bf16, args, kwargs, tolerance=BUDGET, sites=False)
    assert report.ok, str(report)
    declined = [r for r in bf16.history if r["pass"] == "precision"][0]["declined"]
    assert not declined


def test_neighborhood_composes():
    model = zoo_model("vit", None)
    args, kwargs = zoo.get("vit").example(2, 8)
    lossy = "neighborhood{kernel=3}"
    fp32 = attnopt.compile(model, args, kwargs, passes=FUSE + lossy)
    bf16 = attnopt.compile(model, args, kwargs, passes=FUSE + lossy + "," + BF16)
    assert {s.variant for s in bf16.sites} == {"neighborhood"}
    assert attnopt.validate(fp32, bf16, args, kwargs, tolerance=BUDGET, sites=False).ok


def test_a_variant_without_bf16_kernel_stays_fp32(monkeypatch):
    monkeypatch.setattr(precision_module, "BF16_VARIANTS", frozenset({"dense"}))
    model = zoo_model("bert", None)
    args, kwargs = zoo.get("bert").example(2, 12)
    cm = attnopt.compile(model, args, kwargs, passes=FUSE + "linearize," + BF16)
    attention = cm.graph.find("attention")
    assert all(n.inputs[0].dtype == torch.float32 for n in attention)
    declined = [r for r in cm.history if r["pass"] == "precision"][0]["declined"]
    assert sorted(i for i, _ in declined) == [0, 1]
    assert all("linear kernel runs fp32" in reason for _, reason in declined)
    assert attnopt.validate(model, cm, args, kwargs, tolerance="lossy", sites=False).ok


def test_projection_runs_bf16():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, 96, generator=generator).to(torch.bfloat16)
    weight = torch.randn(128, 96, generator=generator).to(torch.bfloat16)
    bias = torch.randn(128, generator=generator).to(torch.bfloat16)
    out = linear(x, weight, bias)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, atol=0.25, rtol=2e-2)
    assert isinstance(onednn_linear_available(torch.bfloat16), bool)
    assert not onednn_linear_available(torch.float16)
