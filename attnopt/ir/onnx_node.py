"""The ``onnx_node`` op: one ONNX node attnopt does not lower, run as a one-node ONNX model.

Entry point: :class:`OnnxNodeAttrs`. Importing this module registers ``onnx_node`` (imported by
:mod:`attnopt.ir`, like the other built-in ops).

The ONNX importer (:mod:`attnopt.frontend.onnx_import`) turns an op it has no lowering for into
this op instead of failing: the node (as protobuf JSON), its opset imports and its output types
are attributes, so the IR text stays self-contained. The reference implementation runs the node
in onnxruntime's CPU provider (or onnx's reference evaluator when onnxruntime is missing);
inputs and outputs are torch tensors. Output types are those recorded at import (shapes are
static: ONNX graphs are imported for the example's shapes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnopt.ir.ops import OpDef, register_op
from attnopt.ir.types import TensorType, Type, dtype_from_name


@dataclass(frozen=True)
class OnnxNodeAttrs:
    """``onnx_node``: an ONNX node run as it is.

    Attributes:
        node: the ``onnx.NodeProto`` as protobuf JSON.
        opsets: JSON object ``{domain: version}`` of the model's opset imports.
        outputs: JSON list of ``[dtype name, shape]`` per output.
    """

    node: str
    opsets: str = "{}"
    outputs: str = "[]"


def _output_types(attrs: OnnxNodeAttrs) -> list[Type]:
    return [
        TensorType(tuple(shape), dtype_from_name(dtype))
        for dtype, shape in json.loads(attrs.outputs)
    ]


_SESSIONS: dict[tuple, Any] = {}
_SESSIONS_LIMIT = 256


def run_onnx_node(
    inputs: Sequence[torch.Tensor | None], attrs: OnnxNodeAttrs
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run the node of ``attrs`` on ``inputs`` (CPU) and return its outputs as torch tensors.

    Args:
        inputs: the node's inputs (None for an absent optional input).
        attrs: the node, its opsets and its output types.

    Returns:
        The output, or a tuple of the outputs in the node's output order.
    """
    import numpy as np

    arrays = [None if x is None else x.detach().cpu().numpy() for x in inputs]
    key = (attrs, tuple(None if a is None else (a.dtype.str, a.shape) for a in arrays))
    runner = _SESSIONS.get(key)
    if runner is None:
        runner = _build_runner(attrs, arrays)
        if len(_SESSIONS) >= _SESSIONS_LIMIT:
            _SESSIONS.clear()
        _SESSIONS[key] = runner
    feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None}
    results = runner(feeds)
    device = next((x.device for x in inputs if x is not None), torch.device("cpu"))
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(r)).to(device) for r in results)
    return tensors[0] if len(tensors) == 1 else tensors


def _build_runner(attrs: OnnxNodeAttrs, arrays: list[Any]) -> Any:
    import onnx
    from google.protobuf import json_format
    from onnx import helper

    node = json_format.Parse(attrs.node, onnx.NodeProto())
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    outputs = [f"out{i}" for i in range(len(node.output))]
    del node.input[:]
    node.input.extend(names)
    del node.output[:]
    node.output.extend(outputs)
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for name, a in zip(names, arrays)
        if a is not None
    ]
    graph_outputs = [onnx.ValueInfoProto(name=name) for name in outputs]  # typed by inference
    graph = helper.make_graph([node], "onnx_node", graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid(d, v) for d, v in json.loads(attrs.opsets).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        return lambda feeds: evaluator.run(None, feeds)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda feeds: session.run(None, feeds)


register_op(
    OpDef(
        "onnx_node",
        OnnxNodeAttrs,
        run_onnx_node,
        num_outputs=lambda attrs: len(json.loads(attrs.outputs)),
        infer=lambda types, attrs: _output_types(attrs),
    )
)

__all__ = ["OnnxNodeAttrs", "run_onnx_node"]
