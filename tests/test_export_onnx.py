"""``attnopt.export_onnx``: a compiled program as an ONNX file that passes the full checker,
keeps dense attention as the standard ``Attention`` op, has dynamic batch and sequence axes, and
computes in onnxruntime what attnopt computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.utils._pytree as pytree

import attnopt
from attnopt.errors import BackendError
from tests import zoo
from tests.helpers import zoo_model


def _graph_inputs(cm, args, kwargs):
    entry = cm.symbolic_entry() or cm._latest()
    flat, _ = pytree.tree_flatten((args, kwargs))
    return [flat[i] for i in entry.captured.input_positions]


def _check(cm, path, shapes, name):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in shapes:
        args, kwargs = zoo.get(name).example(batch, seq)
        feeds = {
            spec.name: value.numpy()
            for spec, value in zip(session.get_inputs(), _graph_inputs(cm, args, kwargs))
        }
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            want = zoo.primary_output(cm(*args, **kwargs)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    return {node.op_type for node in model.graph.node}


ZOO = ["bert", "encoder_layer", "gpt2", "llama", "mha", "minilm", "swin", "t5", "vit"]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_exports_and_onnxruntime_matches(name, tmp_path):
    impl = "sdpa" if zoo.get(name).hf else None
    model = zoo_model(name, impl)
    cm = attnopt.compile(model, *zoo.get(name).example(2, 8), passes="exact")
    path = attnopt.export_onnx(cm, tmp_path / f"{name}.onnx")
    # Symbolic programs export dynamic axes: another batch and length run from the same file.
    shapes = [(2, 8), (3, 11)] if cm.symbolic_entry() is not None else [(2, 8)]
    ops = _check(cm, path, shapes, name)
    assert "Attention" in ops, f"dense attention should be the standard Attention op: {ops}"
    assert "Softmax" not in ops


@pytest.mark.parametrize(
    "passes, variant",
    [
        ("sliding-window{window=4,sinks=1}", "sliding_window"),
        ("linearize", "linear"),
        ("head-prune{keep=0.5}", "dense"),
    ],
)
def test_rewritten_compiles_export_and_match(passes, variant, tmp_path):
    model = zoo_model("bert", "sdpa")
    cm = attnopt.compile(
        model, *zoo.get("bert").example(2, 8), passes=f"canonicalize,fuse-attention,{passes}"
    )
    assert {site.variant for site in cm.sites} == {variant}
    path = attnopt.export_onnx(cm, tmp_path / "bert.onnx")
    _check(cm, path, [(2, 8), (3, 11)], "bert")


def test_what_cannot_be_exported_is_named(tmp_path):
    model = zoo_model("bert", "sdpa")
    args, kwargs = zoo.get("bert").example(2, 8)
    packed = attnopt.compile(
        model, args, kwargs, passes="canonicalize,fuse-attention,remove-padding"
    )
    with pytest.raises(BackendError, match="padding removal"):
        attnopt.export_onnx(packed, tmp_path / "packed.onnx")
    with pytest.raises(BackendError, match="nothing compiled yet"):
        attnopt.export_onnx(attnopt.compile(model), tmp_path / "empty.onnx")
    with pytest.raises(TypeError, match="CompiledModule"):
        attnopt.export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_onnx_out(tmp_path, capsys):
    from attnopt.cli import main

    out = tmp_path / "vit.onnx"
    assert (
        main(
            ["compile", "vit", "--impl", "sdpa", "--out", str(tmp_path / "o")]
            + ["--onnx-out", str(out)]
        )
        == 0
    )
    assert "ONNX ->" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
