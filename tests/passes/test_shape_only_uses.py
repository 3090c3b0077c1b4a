"""Issue #14: readers of the scores or weights that take only their shape, dtype or device
(``mask.expand_as(scores)``, ``torch.zeros_like(scores)``, ``scores.new_full(...)``,
``weights.new_zeros(weights.shape)``) are not uses: the site fuses, the readers no longer read the
values the ``attention`` op replaced, and the outputs match eager. Readers of the values still
refuse the site, with the reason."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import attnopt
from attnopt import PassManager
from attnopt.ir import get_op, parse, verify
from attnopt.passes.base import PassContext

PASSES = "canonicalize,fuse-attention"
HIDDEN, HEADS = 16, 2
NEG = -1.0e9


class Encoder(nn.Module):
    """One encoder self-attention block; ``form`` picks how the scores are masked or scaled."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, HEADS, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN201
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        padding = attention_mask[:, None, None, :]  # 1 = token, 0 = padding
        scores = q @ k.transpose(-1, -2)
        if self.form == "size-scaled":
            scores = scores / math.sqrt(scores.size(-1))
        else:
            scores = scores / math.sqrt(q.size(-1))
        extra = None
        if self.form == "expand_as":
            scores = scores + ((1.0 - padding) * NEG).expand_as(scores)
        elif self.form == "zeros_like":
            scores = scores + torch.zeros_like(scores).masked_fill(padding == 0, NEG)
        elif self.form == "new_full":
            scores = torch.where(padding.bool(), scores, scores.new_full(scores.shape, NEG))
        elif self.form == "full_like":
            scores = scores + torch.full_like(scores, NEG) * (1 - padding)
        elif self.form == "size-scaled":
            bias = scores.new_zeros(scores.size()).masked_fill(padding == 0, NEG)
            scores = scores + bias
        elif self.form in ("weights-new_zeros", "weights-returned", "scores-reused"):
            scores = scores + (1.0 - padding) * NEG
        weights = torch.softmax(scores, dim=-1)
        if self.form == "weights-new_zeros":
            extra = weights.new_zeros(weights.shape).sum(-1)  # shape only: a placeholder
        elif self.form == "weights-returned":
            extra = weights
        elif self.form == "scores-reused":
            extra = scores.amax(-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.o(out) if extra is None else (self.o(out), extra)


def _inputs(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, length, HIDDEN)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3 :] = 0
    return x, mask


def _compile(form: str, dynamic: bool | None) -> tuple[nn.Module, attnopt.CompiledModule]:
    torch.manual_seed(0)
    model = Encoder(form).eval()
    return model, attnopt.compile(model, args=_inputs(), passes=PASSES, dynamic=dynamic)


FUSING_FORMS = ["expand_as", "zeros_like", "new_full", "full_like", "size-scaled"]


@pytest.mark.parametrize("dynamic", [False, None], ids=["static", "symbolic"])
@pytest.mark.parametrize("form", FUSING_FORMS + ["weights-new_zeros"])
def test_shape_only_reader_does_not_block_fusion(form, dynamic):
    model, cm = _compile(form, dynamic)
    assert len(cm.sites) == 1, cm.explain()
    assert not cm.graph.find("softmax") and len(cm.graph.find("attention")) == 1
    assert cm.explain() == []
    if dynamic is None:
        assert cm.stats["mode"] == "symbolic", cm.symbolic_refusal
        assert isinstance(cm.graph.inputs[0].shape[0], str)  # a symbolic batch
    with torch.no_grad():
        for batch, length in [(2, 7), (3, 7), (3, 5)]:
            inputs = _inputs(batch, length)
            assert_close(cm(*inputs), model(*inputs))


@pytest.mark.parametrize("form", FUSING_FORMS)
def test_padding_mask_built_from_shapes_is_a_mask_not_a_bias(form):
    _, cm = _compile(form, dynamic=False)
    site = cm.sites[0]
    assert site.has_mask and not site.has_bias


@pytest.mark.parametrize("form", FUSING_FORMS + ["weights-new_zeros"])
def test_no_reader_of_the_removed_scores_is_left(form):
    _, cm = _compile(form, dynamic=None)
    targets = {n.attrs.target for n in cm.graph.find("aten")}
    assert not targets & {
        "aten.expand_as.default",
        "aten.zeros_like.default",
        "aten.full_like.default",
    }
    assert not cm.graph.find("matmul")  # q @ k^T went with the site: nothing kept it alive
    for node in cm.graph.find("aten"):
        if node.attrs.target.startswith("aten.new_"):  # reads a graph input, for its device
            assert any(node.inputs[0] is x for x in cm.graph.inputs)
    note = cm.history[-1]["notes"][-1]
    assert "shape-only readers detached" in note


def test_size_queries_never_reach_the_ir():
    """``scores.size(-1)`` is a number (or a symbolic dim) at capture: no node reads the scores."""
    torch.manual_seed(0)
    model = Encoder("size-scaled").eval()
    for dynamic in (False, True):
        graph = attnopt.capture(model, _inputs(), dynamic=dynamic)
        assert "sym_size" not in str(graph) and "sym_numel" not in str(graph)


# --- must not fuse ----------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, None], ids=["static", "symbolic"])
@pytest.mark.parametrize(
    ("form", "reason"),
    [
        ("weights-returned", "used 2 times (read by %matmul_1, returned)"),
        ("scores-reused", "also used elsewhere (read by %amax)"),
    ],
)
def test_readers_of_values_still_refuse(form, reason, dynamic):
    model, cm = _compile(form, dynamic)
    assert cm.sites == [] and cm.graph.find("softmax")
    assert any(reason in why for _, why in cm.explain()), cm.explain()
    inputs = _inputs()
    with torch.no_grad():
        assert_close(cm(*inputs), model(*inputs))


def test_weights_only_returned_are_refused_not_a_crash():
    class Weights(nn.Module):
        def forward(self, q, k):  # noqa: ANN001, ANN201
            return torch.softmax(q @ k.transpose(-1, -2), -1)

    q = torch.randn(1, 2, 4, 8)
    cm = attnopt.compile(Weights(), args=(q, q), passes=PASSES, dynamic=False)
    assert cm.sites == []
    assert any("returned, not applied to v" in why for _, why in cm.explain())


# --- the rewrite, on IR text -------------------------------------------------------------------
HEAD = (
    "graph(%q: f32[1,2,8,16], %k: f32[1,2,8,16], %v: f32[1,2,8,16], %pad: b8[1,1,1,8]) {\n"
    "  %kt: f32[1,2,16,8] = transpose(%k) {dim0=-2, dim1=-1}\n"
    "  %s: f32[1,2,8,8] = matmul(%q, %kt)\n"
    "  %t: f32[1,2,8,8] = div(%s) {scalar=4.0}\n"
)
TAIL = (
    "  %p: f32[1,2,8,8] = softmax(%m) {dim=-1}\n"
    "  %o: f32[1,2,8,16] = matmul(%p, %v)\n"
    "  return (%o{EXTRA})\n"
    "}"
)
ZEROS_LIKE = (
    '  %z: f32[1,2,8,8] = aten(%t) {target="aten.zeros_like.default", '
    'args="[[{\\"$v\\": 0}], {\\"pin_memory\\": false}]"}\n'
    "  %b: f32[1,2,8,8] = masked_fill(%z, %pad) {value=-1000000000.0}\n"
    "  %m: f32[1,2,8,8] = add(%t, %b)\n"
)
EXPAND_AS_SELF = (
    '  %e: f32[1,2,8,8] = aten(%t, %t) {target="aten.expand_as.default", '
    'args="[[{\\"$v\\": 0}, {\\"$v\\": 1}], {}]"}\n'
    "  %m: f32[1,2,8,8] = add(%t, %pad)\n"
)


def _evaluate(graph, inputs):  # noqa: ANN001, ANN202
    values = dict(zip(graph.inputs, inputs))
    for node in graph.nodes:
        args = [None if value is None else values[value] for value in node.inputs]
        values[node.output] = get_op(node.op).impl(args, node.attrs)
    return [values[value] for value in graph.outputs]


def _fuse(text: str) -> tuple:
    graph = parse(text)
    before = parse(text)
    verify(graph)
    results = PassManager.parse("fuse-attention").run(graph, PassContext())
    graph.dead_code_elimination()
    verify(graph)
    return before, graph, sum(r.rewrites for r in results)


def test_zeros_like_of_the_scores_becomes_new_zeros_of_an_input():
    before, after, rewrites = _fuse(HEAD + ZEROS_LIKE + TAIL.replace("{EXTRA}", ""))
    assert rewrites == 1 and not after.find("softmax") and not after.find("matmul")
    (zeros,) = [n for n in after.find("aten") if n.output.name == "z"]
    assert zeros.attrs.target == "aten.new_zeros.default"
    assert [value.name for value in zeros.inputs] == ["q"]  # for its device only
    assert "[1, 2, 8, 8]" in zeros.attrs.args and "float32" in zeros.attrs.args
    (attention,) = after.find("attention")
    assert attention.inputs[3].name == "b"  # the padding term stays a mask
    torch.manual_seed(0)
    inputs = [torch.randn(1, 2, 8, 16) for _ in range(3)] + [torch.rand(1, 1, 1, 8) > 0.5]
    assert_close(_evaluate(after, inputs), _evaluate(before, inputs))


def test_expand_as_of_the_scores_onto_themselves_reads_their_values():
    text = HEAD + EXPAND_AS_SELF + TAIL.replace("{EXTRA}", ", %e")
    text = text.replace("%pad: b8[1,1,1,8]", "%pad: f32[1,1,1,8]")
    before, after, rewrites = _fuse(text)
    assert rewrites == 0 and after == before
