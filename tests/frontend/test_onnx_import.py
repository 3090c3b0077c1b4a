"""ONNX import (#19): graphs from torch's legacy and dynamo exporters and from onnxruntime's
transformer optimizer are lowered into the IR, every attention site is detected, and the compiled
module matches onnxruntime on the same file; bad inputs raise CaptureError."""

from __future__ import annotations

import importlib.util
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import attnopt
from attnopt.frontend.onnx_import import OnnxModule, example_inputs
from tests.zoo import get

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

TOLERANCE = 1e-4
LAYERS = 2  # every zoo model here has two layers
SHAPES = {"bert": (2, 8), "gpt2": (2, 8), "vit": (2, 0)}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    batch, seq = SHAPES[name]
    _, kwargs = get(name).example(batch, seq)
    if name == "gpt2":  # an explicit mask: the legacy exporter cannot trace the default one
        kwargs = {**kwargs, "attention_mask": torch.ones_like(kwargs["input_ids"])}
    return kwargs


class _Positional(torch.nn.Module):
    """The model called with keyword inputs in a fixed order, returning its first output."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs)), return_dict=False)[0]


def _export(name: str, how: str, path: str) -> None:
    """``how``: the exporter ("legacy" or "dynamoNN", opset NN); "-sdpa" exports the model's
    SDPA attention, which exporters below opset 23 decompose into MatMul/Softmax followed by
    ``Where(IsNaN(weights), 0, weights)``."""
    impl = "sdpa" if how == "dynamo23" or how.endswith("-sdpa") else "eager"
    how = how.removesuffix("-sdpa")
    model = get(name).build(impl).eval()
    kwargs = _inputs(name)
    names = list(kwargs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if how == "legacy":
            torch.onnx.export(
                _Positional(model, names), tuple(kwargs.values()), path, dynamo=False,
                opset_version=17, input_names=names, output_names=["out"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} if n != "pixel_values" else {0: "batch"} for n in names},
            )  # fmt: skip
        else:
            program = torch.onnx.export(
                _Positional(model, names), tuple(kwargs.values()), dynamo=True,
                opset_version=int(how.removeprefix("dynamo")), input_names=names,
                output_names=["out"], verbose=False,
            )  # fmt: skip
            program.save(path)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    made: dict[tuple[str, str], str] = {}

    def make(name: str, how: str) -> str:
        if (name, how) not in made:
            path = str(tmp_path_factory.mktemp("onnx") / f"{name}_{how}.onnx")
            if how == "ort":
                from onnxruntime.transformers.optimizer import optimize_model

                optimized = optimize_model(
                    make(name, "legacy"), model_type=name, num_heads=4, hidden_size=32,
                    opt_level=0, use_gpu=False,
                )  # fmt: skip
                optimized.save_model_to_file(path)
            else:
                _export(name, how, path)
            made[name, how] = path
        return made[name, how]

    return make


def _ops(path: str) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for node in onnx.load(path).graph.node:
        key = (node.domain or "", node.op_type)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize(
    "name, how",
    [
        (name, how)
        for name in ("bert", "gpt2", "vit")
        for how in ("legacy", "dynamo18", "dynamo23", "ort")
    ]
    + [("bert", "legacy-sdpa"), ("vit", "legacy-sdpa")],
)
def test_detects_every_site_and_matches_onnxruntime(onnx_file, name, how):
    path = onnx_file(name, how)
    ops = _ops(path)
    if how == "dynamo23":
        assert ops.get(("", "Attention")) == LAYERS  # the exporter's standard Attention op
    if how == "ort" and name == "bert":
        assert ops.get(("com.microsoft", "Attention")) == LAYERS
    kwargs = _inputs(name)
    cm = attnopt.compile(path, kwargs=kwargs)
    assert len(cm.sites) == LAYERS, cm.explain()
    assert not cm.graph.find("onnx_node")  # every op lowered
    # q, k, v, output and two MLP projections per layer (GPT-2: fused qkv, + the LM head)
    assert len(cm.graph.find("linear")) == {"bert": 12, "gpt2": 9, "vit": 12}[name]
    modules = [site.module for site in cm.sites]  # from the exporters' names
    assert None not in modules and len(set(modules)) == LAYERS, modules
    if name == "gpt2":
        assert all(site.causal for site in cm.sites)
    expected = OnnxModule(path)(**kwargs)
    torch.testing.assert_close(cm(**kwargs), expected, rtol=0, atol=TOLERANCE)


def test_decomposed_sdpa_zeroes_nan_weights_like_onnxruntime(onnx_file):
    """The dynamo exporter at opset 18 decomposes SDPA with ``Where(IsNaN(w), 0, w)``: the site
    fuses with ``nan_weights_zero`` (NaN inputs: tests/passes/test_attention_variants.py)."""
    path = onnx_file("bert", "dynamo18-sdpa")
    assert _ops(path).get(("", "IsNaN")) == LAYERS
    kwargs = _inputs("bert")
    cm = attnopt.compile(path, kwargs=kwargs)
    assert len(cm.sites) == LAYERS, cm.explain()
    assert all(n.attrs.nan_weights_zero for n in cm.graph.find("attention"))
    torch.testing.assert_close(cm(**kwargs), OnnxModule(path)(**kwargs), rtol=0, atol=TOLERANCE)


def test_new_shapes_compile_again_and_match(onnx_file):
    path = onnx_file("bert", "legacy")
    cm = attnopt.compile(path)
    reference = OnnxModule(path)
    for batch, seq in ((2, 8), (3, 12)):
        _, kwargs = get("bert").example(batch, seq)
        torch.testing.assert_close(cm(**kwargs), reference(**kwargs), rtol=0, atol=TOLERANCE)
    assert cm.stats["compilations"] == 2
    assert not reference.training
    report = attnopt.validate(reference, cm, kwargs=kwargs, tolerance="exact-elementwise")
    assert report.ok and len(report.sites) == LAYERS
    restored = pickle.loads(pickle.dumps(cm))  # the file travels as its ModelProto
    torch.testing.assert_close(restored(**kwargs), cm(**kwargs), rtol=0, atol=TOLERANCE)


def test_capture_returns_the_ir(onnx_file):
    graph = attnopt.capture(onnx_file("vit", "legacy"), kwargs=_inputs("vit"))
    assert isinstance(graph, attnopt.ir.Graph)
    assert len(graph.find("softmax")) == LAYERS
    assert attnopt.ir.parse(str(graph)) == graph


# --- hand-built graphs: contrib attention, opset-23 Attention forms, opaque ops --------------
def _model(nodes, inputs, outputs, initializers=(), opset=17, contrib=False):
    opsets = [helper.make_opsetid("", opset)]
    if contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _array(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def _run_both(model, feeds, sites=1, atol=TOLERANCE):
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    cm = attnopt.compile(model, kwargs=kwargs)
    assert len(cm.sites) == sites, cm.explain()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(cm(**kwargs), expected, rtol=0, atol=atol)
    return cm


def _rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("mask_form", ["end_positions", "raw"])
@pytest.mark.parametrize("unidirectional", [0, 1])
def test_contrib_attention(mask_form, unidirectional):
    rng, batch, seq, hidden, heads = _rng(), 2, 6, 16, 2
    lengths = np.array([6, 4], dtype=np.int32)
    if mask_form == "raw":
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        mask[1, 0] = 0  # not only right padding
        mask_info = _info("mask", TensorProto.INT32, [batch, seq])
    else:
        mask, mask_info = lengths, _info("mask", TensorProto.INT32, [batch])
    node = helper.make_node(
        "Attention", ["x", "w", "b", "mask"], ["y"], domain="com.microsoft", num_heads=heads,
        unidirectional=unidirectional,
    )  # fmt: skip
    model = _model(
        [node],
        [_info("x", TensorProto.FLOAT, [batch, seq, hidden]), mask_info],
        [_info("y", TensorProto.FLOAT, [batch, seq, hidden])],
        [
            _array("w", rng.standard_normal((hidden, 3 * hidden)).astype(np.float32) * 0.3),
            _array("b", rng.standard_normal(3 * hidden).astype(np.float32)),
        ],
        contrib=True,
    )
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    cm = _run_both(model, {"x": x, "mask": mask})
    assert cm.sites[0].num_heads == heads


def test_contrib_multi_head_attention():
    rng, batch, seq, kv_len, hidden, heads = _rng(), 2, 5, 7, 16, 4
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v", "bias", "pad"], ["y"], domain="com.microsoft",
        num_heads=heads,
    )  # fmt: skip
    model = _model(
        [node],
        [
            _info("q", TensorProto.FLOAT, [batch, seq, hidden]),
            _info("k", TensorProto.FLOAT, [batch, kv_len, hidden]),
            _info("v", TensorProto.FLOAT, [batch, kv_len, hidden]),
            _info("pad", TensorProto.INT32, [batch, kv_len]),
        ],
        [_info("y", TensorProto.FLOAT, [batch, seq, hidden])],
        [_array("bias", rng.standard_normal(3 * hidden).astype(np.float32))],
        contrib=True,
    )
    pad = np.ones((batch, kv_len), dtype=np.int32)
    pad[1, 5:] = 0
    feeds = {
        "q": rng.standard_normal((batch, seq, hidden)).astype(np.float32),
        "k": rng.standard_normal((batch, kv_len, hidden)).astype(np.float32),
        "v": rng.standard_normal((batch, kv_len, hidden)).astype(np.float32),
        "pad": pad,
    }
    cm = _run_both(model, feeds)
    assert cm.sites[0].kind == "cross"


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_opset23_attention_3d_gqa_causal(softcap):
    rng, batch, seq, q_heads, kv_heads, dim = _rng(), 2, 6, 4, 2, 8
    node = helper.make_node(
        "Attention", ["q", "k", "v", "mask"], ["y"], q_num_heads=q_heads, kv_num_heads=kv_heads,
        is_causal=1, softcap=softcap,
    )  # fmt: skip
    model = _model(
        [node],
        [
            _info("q", TensorProto.FLOAT, [batch, seq, q_heads * dim]),
            _info("k", TensorProto.FLOAT, [batch, seq, kv_heads * dim]),
            _info("v", TensorProto.FLOAT, [batch, seq, kv_heads * dim]),
            _info("mask", TensorProto.BOOL, [batch, 1, seq, seq]),
        ],
        [_info("y", TensorProto.FLOAT, [batch, seq, q_heads * dim])],
        opset=23,
    )
    mask = np.ones((batch, 1, seq, seq), dtype=bool)  # onnxruntime needs the query dim
    mask[1, ..., 4:] = False
    feeds = {
        "q": rng.standard_normal((batch, seq, q_heads * dim)).astype(np.float32),
        "k": rng.standard_normal((batch, seq, kv_heads * dim)).astype(np.float32),
        "v": rng.standard_normal((batch, seq, kv_heads * dim)).astype(np.float32),
        "mask": mask,
    }
    cm = _run_both(model, feeds)
    assert (cm.sites[0].num_heads, cm.sites[0].num_kv_heads) == (q_heads, kv_heads)
    assert cm.sites[0].causal


def test_unknown_op_runs_in_onnxruntime():
    node = helper.make_node("HardSwish", ["x"], ["h"])
    softmax = helper.make_node("Softmax", ["h"], ["y"], axis=-1)
    model = _model(
        [node, softmax],
        [_info("x", TensorProto.FLOAT, [2, 5])],
        [_info("y", TensorProto.FLOAT, [2, 5])],
    )
    x = _rng().standard_normal((2, 5)).astype(np.float32) * 4
    cm = _run_both(model, {"x": x}, sites=0)
    (opaque,) = cm.graph.find("onnx_node")
    assert json.loads(opaque.attrs.node)["opType"] == "HardSwish"
    assert attnopt.ir.parse(str(cm.graph), cm.graph.tensors) == cm.graph


def _i64(name, values):
    return _array(name, np.asarray(values, dtype=np.int64))


# (node, extra initializers, input shape): each standard op alone, against onnxruntime.
SINGLE_OPS = {
    "flatten_negative_axis": (helper.make_node("Flatten", ["x"], ["y"], axis=-1), [], [2, 3, 4]),
    "split_num_outputs": (
        helper.make_node("Split", ["x"], ["y", "z"], axis=2, num_outputs=2), [], [2, 3, 5]
    ),
    "slice_negative": (
        helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"]),
        [_i64("s", [-4, 0]), _i64("e", [10**12, -1]), _i64("a", [2, 1]), _i64("st", [2, 1])],
        [2, 3, 5],
    ),
    "squeeze": (helper.make_node("Squeeze", ["x", "a"], ["y"]), [_i64("a", [1])], [2, 1, 5]),
    "unsqueeze": (
        helper.make_node("Unsqueeze", ["x", "a"], ["y"]), [_i64("a", [-1, 0])], [2, 3, 5]
    ),
    "gemm": (
        helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transA=1),
        [_array("w", np.ones((2, 4), np.float32)), _array("c", np.ones((1, 4), np.float32))],
        [2, 3],
    ),
    "expand_bidirectional": (
        helper.make_node("Expand", ["x", "s"], ["y"]), [_i64("s", [4, 1, 1])], [1, 3, 5]
    ),
    "trilu_lower_k": (
        helper.make_node("Trilu", ["x", "k"], ["y"], upper=0), [_i64("k", 1)], [2, 4, 4]
    ),
    "reduce_mean_axes_input": (
        helper.make_node("ReduceMean", ["x", "a"], ["y"], keepdims=0), [_i64("a", [0, -1])],
        [2, 3, 5],
    ),
    "gather_negative": (
        helper.make_node("Gather", ["x", "i"], ["y"], axis=1), [_i64("i", [[-1, 0], [1, 1]])],
        [2, 3, 5],
    ),
    "reshape_zero": (
        helper.make_node("Reshape", ["x", "s"], ["y"]), [_i64("s", [0, -1])], [2, 3, 5]
    ),
    "layer_norm": (
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-2, epsilon=1e-3),
        [_array("g", np.full((3, 5), 2, np.float32)), _array("b", np.ones((3, 5), np.float32))],
        [2, 3, 5],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_standard_op_matches_onnxruntime(case):
    node, initializers, shape = SINGLE_OPS[case]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
    model = _model([node], [_info("x", TensorProto.FLOAT, shape)], outputs, initializers, opset=18)
    x = _rng().standard_normal(shape).astype(np.float32)
    kwargs = {"x": torch.from_numpy(x)}
    cm = attnopt.compile(model, kwargs=kwargs, passes="none")
    assert not cm.graph.find("onnx_node")  # lowered, not run by onnxruntime
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [torch.from_numpy(e) for e in session.run(None, {"x": x})]
    got = cm(**kwargs)
    got = list(got) if isinstance(got, tuple) else [got]
    for value, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-5)


# --- round trip --------------------------------------------------------------------------------
def test_round_trip_cli(onnx_file, tmp_path, capsys):
    from attnopt.cli import main

    source = onnx_file("bert", "ort")
    out = tmp_path / "optimised.onnx"
    argv = ["compile", source, "--batch", "2", "--seq", "8", "--passes", "exact"]
    assert main([*argv, "--onnx-out", str(out), "--out", str(tmp_path / "art")]) == 0
    assert "2 attention sites" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _ops(str(out)).get(("", "Attention")) == LAYERS
    kwargs = example_inputs(source, batch=2, seq=8)
    kwargs["attention_mask"][1, 5:] = 0
    exported = OnnxModule(out)(*kwargs.values())  # attnopt's export names inputs by position
    torch.testing.assert_close(exported, OnnxModule(source)(**kwargs), rtol=0, atol=TOLERANCE)


# --- bad inputs --------------------------------------------------------------------------------
def _softmax_model(opset):
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    return _model(
        [node], [_info("x", TensorProto.FLOAT, [2, 3])], [_info("y", TensorProto.FLOAT, [2, 3])],
        opset=opset,
    )  # fmt: skip


def test_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(attnopt.CaptureError, match="is not an ONNX model"):
        attnopt.capture(path)
    with pytest.raises(attnopt.CaptureError, match="no such ONNX file"):
        attnopt.compile(tmp_path / "missing.onnx")


@pytest.mark.parametrize("opset", [11, onnx.defs.onnx_opset_version() + 1])
def test_opset_out_of_range(opset):
    with pytest.raises(attnopt.CaptureError, match=f"opset {opset}.*(convert_version|upgrade)"):
        attnopt.capture(_softmax_model(opset))


def test_missing_external_data(tmp_path):
    weight = _array("w", np.ones((64, 64), dtype=np.float32))
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = _model(
        [node], [_info("x", TensorProto.FLOAT, [2, 64])], [_info("y", TensorProto.FLOAT, [2, 64])],
        [weight],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").is_file()
    assert attnopt.capture(path).find("linear")  # with its data it imports
    (tmp_path / "m.data").unlink()
    with pytest.raises(attnopt.CaptureError, match=r"'w'.*'m\.data'.*missing"):
        attnopt.capture(path)


def _if_model(condition_from_input: bool):
    def branch(name, scale):
        nodes = [
            helper.make_node("Mul", ["x", f"{name}_scale"], [f"{name}_s"]),
            helper.make_node("Softmax", [f"{name}_s"], [f"{name}_out"], axis=-1),
        ]
        outputs = [_info(f"{name}_out", TensorProto.FLOAT, [2, 3])]
        scales = [_array(f"{name}_scale", np.float32(scale))]
        return helper.make_graph(nodes, name, [], outputs, scales)

    nodes = [helper.make_node("If", ["c"], ["y"], name="gate", then_branch=branch("then", 2.0),
                              else_branch=branch("else", 0.5))]  # fmt: skip
    inputs = [_info("x", TensorProto.FLOAT, [2, 3])]
    if condition_from_input:
        inputs.append(_info("c", TensorProto.BOOL, []))
    else:
        nodes.insert(0, helper.make_node("Constant", [], ["c"], value=_array("v", np.bool_(False))))
    return _model(nodes, inputs, [_info("y", TensorProto.FLOAT, [2, 3])])


def test_if_on_a_constant_takes_its_branch():
    model = _if_model(condition_from_input=False)
    x = _rng().standard_normal((2, 3)).astype(np.float32)
    cm = _run_both(model, {"x": x}, sites=0)
    (scale,) = [n for n in cm.graph.nodes if n.op == "mul"]
    assert scale.attrs.scalar == 0.5  # the else branch


def test_control_flow_is_refused():
    with pytest.raises(attnopt.CaptureError, match=r"'gate' \(If\).*control flow.*values"):
        attnopt.capture(_if_model(condition_from_input=True), kwargs={
            "x": torch.zeros(2, 3), "c": torch.tensor(True)})  # fmt: skip


def test_dynamic_dims_need_examples(onnx_file):
    with pytest.raises(attnopt.CaptureError, match="dynamic dims.*pass example inputs"):
        attnopt.capture(onnx_file("bert", "legacy"))


def test_example_script():
    path = Path(__file__).resolve().parents[2] / "examples" / "onnx_import.py"
    spec = importlib.util.spec_from_file_location("onnx_import_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    assert result["sites"] == 2
    assert result["max_abs_diff"] <= TOLERANCE
