"""Import an ONNX model into the IR.

Entry points: :func:`import_onnx` (-> :class:`~attnopt.ir.Graph`), :func:`capture_onnx_program`
(what the compile driver needs),
:class:`OnnxModule` (an ONNX model as an ``nn.Module``: ``attnopt.compile("model.onnx")`` wraps
the file in one; calling it runs the file in onnxruntime, the reference a compiled module is
compared with), :func:`example_inputs`.

The graph is imported for the example inputs' shapes: every ONNX dim is bound to a number, so
shape computations (``Shape``, ``Gather``, ``Concat``, ``ConstantOfShape``...) fold into
constants and ``Reshape``/``Expand`` targets become static ``reshape``/``expand`` attributes.
Any node whose inputs are all constants is evaluated at import (with the same torch reference
the op runs with), so masks built from shapes arrive as constant tensors, as torch.export's do.
Files are read and checked by :mod:`attnopt.frontend.onnx_load`. Standard ops become core IR
ops or ``aten`` calls (:mod:`attnopt.frontend.onnx_ops`); ONNX's
``Attention`` and onnxruntime's ``com.microsoft.Attention``/``MultiHeadAttention`` become
``scaled_dot_product_attention`` calls that ``fuse-attention`` takes over; an op without a
lowering becomes an ``onnx_node`` (:mod:`attnopt.ir.onnx_node`) that runs in onnxruntime.
An ``If`` whose condition folds to a constant is replaced by its branch; other control flow
(``If``/``Loop``/``Scan``) is refused with :class:`~attnopt.errors.CaptureError`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt.errors import CaptureError
from attnopt.frontend.onnx_load import (
    graph_inputs,
    input_dims,
    is_onnx_source,
    load_onnx,
    tensor_from_proto,
    torch_dtype,
)
from attnopt.ir import Graph, TensorType, Value, dtype_name
from attnopt.ir import onnx_node as _onnx_node  # noqa: F401 - registers the onnx_node op
from attnopt.ir.core_ops import AtenAttrs
from attnopt.ir.onnx_node import OnnxNodeAttrs
from attnopt.ir.ops import get_op

CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
# Ops whose results are not a function of their inputs: never evaluated at import.
_UNFOLDABLE = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
}
# Constants folded at import up to this many elements (larger ones stay ops of the graph).
_FOLD_LIMIT = 1 << 24

Operand = Value | torch.Tensor | None


class Importer:
    """One import: ONNX values -> IR values or constants, node by node (see the module doc)."""

    def __init__(self, proto: Any, opsets: dict[str, int]):
        self.proto = proto
        self.opsets = opsets
        self.opset = opsets.get("", 0)
        self.graph = Graph()
        self.env: dict[str, Operand] = {"": None}
        self.params: dict[int, Value] = {}
        self.names: dict[int, str] = {}  # initializer names, by tensor id
        self.weights: set[int] = set()  # tensors that are learned weights (see mark_weight)
        self.node: Any = None  # the ONNX node being lowered
        self.readers: dict[str, list[Any]] = {}  # ONNX value name -> nodes reading it
        self.absorbed: dict[str, Operand] = {}  # outputs of nodes a lowering already computed

    # --- operands ---------------------------------------------------------------------------
    def operand(self, name: str) -> Operand:
        """The IR value or constant tensor of ONNX value ``name`` ('' is an absent input)."""
        try:
            return self.env[name]
        except KeyError:
            raise CaptureError(f"{self.where()}: input {name!r} is not defined") from None

    def value(self, item: Operand, hint: str = "const") -> Value | None:
        """``item`` as an IR value (constants become ``param`` nodes, shared per tensor)."""
        if item is None or isinstance(item, Value):
            return item
        known = self.params.get(id(item))
        if known is None:
            known = self.graph.add_tensor(self.names.get(id(item), hint), item)
            self.params[id(item)] = known
            if id(item) in self.weights:
                self.graph.meta["parameters"].append(known.producer.attrs.name)
        return known

    def mark_weight(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Record ``tensor`` as a learned weight (``graph.meta["parameters"]``: passes treat it
        as a parameter, not as a constant mask they may analyse)."""
        self.weights.add(id(tensor))
        if name is not None:
            self.names[id(tensor)] = name
        return tensor

    def sole_reader(self, name: str) -> Any:
        """The one node that reads ONNX value ``name``, or None (several, none, or an output)."""
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def where(self) -> str:
        """The node being imported, for messages."""
        if self.node is None:
            return "ONNX graph"
        return f"ONNX node {self.node.name or '?'!r} ({self.node.op_type})"

    # --- emission ---------------------------------------------------------------------------
    def op(self, op: str, inputs: list[Operand], attrs: Any = None, hint: str = "") -> Any:
        """Emit (or, when every input is a constant, evaluate) one IR op.

        Returns:
            The output (a Value or a constant tensor), or a list of them for multi-output ops.
        """
        opdef = get_op(op)
        attrs = opdef.attrs() if attrs is None else attrs
        present = [x for x in inputs if x is not None]
        if present and all(isinstance(x, torch.Tensor) for x in present) and self._foldable():
            with torch.no_grad():
                result = opdef.impl(list(inputs), attrs)
            results = result if isinstance(result, (tuple, list)) else [result]
            if all(isinstance(r, torch.Tensor) and r.numel() <= _FOLD_LIMIT for r in results):
                return list(results) if isinstance(result, (tuple, list)) else result
        values = [self.value(x) for x in inputs]
        hint = hint or (self.node.output[0] if self.node is not None and self.node.output else op)
        count = opdef.output_count(attrs)
        node = self.graph.make_node(op, values, attrs, names=[hint] * count)
        if self.node is not None:
            node.meta["source"] = self.node.name or self.node.op_type
            module = _module_of(self.node)
            if module:
                node.meta["module"] = module
        if count > 1:
            node.meta["multi"] = True
        self.graph.append(node)
        return list(node.outputs) if count != 1 else node.output

    def aten(
        self, target: str, args: list[Any], kwargs: dict | None = None, outputs: int = 1
    ) -> Any:
        """Emit an ``aten`` call; Values and constant tensors in ``args`` become its inputs."""
        from attnopt.ir.aten_args import encode_template

        inputs: list[Operand] = []
        positions: dict[int, int] = {}

        def index(obj: Any) -> int | None:
            if not isinstance(obj, (Value, torch.Tensor)):
                return None
            if id(obj) not in positions:
                positions[id(obj)] = len(inputs)
                inputs.append(obj)
            return positions[id(obj)]

        template = json.dumps(encode_template([list(args), dict(kwargs or {})], index))
        return self.op("aten", inputs, AtenAttrs(target=target, args=template, outputs=outputs))

    def _foldable(self) -> bool:
        return self.node is None or self.node.op_type not in _UNFOLDABLE

    def opaque(self, inputs: list[Operand]) -> list[Operand]:
        """The current node as an ``onnx_node`` (run in onnxruntime), typed by one run."""
        from google.protobuf import json_format

        from attnopt.ir.onnx_node import run_onnx_node

        node = self.node
        probe = [
            None if x is None else (x if isinstance(x, torch.Tensor) else _zeros(x)) for x in inputs
        ]
        attrs = OnnxNodeAttrs(
            node=json_format.MessageToJson(node, indent=None, sort_keys=True),
            opsets=json.dumps(self.opsets, sort_keys=True),
        )
        try:
            results = run_onnx_node(probe, attrs)
        except Exception as err:  # noqa: BLE001 - onnxruntime's own message, named
            raise CaptureError(
                f"{self.where()} has no attnopt lowering and onnxruntime could not run it "
                f"alone ({type(err).__name__}: {' '.join(str(err).split())[:300]}); export the "
                "model without it, or file an issue naming the op"
            ) from None
        results = results if isinstance(results, tuple) else (results,)
        described = [[dtype_name(r.dtype), list(r.shape)] for r in results]
        attrs = OnnxNodeAttrs(node=attrs.node, opsets=attrs.opsets, outputs=json.dumps(described))
        if all(isinstance(x, torch.Tensor) for x in inputs if x is not None) and self._foldable():
            return list(results)
        out = self.op("onnx_node", inputs, attrs)
        return out if isinstance(out, list) else [out]


def _zeros(value: Value) -> torch.Tensor:
    return torch.zeros(value.shape, dtype=value.dtype)


def _module_of(node: Any) -> str | None:
    """The module path torch's exporters record: the dynamo exporter's name scopes
    (``['', 'encoder', 'encoder.layer.0', ..., 'softmax']``), or the TorchScript exporter's node
    node names (``/encoder/layer.0/attention/self/MatMul`` -> ``encoder.layer.0.attention.self``),
    else its output names."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            return (scopes[-2] or None) if len(scopes) >= 2 else None
    # onnxruntime's fused nodes keep the output name of the subgraph they replace.
    for name in (node.name, *node.output):
        if name.startswith("/"):
            return ".".join(p for p in name.split("/")[:-1] if p) or None
    return None


def bind_inputs(proto: Any, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The example tensor of each graph input and its index among ``(args, kwargs)``'s leaves.

    Positional inputs are the graph's inputs in order; keyword inputs name them.

    Raises:
        CaptureError: an input missing, unknown, of another dtype or rank, or a fixed dim that
            the example does not have.
    """
    inputs = graph_inputs(proto)
    names = [v.name for v in inputs]
    flat, _ = pytree.tree_flatten((args, kwargs))
    if len(flat) != len(args) + len(kwargs):
        raise CaptureError("ONNX inputs are tensors: pass a flat tuple or dict of tensors")
    bound: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    for index, tensor in enumerate(args):
        if index >= len(names):
            raise CaptureError(f"{len(args)} positional inputs for an ONNX graph of inputs {names}")
        bound[names[index]], positions[names[index]] = tensor, index
    for offset, (name, tensor) in enumerate(kwargs.items()):
        if name not in names:
            raise CaptureError(f"input {name!r} is not an input of the ONNX graph ({names})")
        bound[name], positions[name] = tensor, len(args) + offset
    for value in inputs:
        if value.name not in bound:
            raise CaptureError(f"ONNX input {value.name!r} is missing; the graph takes {names}")
        tensor = bound[value.name]
        if not isinstance(tensor, torch.Tensor):
            raise CaptureError(
                f"ONNX input {value.name!r} must be a tensor, not {type(tensor).__name__}"
            )
        expected = torch_dtype(value.type.tensor_type.elem_type, f"input {value.name!r}")
        dims = input_dims(value)
        if (
            tensor.dtype != expected
            or tensor.dim() != len(dims)
            or any(isinstance(d, int) and d != s for d, s in zip(dims, tensor.shape))
        ):
            raise CaptureError(
                f"ONNX input {value.name!r} is {dtype_name(expected)}{dims}; got "
                f"{dtype_name(tensor.dtype)}{list(tensor.shape)}"
            )
    return bound, [positions[v.name] for v in inputs]


def import_onnx(
    model: Any, args: tuple = (), kwargs: dict | None = None, *, name: str | None = None
) -> Graph:
    """Lower an ONNX model into an IR graph for the example inputs' shapes.

    Args:
        model: a path or ``onnx.ModelProto``.
        args: example inputs in the graph's input order.
        kwargs: example inputs by ONNX input name. Without any example, every input dim must be
            a fixed number in the file.
        name: the graph's model name (default: the graph's name).

    Returns:
        The graph: inputs are the ONNX graph's inputs, outputs its outputs.

    Raises:
        CaptureError: see :func:`load_onnx`; control flow; dynamic dims without an example; a
            node onnxruntime cannot run alone.
    """
    proto = load_onnx(model)
    kwargs = dict(kwargs or {})
    if not args and not kwargs:
        kwargs = _static_example(proto)
    bound, _ = bind_inputs(proto, tuple(args), kwargs)
    return _import_bound(proto, bound, name)


def _static_example(proto: Any) -> dict[str, torch.Tensor]:
    example = {}
    for value in graph_inputs(proto):
        dims = input_dims(value)
        if not all(isinstance(d, int) for d in dims):
            raise CaptureError(
                f"ONNX input {value.name!r} has dynamic dims {dims}: attnopt imports an ONNX graph "
                f"for given shapes; pass example inputs, e.g. "
                f"attnopt.capture(path, kwargs={{{value.name!r}: tensor}})"
            )
        dtype = torch_dtype(value.type.tensor_type.elem_type, f"input {value.name!r}")
        example[value.name] = torch.zeros(dims, dtype=dtype)
    return example


def _import_bound(proto: Any, bound: dict[str, torch.Tensor], name: str | None) -> Graph:
    opsets = {
        ("" if e.domain == "ai.onnx" else e.domain): int(e.version) for e in proto.opset_import
    }
    im = Importer(proto, opsets)
    graph = im.graph
    graph.meta["model"] = name or proto.graph.name or "onnx"
    graph.meta["user_inputs"] = []
    for value in graph_inputs(proto):
        tensor = bound[value.name]
        ident = "".join(c if c.isalnum() or c == "_" else "_" for c in value.name) or "input"
        im.env[value.name] = graph.add_input(ident, TensorType.of(tensor))
        graph.meta["user_inputs"].append(value.name)
    graph.meta["parameters"] = []
    for tensor in proto.graph.initializer:
        value = tensor_from_proto(tensor)
        im.env[tensor.name] = value
        im.names[id(value)] = tensor.name
        # ONNX does not say which initializers are weights: floating vectors and matrices are
        # (projections, norms, embeddings); constant masks and shapes are not.
        if value.is_floating_point() and value.dim() in (1, 2):
            im.mark_weight(value)
    for node in proto.graph.node:
        for name in node.input:
            im.readers.setdefault(name, []).append(node)
    for value in proto.graph.output:
        im.readers.setdefault(value.name, []).append(None)
    _lower_nodes(im, proto.graph.node)
    im.node = None
    for value in proto.graph.output:
        out = im.operand(value.name)
        graph.outputs.append(im.value(out, value.name))
    graph.dead_code_elimination()
    return graph


def _lower_nodes(im: Importer, nodes: Any) -> None:
    """Lower ``nodes`` in order; an ``If`` whose condition folded to a constant is replaced by the
    branch it takes (shape checks of exports fold that way), other control flow is refused."""
    from attnopt.frontend.onnx_ops import lower_node

    for node in nodes:
        im.node = node
        condition = im.operand(node.input[0]) if node.op_type == "If" else None
        if isinstance(condition, torch.Tensor) and condition.numel() == 1:
            branches = {a.name: a.g for a in node.attribute}
            branch = branches["then_branch" if bool(condition) else "else_branch"]
            for tensor in branch.initializer:
                im.env[tensor.name] = tensor_from_proto(tensor)
            _lower_nodes(im, branch.node)
            outputs = [im.operand(value.name) for value in branch.output]
        elif node.op_type in CONTROL_FLOW:
            raise CaptureError(
                f"{im.where()}: control flow ({node.op_type}) that depends on the inputs' "
                "values; attnopt imports dataflow graphs, where attention can be proven. Export "
                "without data-dependent control flow (torch.onnx.export(dynamo=True) traces one "
                "path), or fold it first (onnxsim, or onnx's constant folding)"
            )
        else:
            outputs = lower_node(im, node, [im.operand(name) for name in node.input])
        for out_name, out in zip(node.output, outputs):
            if out_name:
                im.env[out_name] = out


class OnnxModule(torch.nn.Module):
    """An ONNX model as a module: ``forward`` runs the file in onnxruntime (CPU).

    ``attnopt.compile(path)`` compiles it (see :func:`capture_onnx_program`); calling this module
    is the reference the compiled one is checked against. Positional inputs are the graph's
    inputs in order; keyword inputs name them. Returns the one output, or a tuple of them.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.proto = load_onnx(model)
        self.path = None if not isinstance(model, (str, os.PathLike)) else Path(model)
        self.input_names = [v.name for v in graph_inputs(self.proto)]
        self.output_names = [v.name for v in self.proto.graph.output]
        self._session: Any = None
        self.eval()  # an inference graph: no dropout to turn off, but say so to callers

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Run the ONNX model in onnxruntime on these inputs."""
        import onnxruntime

        bound, _ = bind_inputs(self.proto, args, kwargs)
        if self._session is None:
            data = self.proto.SerializeToString()
            self._session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        feeds = {n: t.detach().cpu().numpy() for n, t in bound.items()}
        outputs = [torch.from_numpy(o) for o in self._session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the onnxruntime session (made again on the first call)."""
        state = super().__getstate__()
        return {**state, "_session": None}

    def __repr__(self) -> str:
        where = self.path or self.proto.graph.name
        return f"OnnxModule({where}, inputs={self.input_names}, outputs={self.output_names})"


def capture_onnx_program(module: OnnxModule, args: tuple, kwargs: dict) -> Any:
    """Import ``module``'s ONNX graph for these inputs, as the compile driver's capture.

    Args:
        module: the ONNX model.
        args: positional inputs (the graph's inputs in order).
        kwargs: keyword inputs by ONNX input name.

    Returns:
        A :class:`~attnopt.frontend.capture.CapturedProgram` (method ``"onnx"``, static shapes).
    """
    from attnopt.frontend.capture import CapturedProgram

    start = time.perf_counter()
    bound, positions = bind_inputs(module.proto, tuple(args), dict(kwargs))
    name = module.path.stem if module.path is not None else None
    graph = _import_bound(module.proto, bound, name)
    _, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    outputs = len(graph.outputs)
    _, out_spec = pytree.tree_flatten(0 if outputs == 1 else tuple(range(outputs)))
    return CapturedProgram(
        graph=graph,
        in_spec=in_spec,
        input_positions=positions,
        out_spec=out_spec,
        method="onnx",
        seconds=time.perf_counter() - start,
    )


def example_inputs(model: Any, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Example inputs for an ONNX model: dims named like ``batch`` get ``batch``, other dynamic
    dims ``seq``; integer inputs are ones (a valid token id, mask value and segment id), float
    inputs standard normal.

    Args:
        model: a path, ``ModelProto`` or :class:`OnnxModule`.
        batch: size of batch dims.
        seq: size of the other dynamic dims.

    Returns:
        Keyword inputs by ONNX input name.
    """
    proto = model.proto if isinstance(model, OnnxModule) else load_onnx(model)
    generator = torch.Generator().manual_seed(0)
    example: dict[str, torch.Tensor] = {}
    for value in graph_inputs(proto):
        dims = [
            d if isinstance(d, int) else (batch if "batch" in d.lower() or i == 0 else seq)
            for i, d in enumerate(input_dims(value))
        ]
        dtype = torch_dtype(value.type.tensor_type.elem_type, f"input {value.name!r}")
        if dtype.is_floating_point:
            example[value.name] = torch.randn(dims, generator=generator).to(dtype)
        else:
            example[value.name] = torch.ones(dims, dtype=dtype)
    return example


__all__ = [
    "Importer",
    "OnnxModule",
    "capture_onnx_program",
    "example_inputs",
    "import_onnx",
    "is_onnx_source",
    "load_onnx",
]
