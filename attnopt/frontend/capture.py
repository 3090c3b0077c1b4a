"""Capture a model into the IR.

Entry points: :func:`capture` (the public ``attnopt.capture``) and :func:`capture_program`,
which also returns what the runtime needs to call the graph with the model's own signature.

Methods: ``"export"`` (torch.export, non-strict: the default), ``"export-strict"`` (TorchDynamo
based export) and ``"fx"`` (torch.fx.symbolic_trace first, for simple modules, then export of the
traced module). ``"auto"`` tries export, then the others, and reports every failure.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt.errors import CaptureError
from attnopt.frontend.lower import lower_exported_program
from attnopt.ir import Graph

METHODS = ("auto", "export", "export-strict", "fx")


@dataclass
class CapturedProgram:
    """A captured graph plus how to map the model's inputs and outputs onto it.

    Attributes:
        graph: the IR graph.
        in_spec: pytree spec of ``(args, kwargs)`` at capture time.
        input_positions: for each graph input, its index among the flattened ``(args, kwargs)``
            leaves.
        out_spec: pytree spec to rebuild the model's output structure.
        method: the capture method that succeeded.
        seconds: capture time.
        attempts: the failures of the methods tried before it.
        symbol_ranges: with symbolic shapes, each symbol's valid range ``(lower, upper)``
            (``upper`` None: unbounded), as torch.export proved it.
    """

    graph: Graph
    in_spec: Any
    input_positions: list[int]
    out_spec: Any
    method: str
    seconds: float
    attempts: list[str] = field(default_factory=list)
    symbol_ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def _prepare_model(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        # KV caches are Python objects, not tensors: capture the cache-free forward.
        config.use_cache = False


def _has_mutation(ep: Any) -> bool:
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


@contextlib.contextmanager
def _mask_hints_off() -> Iterator[None]:
    """Capture ``nn.Transformer*`` without its value-dependent causal-mask detection.

    Given a mask but no ``is_causal``, ``torch.nn.modules.transformer._detect_is_causal_mask``
    compares the mask's values with a causal mask, which export cannot trace (a data-dependent
    guard). The result is only a hint that lets SDPA drop the mask; treating every mask as
    "not known to be causal" applies it as given, the same computation for any mask value (and
    detection recovers ``causal=True`` from a constant causal mask anyway).
    """
    from torch.nn.modules import transformer

    original = transformer._detect_is_causal_mask  # noqa: SLF001

    def hint(mask: Any, is_causal: bool | None = None, size: int | None = None) -> bool:
        return is_causal is True

    transformer._detect_is_causal_mask = hint  # noqa: SLF001
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = original  # noqa: SLF001


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """torch.export ``dynamic_shapes`` marking the batch and sequence dims of the inputs.

    Integer and bool tensors (token ids, masks, positions) get every dim marked; floating
    tensors their first dim (batch), and the second too when they are ``[B, S, D]`` sequences of
    embeddings. ``Dim.AUTO`` lets export keep a dim static where the model needs it to be.

    Args:
        model: the module (its ``forward`` signature names the arguments).
        args: example positional inputs.
        kwargs: example keyword inputs.

    A module that knows its own dynamic dims says so with a method
    ``attnopt_dynamic_shapes(args, kwargs)`` returning the spec (the generation driver's decode
    step does: one new token, a cache of any length).

    Returns:
        A dict from ``forward``'s parameter names to per-input specs.
    """
    import inspect

    from torch.export import Dim

    own = getattr(model, "attnopt_dynamic_shapes", None)
    if callable(own):
        return own(args, kwargs)

    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    widest = max((x.dim() for x in tensors), default=0)
    # A size-1 axis where another input is larger is a broadcast (a [1, 1, 1, S] bias beside a
    # batch of 4), not a batch of one: it stays static, or the broadcast fails symbolically.
    larger = [any(x.dim() > axis and x.shape[axis] > 1 for x in tensors) for axis in range(widest)]

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        if leaf.dtype.is_floating_point or leaf.dtype.is_complex:
            axes = range(2 if leaf.dim() == 3 else 1)
        else:
            axes = range(leaf.dim())
        return {axis: Dim.AUTO for axis in axes if leaf.shape[axis] > 1 or not larger[axis]}

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def _size_oblivious(dynamic: bool) -> Iterator[None]:
    """Trace symbolic sizes without specialising on 0 and 1 (a batch of one is common), for
    this export only. The driver checks sizes of one against eager before it serves them."""
    if not dynamic:
        yield
        return
    from torch.fx.experimental import _config

    with _config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _inputs_unmarked(args: tuple, kwargs: dict) -> Iterator[None]:
    """Leave the caller's tensors as they were: torch.export with dynamic shapes marks its inputs
    dynamic (``_dynamo_*`` attributes) and keeps the marks, on failure too, so a later capture
    of the same tensors (the per-shape fallback, or the user's own torch.compile) turned
    symbolic behind the user's back."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    before = [
        {key: value for key, value in vars(x).items() if key.startswith(_DYNAMO_MARKS)}
        for x in tensors
    ]
    try:
        yield
    finally:
        for tensor, kept in zip(tensors, before):
            for key in [k for k in vars(tensor) if k.startswith(_DYNAMO_MARKS)]:
                if key not in kept:
                    delattr(tensor, key)
            for key, value in kept.items():
                setattr(tensor, key, value)


_DYNAMO_MARKS = ("_dynamo_", "_has_dynamo_")


def _symbol_ranges(ep: Any) -> dict[str, tuple[int, int | None]]:
    ranges: dict[str, tuple[int, int | None]] = {}
    for symbol, value_range in ep.range_constraints.items():
        lower, upper = _bound(value_range.lower), _bound(value_range.upper)
        ranges[str(symbol)] = (0 if lower is None else lower, upper)
    return ranges


def _bound(value: Any) -> int | None:
    """An int range bound, None for an infinite one (sympy's and torch's infinities)."""
    try:
        bound = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return None if abs(bound) >= 2**62 else bound


class _BoundKeywords(torch.nn.Module):
    """``model`` with its non-tensor keyword arguments (``return_dict=True``) bound.

    torch.export cannot take dynamic shapes for a call whose ``**kwargs`` hold non-tensor values
    (it fails inside its own checks); they are constants of the graph anyway, so they are bound
    here and the call has tensors only. Module paths keep the model's own (the prefix is removed
    after lowering).
    """

    PREFIX = "bound_model"

    def __init__(self, model: torch.nn.Module, constants: dict[str, Any]):
        import inspect

        super().__init__()
        setattr(self, self.PREFIX, model)
        self.constants = dict(constants)
        # forward takes the model's named parameters (export binds inputs and dynamic shapes by
        # name), without the **kwargs the constants came through.
        signature = inspect.signature(model.forward)
        named = [
            p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

        def forward(module: _BoundKeywords, *args: Any, **kwargs: Any) -> Any:
            return getattr(module, module.PREFIX)(*args, **kwargs, **module.constants)

        forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *named]
        )
        self.forward = types.MethodType(forward, self)  # type: ignore[method-assign]


def _keyword_constants(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The non-tensor values passed through ``forward``'s ``**kwargs`` parameter."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    named = {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(named) == len(parameters):
        return {}
    return {
        name: value
        for name, value in kwargs.items()
        if name not in named
        and not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
    }


def _export(
    model: torch.nn.Module, args: tuple, kwargs: dict, strict: bool, dynamic: bool = False
) -> Any:
    constants = _keyword_constants(model, args, kwargs) if dynamic else {}
    if constants:
        model = _BoundKeywords(model, constants)
        kwargs = {name: value for name, value in kwargs.items() if name not in constants}
    with (
        torch.no_grad(),
        _mask_hints_off(),
        _size_oblivious(dynamic),
        _inputs_unmarked(args, kwargs),
    ):
        shapes = dynamic_shapes_for(model, args, kwargs) if dynamic else None
        ep = torch.export.export(model, args, kwargs, strict=strict, dynamic_shapes=shapes)
        if _has_mutation(ep):
            # In-place ops (T5's relative buckets use +=) would mutate folded constants: make the
            # program functional, with an empty table so nothing else is decomposed.
            ep = ep.run_decompositions({})
    return ep


def _fx_then_export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> Any:
    with _mask_hints_off():
        traced = torch.fx.symbolic_trace(model)
    return _export(traced, args, kwargs, strict=False, dynamic=dynamic)


def capture_program(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool | None = None,
    method: str = "auto",
) -> CapturedProgram:
    """Capture ``model`` called as ``model(*args, **kwargs)``.

    Args:
        model: the module (put in eval mode by the caller for inference graphs).
        args: example positional inputs.
        kwargs: example keyword inputs.
        dynamic: True: capture with symbolic batch and sequence dims (see
            :func:`dynamic_shapes_for`); the graph's types then hold symbolic dims and it runs at
            any size in the symbols' ranges. None or False: every dim as in the example.
        method: ``"auto"``, ``"export"``, ``"export-strict"`` or ``"fx"``.

    Returns:
        The captured program.

    Raises:
        CaptureError: naming the model, the methods tried and each failure; or naming an input
            on the meta device when the model's weights have data, or the buffers and inputs
            the forward updates in place.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"attnopt captures torch.nn.Module objects, not {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    name = type(model).__name__
    _check_meta_inputs(model, args, kwargs)
    _prepare_model(model)
    order = ["export", "export-strict", "fx"] if method == "auto" else [method]
    attempts: list[str] = []
    start = time.perf_counter()
    for attempt in order:
        try:
            if attempt == "fx":
                ep = _fx_then_export(model, args, kwargs, bool(dynamic))
            else:
                strict = attempt == "export-strict"
                ep = _export(model, args, kwargs, strict=strict, dynamic=bool(dynamic))
        except Exception as err:  # noqa: BLE001 - every failure is reported to the user
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            attempts.append(f"{attempt}: {type(err).__name__}: {first_line[:300]}")
            continue
        _refuse_state_updates(ep, name)
        graph = lower_exported_program(ep, model_name=name)
        graph.meta["model"] = name
        _strip_bound_prefix(graph)
        flat, in_spec = pytree.tree_flatten((args, kwargs))
        positions = _input_positions(ep, flat)
        return CapturedProgram(
            graph=graph,
            in_spec=in_spec,
            input_positions=positions,
            out_spec=ep.call_spec.out_spec,
            method=attempt,
            seconds=time.perf_counter() - start,
            attempts=attempts,
            symbol_ranges=_symbol_ranges(ep) if dynamic else {},
        )
    tried = "\n  ".join(attempts)
    raise CaptureError(
        f"could not capture {name}. Tried:\n  {tried}\n"
        "Next: call model.eval(), pass tensors (not Python objects) as inputs, set "
        "use_cache=False for decoders, or capture the submodule that contains the attention."
    )


def _argument_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``forward``'s parameter names for the call's arguments (``args[i]`` where unbound)."""
    import inspect

    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return {**{f"args[{i}]": value for i, value in enumerate(args)}, **kwargs}


def _check_meta_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse inputs on the meta device for a model with real weights.

    Export traces with fake tensors, so it captures such a call, but the program (like eager)
    can never run it: a meta tensor has no data.
    """
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if not devices or devices == {"meta"}:
        return
    where = sorted(devices - {"meta"})[0]
    for argument, value in _argument_names(model, args, kwargs).items():
        leaves = pytree.tree_leaves(value)
        if any(isinstance(leaf, torch.Tensor) and leaf.device.type == "meta" for leaf in leaves):
            raise CaptureError(
                f"input {argument!r} of {type(model).__name__} is on the meta device (shapes "
                f"only, no data) and the model's weights are on {where}: pass tensors with data "
                f"on {where}, e.g. {argument}.to({where!r})"
            )


def _refuse_state_updates(ep: Any, model_name: str) -> None:
    """Raise when the forward writes to a buffer or an input in place.

    The IR is a pure function of its inputs: a compiled program would return the new value as an
    extra output and never store it, so the model's state would silently stop changing.
    """
    signature = ep.graph_signature
    buffers = sorted(set(signature.buffers_to_mutate.values()))
    inputs = sorted(set(signature.user_inputs_to_mutate.values()))
    if not buffers and not inputs:
        return
    what = [f"buffer {b!r}" for b in buffers] + [f"input {i!r}" for i in inputs]
    raise CaptureError(
        f"{model_name}'s forward updates {', '.join(what)} in place; attnopt compiles "
        "stateless inference graphs and would not store the update. Keep the state outside "
        "forward (update it in the caller), or compile the submodule that contains the "
        "attention."
    )


def _strip_bound_prefix(graph: Graph) -> None:
    """Module paths as the model names them when it was captured through _BoundKeywords."""
    prefix = _BoundKeywords.PREFIX + "."
    if not any(name.startswith(prefix) for name in graph.meta.get("parameters", ())):
        return
    for node in graph.nodes:
        module = node.meta.get("module")
        if module is not None and (module == _BoundKeywords.PREFIX or module.startswith(prefix)):
            node.meta["module"] = module[len(prefix) :] or None


def _input_positions(ep: Any, flat: list[Any]) -> list[int]:
    from torch.export.graph_signature import InputKind

    user_specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    positions = [index for index, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor)]
    # Non-tensor inputs are constants of the graph: export keeps them as inputs, or not (when
    # they were bound before export, see _BoundKeywords).
    if len(user_specs) not in (len(flat), len(positions)):
        raise CaptureError(
            f"export kept {len(user_specs)} user inputs for {len(flat)} flattened inputs"
        )
    return positions


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool | None = None,
    method: str = "auto",
) -> Graph:
    """Capture ``model`` into an IR graph (the public ``attnopt.capture``).

    Args:
        model: the module.
        args: example positional inputs.
        kwargs: example keyword inputs.
        dynamic: see :func:`capture_program`.
        method: ``"auto"``, ``"export"``, ``"export-strict"`` or ``"fx"``.

    Returns:
        The IR graph.
    """
    return capture_program(model, args, kwargs, dynamic=dynamic, method=method).graph
