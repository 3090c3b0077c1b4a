"""``precision``: run a fused graph in bf16 where the CPU computes bf16 natively.

Entry points: :class:`Precision`, :func:`native_bf16`.

What the pass does to a graph (after ``fuse-attention`` and any lossy attention pass):

- **Weights once, at compile time.** Every projection (``linear``, ``aten.addmm`` as GPT-2's
  Conv1D writes it, ``aten.conv2d`` patch embeddings) whose weight is a graph tensor reads a bf16
  copy made by the pass and kept in ``graph.tensors`` (``<name>.bf16``, a ``param`` node); so do
  the other graph tensors a bf16 op reads (biases, norm-free scales, position tables). Nothing
  converts a weight per call. The copies are taken when compiling: a model whose weights change
  afterwards must be compiled again.
- **Activations change type at the edges of the bf16 region, once.** The region grows forward from
  the projections: an op any of whose inputs is bf16 runs in bf16 when it is in the allow-list
  below (its fp32 inputs are cast down once per value, before their first such reader); any other
  op gets its bf16 inputs cast back to fp32. Graph outputs are cast back to the model's dtype.
  Values that never meet a projection (token ids, masks, position and rotary tables, relative
  position biases) keep their type, and the model's own casts to fp32 (LLaMA's and T5's RMSNorm)
  stay where they are, so those statistics run in fp32.
- **Attention** takes bf16 q/k/v (SDPA's CPU flash kernel runs bf16 with fp32 softmax
  statistics). Boolean masks stay as they are; an additive mask or bias goes bf16 with its finite
  values clamped into bf16's range (``-inf`` stays ``-inf``): the finite fill of Hugging Face
  masks (``finfo(float32).min``) would round to ``-inf`` in bf16, and a row whose keys are all
  masked would lose eager's uniform average. A mask that selects between constants
  (``where(keep, 0, fill)``) selects between clamped bf16 constants made at compile time; any
  other is clamped and cast once per forward.
- **LayerNorm** gets a bf16 input and keeps fp32 weight and bias: torch's CPU kernel computes the
  mean and variance in fp32 and applies fp32 affine parameters (measured on random data: max
  error 0.018 against an fp64 reference with fp32 parameters, 0.026 with bf16 ones; rounding the
  input to bf16 alone costs 0.018).
- **Residual stream**: ``residual="bf16"`` (default) keeps it in bf16, so a transformer layer has
  no casts at all inside; ``residual="fp32"`` keeps residual adds and the norms after them in
  fp32 (one cast down before each GEMM input, one up after each GEMM output), for models whose
  error is out of budget otherwise.

Sites whose attention variant has no bf16 kernel here (see :data:`BF16_VARIANTS`) and the layers
named in ``keep_fp32`` stay fp32, with casts around them; the variant sites are reported in
``PassResult.declined`` with the reason.

Hardware: without native bf16 arithmetic (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``)
bf16 is emulated and slower than fp32 (8192x384 @ 384x1536 on an AVX2-only EPYC: 1113 ms bf16
against 163 ms fp32), so the pass declines every site and leaves the graph fp32; the compile
driver warns once (``strict=True`` raises). ``require_native=False`` rewrites anyway (tests,
numerics studies).

Budget (lossy: ``exact = False``): every output within cosine >= 0.9995 and relative L2 <= 0.03
of the fp32 program (:data:`BF16_BUDGET`; measured on the zoo: worst cosine 0.99991, worst
relative L2 0.014, both the real MiniLM's ``last_hidden_state``), and on the real
all-MiniLM-L6-v2 over real text the mean-pooled embeddings at cosine >= 0.9999 per text (measured:
0.99996 worst of 140 texts).
"""

from __future__ import annotations

import functools
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from attnopt.ir import Graph, Node, TensorType, Value, get_op
from attnopt.ir.aten_args import encode_template
from attnopt.ir.core_ops import AtenAttrs, CastAttrs, ParamAttrs
from attnopt.passes.base import Pass, PassContext, PassResult
from attnopt.passes.select import layer_of, select_sites

__all__ = ["BF16_BUDGET", "BF16_VARIANTS", "Precision", "native_bf16"]

#: The pass's stated budget per output (the keyword arguments of ``attnopt.Budget``).
BF16_BUDGET: dict[str, float] = {"cosine": 0.9995, "rel_l2": 0.03}

#: Attention variants whose kernels take bf16 q/k/v within the budget (checked in
#: ``tests/passes/test_precision.py``); a variant not listed keeps fp32 q/k/v, with the reason in
#: ``PassResult.declined``. The SDPA-based kernels (dense, sliding window, block-sparse,
#: neighbourhood) run bf16 with fp32 softmax statistics; the linear and hybrid kernels compute
#: their feature maps and running sums in fp32 from bf16 inputs.
BF16_VARIANTS = frozenset(
    {"dense", "sliding_window", "block_sparse", "neighborhood", "linear", "hybrid"}
)

#: Projections: always run in bf16 when their weight (input at this position) is a graph tensor.
_GEMM_WEIGHT = {"linear": 1, "aten.addmm.default": 2, "aten.conv2d.default": 1}

#: Ops that run in bf16 when an input is bf16 (reductions and norms accumulate in fp32 inside).
_BF16_OPS = frozenset(
    {
        "add", "sub", "mul", "div", "neg", "tanh", "sigmoid", "sqrt", "rsqrt", "softmax",
        "log_softmax", "exp", "sum", "amax", "matmul", "where", "masked_fill", "attention",
        "reshape", "transpose", "permute", "expand", "unsqueeze", "contiguous", "pack", "unpack",
        "linear", "aten.addmm.default", "aten.conv2d.default", "aten.mm.default",
        "aten.bmm.default", "aten.baddbmm.default", "aten.gelu.default", "aten.relu.default",
        "aten.silu.default", "aten.tanh.default", "aten.sigmoid.default", "aten.layer_norm.default",
        "aten.slice.Tensor", "aten.select.int", "aten.squeeze.dim", "aten.unsqueeze.default",
        "aten.unflatten.int", "aten.flatten.using_ints", "aten.view.default", "aten.clone.default",
        "aten.cat.default", "aten.split.Tensor", "aten.split_with_sizes.default",
        "aten.chunk.default", "aten.pad.default", "aten.constant_pad_nd.default",
        "aten.roll.default", "aten.index.Tensor", "aten.permute.default",
        "aten.transpose.int", "aten.expand.default", "aten.mean.dim", "aten.pow.Tensor_Scalar",
        "aten.dropout.default", "aten.contiguous.default",
    }
)  # fmt: skip

#: Inputs an op takes in bf16, by position (the others keep their type); default: all floats.
_BF16_POSITIONS = {"attention": (0, 1, 2, 3, 4), "aten.layer_norm.default": (0,)}

#: Inputs that are additive masks: converted with their finite values kept finite.
_MASK_POSITIONS = {"attention": (3, 4)}

#: Ops that are the residual stream's (kept fp32 with ``residual="fp32"``).
_RESIDUAL_OPS = frozenset({"add", "sub", "aten.layer_norm.default"})


@functools.cache
def native_bf16(device: str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why not when it does not (checked once).

    Args:
        device: ``"cpu"`` (the CPU flags: x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``) or
            ``"cuda"`` (``torch.cuda.is_bf16_supported``).

    Returns:
        ``(native, reason)``; ``reason`` is empty when native.
    """
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, ""
        return False, "this GPU has no native bf16"
    if device != "cpu":
        return False, f"no bf16 check for {device} devices"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (bf16 GEMMs)"
    flags = _cpu_flags()
    if flags is None:
        return False, f"cannot read the CPU flags on {platform.system()}: bf16 support unknown"
    wanted = {"avx512_bf16", "amx_bf16"} if platform.machine() in ("x86_64", "AMD64") else {"bf16"}
    if flags & wanted:
        return True, ""
    return False, (
        f"this CPU has no native bf16 ({' / '.join(sorted(wanted))}): bf16 would be emulated and "
        "slower than fp32"
    )


def _cpu_flags() -> set[str] | None:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (None when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def _device_of(graph: Graph) -> str:
    """The device type the graph's tensors (its weights) live on ("cpu" when it has none)."""
    for tensor in graph.tensors.values():
        if tensor.is_floating_point():
            return tensor.device.type
    return "cpu"


def _op_key(node: Node) -> str:
    return node.attrs.target if node.op == "aten" else node.op


def _is_float32(value: Value | None) -> bool:
    return value is not None and isinstance(value.type, TensorType) and value.dtype == torch.float32


@dataclass(frozen=True)
class Precision(Pass):
    """Run projections, attention and the activations between them in bf16 (lossy).

    See the module docstring for what runs in bf16 and what stays fp32, and for the budget.

    Options:
        dtype: ``"bf16"`` rewrites; ``"fp32"`` leaves the graph as it is.
        keep_fp32: layer indices whose ops stay fp32, read from each node's module path as
            ``layers=`` of the attention passes reads them (``select.layer_of``; None: none).
        residual: ``"bf16"`` or ``"fp32"``: the precision of the residual stream. With
            ``"fp32"`` every add, sub and LayerNorm stays fp32 (so a GEMM's input is cast down
            and its output cast up).
        require_native: decline (leave fp32) on hardware without native bf16; False rewrites
            anyway.
    """

    name: ClassVar[str] = "precision"
    exact: ClassVar[bool] = False
    dtype: Literal["bf16", "fp32"] = "bf16"
    keep_fp32: tuple[int, ...] | None = None
    residual: Literal["bf16", "fp32"] = "bf16"
    require_native: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` for bf16, or decline every site when the hardware lacks bf16."""
        if self.dtype == "fp32":
            return PassResult(changed=False, notes=["dtype=fp32: the graph stays as it is"])
        sites = select_sites(graph, variant=None)
        if self.require_native:
            native, reason = native_bf16(_device_of(graph))
            if not native:
                declined = [(site.index, f"stays fp32: {reason}") for site in sites]
                return PassResult(changed=False, notes=[f"stays fp32: {reason}"], declined=declined)
        keep_sites = {
            site.node: f"the {site.attrs.variant} kernel runs fp32 (no bf16 variant yet)"
            for site in sites
            if site.attrs.variant not in BF16_VARIANTS
        }
        rewrite = _Bf16Rewrite(graph, self, keep_sites)
        rewrite.run()
        notes = [
            f"{rewrite.weights} weights converted to bf16 once; {rewrite.casts} activation casts "
            f"placed; {rewrite.lowered} ops run in bf16"
        ]
        declined = [(node.attrs.site, reason) for node, reason in keep_sites.items()]
        notes += [f"site {site}: {reason}" for site, reason in declined]
        return PassResult(
            changed=rewrite.lowered > 0, rewrites=rewrite.lowered, notes=notes, declined=declined
        )


class _Bf16Rewrite:
    """One forward sweep over the nodes deciding, per node, bf16 or fp32, and placing casts."""

    def __init__(self, graph: Graph, options: Precision, keep_sites: dict[Node, str]):
        self.graph = graph
        self.options = options
        self.keep_layers = set(options.keep_fp32 or ())
        self.keep_sites = keep_sites
        self.low: set[int] = set()  # ids of values this pass turned into bf16
        self.down: dict[Any, Value] = {}  # fp32 value -> its bf16 cast (or bf16 tensor copy)
        self.up: dict[int, Value] = {}  # bf16 value -> its fp32 cast
        self.params: list[Node] = []
        self.body: list[Node] = []
        self.weights = self.casts = self.lowered = 0

    def run(self) -> None:
        graph = self.graph
        for node in list(graph.nodes):
            if node.op == "param":
                self.params.append(node)
                continue
            if self._runs_bf16(node):
                self._lower(node)
            else:
                self._keep(node)
            self.body.append(node)
        for index, value in enumerate(graph.outputs):
            if value is not None and id(value) in self.low:  # only fp32 values were lowered
                graph.outputs[index] = self._to_float32(value, self.body[-1])
        graph.nodes = self.params + self.body
        graph.dead_code_elimination()

    # --- decisions ----------------------------------------------------------------------------
    def _runs_bf16(self, node: Node) -> bool:
        key = _op_key(node)
        if key not in _BF16_OPS or node in self.keep_sites:
            return False
        if self.keep_layers and layer_of(node.meta.get("module")) in self.keep_layers:
            return False
        inputs = self._bf16_inputs(node)
        if not inputs:
            return False
        if any(not _is_float32(v) and id(v) not in self.low for v in inputs):
            return False  # another float type (fp64, fp16): leave the op to it
        if self.options.residual == "fp32" and key in _RESIDUAL_OPS:
            return False
        weight = _GEMM_WEIGHT.get(key)
        if weight is not None and self._is_tensor(node.inputs[weight]):
            return True
        return any(id(v) in self.low for v in inputs)

    def _bf16_inputs(self, node: Node) -> list[Value]:
        positions = _BF16_POSITIONS.get(_op_key(node))
        return [
            v
            for i, v in enumerate(node.inputs)
            if (positions is None or i in positions)
            and v is not None
            and isinstance(v.type, TensorType)
            and v.dtype.is_floating_point
        ]

    def _is_tensor(self, value: Value | None) -> bool:
        return value is not None and value.producer is not None and value.producer.op == "param"

    # --- rewriting ----------------------------------------------------------------------------
    def _lower(self, node: Node) -> None:
        wanted = {id(v) for v in self._bf16_inputs(node)}
        masks = _MASK_POSITIONS.get(_op_key(node), ())
        for i, value in enumerate(node.inputs):
            if value is None or id(value) not in wanted or id(value) in self.low:
                continue
            if i in masks:
                node.inputs[i] = self._mask_to_bf16(value, node)
            else:
                node.inputs[i] = self._to_bf16(value, node)
        types = get_op(node.op).infer_types(node.inputs, node.attrs, self.graph)
        for value, new_type in zip(node.outputs, types):
            value.type = new_type
            if isinstance(new_type, TensorType) and new_type.dtype == torch.bfloat16:
                self.low.add(id(value))
        self.lowered += 1

    def _keep(self, node: Node) -> None:
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) in self.low:
                node.inputs[i] = self._to_float32(value, node)

    def _to_float32(self, value: Value, reader: Node) -> Value:
        """The fp32 version of a bf16 value: one cast placed before its first fp32 reader."""
        if id(value) not in self.up:
            self.up[id(value)] = self._cast(value, torch.float32, reader)
        return self.up[id(value)]

    def _to_bf16(self, value: Value, reader: Node) -> Value:
        """The bf16 version of an fp32 value: a tensor copy made now for graph tensors, else one
        cast placed before its first bf16 reader."""
        if id(value) not in self.down:
            if self._is_tensor(value):
                self.down[id(value)] = self._tensor_copy(value)
            else:
                self.down[id(value)] = self._cast(value, torch.bfloat16, reader)
        return self.down[id(value)]

    def _mask_to_bf16(self, value: Value, reader: Node) -> Value:
        """The bf16 version of an fp32 additive mask, placed once before its first bf16 reader:
        finite entries clamped to bf16's lowest finite value, ``-inf`` entries kept."""
        key = ("mask", id(value))
        if key not in self.down and self._is_tensor(value):
            self.down[key] = self._tensor_copy(value, mask=True)
        producer = value.producer
        if key not in self.down and producer is not None and producer.op == "where":
            if all(self._is_tensor(v) for v in producer.inputs[1:]):
                # where(keep, 0, fill) of constants, as masks are built: select bf16 constants
                chosen = [self._mask_to_bf16(v, reader) for v in producer.inputs[1:]]
                node = self.graph.make_node("where", [producer.inputs[0], *chosen])
                self.down[key] = self._append(node, reader)
                self.low.add(id(self.down[key]))
        if key not in self.down:
            lowest = torch.finfo(torch.bfloat16).min
            clamped = self._aten("aten.clamp.default", [value, lowest], reader)
            infinite = self._aten("aten.isneginf.default", [value], reader)
            kept = self._append(self.graph.make_node("where", [infinite, value, clamped]), reader)
            self.down[key] = self._cast(kept, torch.bfloat16, reader)
        return self.down[key]

    def _aten(self, target: str, args: list, anchor: Node) -> Value:
        inputs = [a for a in args if isinstance(a, Value)]
        template = encode_template([args, {}], lambda a: inputs.index(a) if a in inputs else None)
        attrs = AtenAttrs(target=target, args=json.dumps(template))
        return self._append(self.graph.make_node("aten", inputs, attrs), anchor)

    def _append(self, node: Node, anchor: Node) -> Value:
        if "module" in anchor.meta:
            node.meta["module"] = anchor.meta["module"]
        node.meta["pass"] = Precision.name
        self.body.append(node)
        return node.output

    def _tensor_copy(self, value: Value, mask: bool = False) -> Value:
        """A bf16 copy of a graph tensor, made now (a mask's finite values kept finite)."""
        graph = self.graph
        name = value.producer.attrs.name  # type: ignore[union-attr]
        copy_name = f"{name}.bf16"
        while copy_name in graph.tensors:
            copy_name += "_"
        tensor = graph.tensors[name].detach()
        if mask:
            lowest = torch.finfo(torch.bfloat16).min
            tensor = torch.where(tensor.isneginf(), tensor, tensor.clamp(min=lowest))
        graph.tensors[copy_name] = tensor.to(torch.bfloat16)
        parameters = graph.meta.get("parameters")
        if parameters is not None and name in parameters:
            graph.meta["parameters"] = sorted([*parameters, copy_name])
        node = graph.make_node(
            "param",
            [],
            ParamAttrs(name=copy_name),
            types=[TensorType.of(graph.tensors[copy_name])],
            names=[f"{value.name}_bf16"],
        )
        self.params.append(node)
        self.weights += 1
        return node.output

    def _cast(self, value: Value, dtype: torch.dtype, anchor: Node) -> Value:
        """A ``cast`` of ``value`` to ``dtype`` placed now (before ``anchor``, or at the end)."""
        output = self._append(self.graph.make_node("cast", [value], CastAttrs(dtype=dtype)), anchor)
        if dtype == torch.bfloat16:
            self.low.add(id(output))
        self.casts += 1
        return output
