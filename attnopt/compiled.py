"""The compile driver: capture once, run the passes, load the program; an ``nn.Module`` with the
model's call signature and output structure.

Entry point: :class:`CompiledModule` (built by ``attnopt.compile``). This is the layer above the
runtime: it captures (:mod:`attnopt.frontend`), runs passes (:mod:`attnopt.passes`) with an executor
that runs graphs for calibration, and hands the final graph to the runtime.

Compiled modules run inference: the program runs under ``torch.no_grad()``. The first call
captures the model with symbolic batch and sequence dims (torch.export dynamic shapes): that one
program serves every later call with the same structure, dtypes, devices and non-tensor values
whose sizes fit the symbols' proven ranges, with no capture or compilation
(``stats["specialisations"]``). A model that cannot be captured that way, or fuses fewer sites,
is compiled once per input signature instead (a warning says why); so is a call the symbolic
program cannot serve. ``stats`` counts captures, compilations and their times.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from attnopt.errors import BackendError, CaptureError, PassError, PlanError, SignatureError
from attnopt.frontend.capture import CapturedProgram, capture_program
from attnopt.frontend.onnx_import import OnnxModule, capture_onnx_program
from attnopt.generation import GenerationStats, Generator, streaming_of
from attnopt.ir import Graph, verify
from attnopt.ir.symbolic import bind_symbols
from attnopt.passes.base import PassContext, PassManager, as_pipeline
from attnopt.passes.plan import Plan
from attnopt.runtime.dispatch import KernelNamespace
from attnopt.runtime.execute import Program, load_program
from attnopt.signature import SymbolicSignature, signature_key
from attnopt.sites import AttentionSite, collect_sites

BACKENDS = ("auto", "torch", "triton", "triton-interpret")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``.

    Args:
        backend: "auto", "torch", "triton" or "triton-interpret".
        device: the device of the model's inputs.

    Returns:
        "torch", "triton" or "triton-interpret".
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _has_triton() else "torch"
    if backend == "triton" and device.type != "cuda":
        raise BackendError(
            "backend 'triton' needs CUDA tensors; on the CPU use 'auto'/'torch' (fast torch "
            "kernels) or 'triton-interpret' (the generated kernels in Triton's interpreter)"
        )
    return backend


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class CompiledEntry:
    """One compiled input signature."""

    captured: CapturedProgram
    graph: Graph
    program: Program
    kernels: KernelNamespace
    sites: list[AttentionSite]
    compile_seconds: float
    pass_history: list[dict[str, Any]] = field(default_factory=list)
    explanations: list[tuple[str, str]] = field(default_factory=list)


def run_graph(
    graph: Graph,
    captured: CapturedProgram,
    backend: str,
    args: tuple,
    kwargs: dict,
    *,
    record_inputs: bool = False,
) -> tuple[list[Any], dict[int, Any]]:
    """Run ``graph`` (a graph of ``captured``'s signature) on model inputs.

    Args:
        graph: the graph.
        captured: the capture it came from (input mapping).
        backend: runtime backend.
        args: positional model inputs.
        kwargs: keyword model inputs.
        record_inputs: record each attention site's inputs instead of its output.

    Returns:
        ``(flat outputs, taps)``.
    """
    kernels = KernelNamespace(backend)
    program = load_program(graph, kernels)
    flat, _ = pytree.tree_flatten((args, kwargs))
    if len(flat) <= max(captured.input_positions, default=-1):
        raise SignatureError("calibration inputs do not have the structure of the example inputs")
    inputs = [flat[i] for i in captured.input_positions]
    try:
        bind_symbols([value.type for value in graph.inputs], inputs)
    except ValueError as err:
        shapes = ", ".join(f"{v.name}: {v.type}" for v in graph.inputs)
        raise SignatureError(
            f"calibration inputs do not fit the compiled graph ({err}; it takes {shapes}): "
            "calibrate with inputs of the example's shapes"
        ) from None
    if record_inputs:
        kernels.input_taps = {}
    else:
        kernels.taps = {}
    with torch.no_grad():
        outputs = program.fn(*inputs)
    taps = kernels.input_taps if record_inputs else kernels.taps
    return list(outputs), taps or {}


def _narrowed(
    args: tuple, kwargs: dict, positions: list[int], types: list[Any], symbols: set[str]
) -> tuple[tuple, dict] | None:
    """The example with every input dim that is one of ``symbols`` cut to size one (None: no
    input dim is)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    changed = False
    for position, type_ in zip(positions, types):
        tensor = flat[position]
        for axis, dim in enumerate(getattr(type_, "shape", ())):
            if dim in symbols:
                tensor = tensor.narrow(axis, 0, 1)
                changed = True
        flat[position] = tensor
    if not changed:
        return None
    narrowed_args, narrowed_kwargs = pytree.tree_unflatten(flat, spec)
    return tuple(narrowed_args), dict(narrowed_kwargs)


def _fewer_fused(symbolic: list[AttentionSite], static: list[AttentionSite]) -> str | None:
    """Why the symbolic graph is worse than the per-shape one, or None when it is as good.

    It must fuse as many sites, into the same variants, with the same causal and mask facts (a
    causal mask built from ``arange(seq)`` is a constant only when the length is).
    """
    if len(symbolic) < len(static):
        return f"with symbolic shapes {len(symbolic)} of {len(static)} attention sites fuse"

    def facts(sites: list[AttentionSite]) -> list[tuple]:
        return sorted((s.variant, s.causal or s.mask_causal, s.has_mask, s.has_bias) for s in sites)

    if facts(symbolic) != facts(static):
        return (
            "with symbolic shapes the attention sites lose facts the per-shape graph proves "
            "(causality from a constant mask, a mask that masks nothing, or their variant)"
        )
    return None


class _InputFacts(NamedTuple):
    """What a compiled call knew of one tensor input."""

    dtype: str
    shape: tuple[int, ...]
    device: str

    @property
    def kind(self) -> tuple[str, int, str]:
        """Dtype, rank and device: what must match (sizes may vary)."""
        return self.dtype, len(self.shape), self.device

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)} ({len(self.shape)}-D, {self.device})"


def _describe_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, _InputFacts]:
    """Each tensor input by parameter name (``x``, ``input_ids``); positional inputs take the
    names of the forward's parameters."""
    import inspect

    try:
        names = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        names = []
    items = [(names[i] if i < len(names) else f"args[{i}]", a) for i, a in enumerate(args)]
    return {
        name: _InputFacts(
            str(value.dtype).removeprefix("torch."), tuple(value.shape), value.device.type
        )
        for name, value in [*items, *kwargs.items()]
        if isinstance(value, torch.Tensor)
    }


class CompiledModule(torch.nn.Module):
    """A model compiled by attnopt; call it like the model.

    Args:
        model: the original module (kept as ``self.model``; its parameters are used by reference).
        pipeline: the passes to apply.
        backend: "auto", "torch", "triton" or "triton-interpret".
        calibration: iterable of ``(args, kwargs)`` for passes that need data.
        budget: accuracy budget for budgeted passes.
        max_signatures: how many input signatures to keep compiled (LRU).
        method: capture method (see :func:`attnopt.capture`).
        retain_memory: keep freed activation memory mapped between ops (glibc malloc tuning,
            process-wide; see :mod:`attnopt.runtime.memory`).
        plan: decisions to replay instead of calibrating (:class:`attnopt.Plan`). Without one, the
            first compilation records ``self.plan`` and every later one (a new input signature)
            replays it, so calibration runs once.
        dynamic: symbolic shapes (None/True) or one compilation per input shape (False).
        strict: raise :class:`attnopt.PassError` when a pass leaves a selected site alone
            (else one warning per compiled module lists them).
        captures: a capture store shared by compiled modules of one model (the budgeted search
            compiles many pipelines of it): each input signature is captured once, and every
            compile runs its passes on a copy of the captured graph.
        check_static: compare a symbolic compile with the per-shape one (which must not fuse
            more). The budgeted search turns it off for its candidates once the exact plan
            passed it; the module it returns checks again.

    Pickling keeps the model, the plan (as JSON) and the options, never a generated program or
    kernel: an unpickled module compiles again on its first call, replaying the plan.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pipeline: PassManager,
        *,
        backend: str = "auto",
        calibration: Any = None,
        budget: Any = None,
        max_signatures: int = 8,
        method: str = "auto",
        retain_memory: bool = True,
        plan: Plan | None = None,
        dynamic: bool | None = None,
        strict: bool = False,
        captures: dict[tuple, CapturedProgram] | None = None,
        check_static: bool = True,
    ):
        super().__init__()
        if plan is not None:
            plan.check_model(type(model).__name__)
            plan.check_pipeline(pipeline.passes)
        if backend not in BACKENDS:
            raise BackendError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if not isinstance(max_signatures, int) or max_signatures < 1:
            raise ValueError("max_signatures must be a positive int")
        self.model = model
        self.pipeline = pipeline
        self.backend = backend
        self.calibration = calibration
        self.budget = budget
        self.max_signatures = max_signatures
        self.method = method
        self.retain_memory = retain_memory
        if dynamic not in (None, True, False):
            raise TypeError(f"dynamic must be None, True or False, not {dynamic!r}")
        self.dynamic = dynamic
        self.strict = bool(strict)
        self._captures = captures
        self._check_static = check_static
        #: What the budgeted search found (:class:`attnopt.search.SearchReport`), when it ran.
        self.search_report: Any = None
        self._generator: Generator | None = None  # made by the first generate()
        self._told: set[str] = set()  # declines already reported (once per compiled module)
        # One symbolic program per call structure (which inputs, dtypes, non-tensor values).
        self._symbolic: list[tuple[SymbolicSignature, CompiledEntry]] = []
        self._kwarg_order: list[str] | None = None
        self.symbolic_refusal: str | None = None
        self._plan = plan
        self._entries: OrderedDict[tuple, CompiledEntry] = OrderedDict()
        self._last: CompiledEntry | None = None
        self._structure: Any = None
        self._example: dict[str, _InputFacts] = {}  # the first compiled call's inputs
        self.stats: dict[str, Any] = {
            "mode": "not compiled",
            "captures": 0,
            "capture_seconds": 0.0,
            "compilations": 0,
            "compile_seconds": [],
            "specialisations": 0,
            "cache_hits": 0,
            "evictions": 0,
        }

    # --- compilation ------------------------------------------------------------------------
    def compile_for(self, args: tuple = (), kwargs: dict | None = None) -> CompiledEntry:
        """Compile (or fetch) the program for this input signature.

        Args:
            args: positional inputs.
            kwargs: keyword inputs.

        Returns:
            The compiled entry.
        """
        return self._entry(args, kwargs or {})[0]

    def _entry(self, args: tuple, kwargs: dict) -> tuple[CompiledEntry, list[Any]]:
        """The entry for this signature and the flattened inputs it was looked up with."""
        if self._kwarg_order is None:
            self._kwarg_order = list(kwargs)
        elif list(kwargs) != self._kwarg_order and set(kwargs) == set(self._kwarg_order):
            # Keyword order means nothing to the model: one order, one signature.
            kwargs = {name: kwargs[name] for name in self._kwarg_order}
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = signature_key(flat, spec)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats["cache_hits"] += 1
        elif (served := self._symbolic_entry(flat, spec)) is not None:
            # A new shape a symbolic program serves as it is: nothing is captured or compiled.
            entry = served
            self.stats["specialisations"] += 1
            self._remember(key, entry)
        else:
            entry = self._compile_signature(args, kwargs, flat, spec)
            self._tell_declined(entry)  # strict: raises before the entry is kept
            self._remember(key, entry)
        self._last = entry
        return entry, flat

    def _tell_declined(self, entry: CompiledEntry) -> None:
        """Tell the user, once, which selected sites a pass left alone and why (strict: raise)."""
        lines = []
        for record in entry.pass_history:
            by_reason: dict[str, list[int]] = {}
            for site, reason in record.get("declined", ()):
                by_reason.setdefault(reason, []).append(site)
            for reason, sites in by_reason.items():
                line = f"{record['text']}: sites {sorted(sites)}: {reason}"
                if line not in self._told:
                    lines.append(line)
        if not lines:
            return
        self._told.update(lines)
        message = (
            f"attnopt left attention sites of {type(self.model).__name__} as they were:\n  "
            + "\n  ".join(lines)
        )
        if self.strict:
            raise PassError(message + "\n(strict=True: compile with strict=False to accept this)")
        warnings.warn(message, UserWarning, stacklevel=4)

    def _symbolic_entry(self, flat: list[Any], spec: Any) -> CompiledEntry | None:
        """The symbolic program that serves this call, if one does."""
        for signature, entry in self._symbolic:
            if signature.bind(flat, spec) is not None:
                return entry
        return None

    def _remember(self, key: tuple, entry: CompiledEntry) -> None:
        self._entries[key] = entry
        if len(self._entries) > self.max_signatures:
            self._entries.popitem(last=False)
            self.stats["evictions"] += 1

    def _compile_signature(
        self, args: tuple, kwargs: dict, flat: list[Any], spec: Any
    ) -> CompiledEntry:
        """Compile for a call no entry serves: symbolically the first time, else per shape."""
        if self.symbolic_refusal is None and self.dynamic is not False:
            given_plan = self._plan  # the symbolic compile records it, the per-shape one replays
            try:
                symbolic = self._compile(args, kwargs, flat, dynamic=True)
            except PlanError:
                raise  # the plan does not fit this model, whatever the shapes
            except Exception as err:  # noqa: BLE001 - any failure: per-shape compilation, told
                self._plan = given_plan
                first = " ".join(str(err).split()) or repr(err)
                # An error the per-shape compile repeats is the user's to see, not a fallback.
                static = self._compile(args, kwargs, flat, dynamic=False)
                self._refuse_symbolic(f"{type(err).__name__}: {first[:300]}")
                return static
            else:
                if not self._check_static:
                    return self._serve_symbolic(symbolic, args, kwargs, flat, spec)
                # The same model compiled per shape must not fuse more: else serve it that way.
                # It replays the plan the symbolic compile recorded (calibration runs once); a
                # plan that does not fit it means the two graphs' sites differ.
                try:
                    static = self._compile(args, kwargs, flat, dynamic=False)
                    problem = _fewer_fused(symbolic.sites, static.sites)
                except PlanError as err:
                    self._plan = given_plan
                    static = self._compile(args, kwargs, flat, dynamic=False)
                    problem = f"the per-shape graph's sites differ ({err})"
                if problem is None:
                    return self._serve_symbolic(symbolic, args, kwargs, flat, spec)
                self._refuse_symbolic(problem)
                return static
        self.stats["mode"] = "symbolic" if self._symbolic else "per-shape"
        return self._compile(args, kwargs, flat, dynamic=False)

    def _serve_symbolic(
        self, symbolic: CompiledEntry, args: tuple, kwargs: dict, flat: list[Any], spec: Any
    ) -> CompiledEntry:
        """Keep ``symbolic`` as the program for every call its signature binds."""
        ranges = self._checked_size_one(symbolic, args, kwargs)
        signature = SymbolicSignature(
            flat,
            spec,
            symbolic.captured.input_positions,
            [value.type for value in symbolic.graph.inputs],
            ranges,
        )
        self._symbolic.append((signature, symbolic))
        self.stats["mode"] = "symbolic"
        return symbolic

    def _checked_size_one(
        self, entry: CompiledEntry, args: tuple, kwargs: dict
    ) -> dict[str, tuple[int, int | None]]:
        """The symbols' ranges, with size one kept only where the program stays consistent.

        Export traced the sizes without specialising on one (a batch of one is common), which
        torch does not prove for every model. Batch symbols (only ever the first dim of an input)
        are checked: the example is cut to size one along them, and the program's outputs on it
        must equal its outputs on the whole example cut the same way (batch elements are
        independent, so eager would agree). Other symbols, and batches that fail the check,
        start at two: size one then compiles per shape.
        """
        ranges = dict(entry.captured.symbol_ranges)
        hints = entry.graph.meta.get("symbol_hints", {})
        types = [value.type for value in entry.graph.inputs]
        batch_like = {t.shape[0] for t in types if getattr(t, "shape", ())} - {
            d for t in types for d in getattr(t, "shape", ())[1:]
        }
        for name, (lower, upper) in ranges.items():
            if lower <= 1 and name not in batch_like:
                ranges[name] = (2, upper)  # a length of one changes what attention sees
        ones = {n for n, (lower, _) in ranges.items() if lower <= 1 and hints.get(n) != 1}
        if not ones:
            return ranges
        # One probe for them together: sizes that stand for the same batch must agree.
        probe = _narrowed(args, kwargs, entry.captured.input_positions, types, ones)
        if probe is None or not self._consistent_at_one(entry, (args, kwargs), probe, ones):
            for name in ones:
                ranges[name] = (2, ranges[name][1])
        return ranges

    @staticmethod
    def _consistent_at_one(
        entry: CompiledEntry, example: tuple, probe: tuple, ones: set[str]
    ) -> bool:
        def outputs(inputs: tuple) -> list[Any]:
            flat, _ = pytree.tree_flatten(inputs)
            with torch.no_grad():
                return list(entry.program.fn(*[flat[i] for i in entry.captured.input_positions]))

        try:
            whole, cut = outputs(example), outputs(probe)
        except Exception:  # noqa: BLE001 - a probe that fails means: do not serve size one
            return False
        for value, full, one in zip(entry.graph.outputs, whole, cut):
            if not isinstance(full, torch.Tensor):
                continue
            for axis, dim in enumerate(getattr(value.type, "shape", ())):
                if dim in ones:
                    full = full.narrow(axis, 0, 1)
            if not isinstance(one, torch.Tensor) or one.shape != full.shape:
                return False
            if full.is_floating_point():
                finite = full[torch.isfinite(full)]
                scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
                if not torch.allclose(one, full, rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
                    return False
            elif not torch.equal(one, full):
                return False
        return True

    def _refuse_symbolic(self, reason: str) -> None:
        self.symbolic_refusal = reason
        self.stats["mode"] = "per-shape"
        warnings.warn(
            f"attnopt compiles {type(self.model).__name__} once per input shape: symbolic shapes "
            f"were refused ({reason}). Each new batch size or length compiles again.",
            UserWarning,
            stacklevel=4,
        )

    def _compile(self, args: tuple, kwargs: dict, flat: list[Any], dynamic: bool) -> CompiledEntry:
        start = time.perf_counter()
        try:
            captured = self._capture(args, kwargs, flat, dynamic)
        except CaptureError as err:
            if self._structure is not None:
                raise SignatureError(
                    f"these inputs do not fit {type(self.model).__name__}: the model could not "
                    f"be run on them ({err}){self._differences(args, kwargs, sizes=True)}"
                ) from err
            raise
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        backend = resolve_backend(self.backend, device)
        graph = captured.graph
        ctx = PassContext(
            # Replaying: decisions come from the plan; calibration data is never read again.
            calibration=self.calibration if self._plan is None else None,
            budget=self.budget,
            backend=backend,
            model=self.model,
            example=(args, kwargs),
            plan=Plan(type(self.model).__name__, str(self.pipeline)),
            replay=self._plan,
        )
        ctx.executor = lambda g, a, k, record_inputs=False: run_graph(
            g, captured, backend, a, k, record_inputs=record_inputs
        )
        self.pipeline.run(graph, ctx)
        if self._plan is None:
            self._plan = ctx.plan
        graph.dead_code_elimination()
        verify(graph)
        kernels = KernelNamespace(backend, strict=self.strict)
        program = load_program(graph, kernels)
        if self._structure is None:
            self._example = _describe_inputs(self.model, args, kwargs)
        self._structure = captured.in_spec
        if self.retain_memory and device.type == "cpu" and not self.stats["compilations"]:
            from attnopt.runtime.memory import retain_freed_memory

            retain_freed_memory()
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += captured.seconds
        self.stats["compilations"] += 1
        self.stats["compile_seconds"].append(round(time.perf_counter() - start, 4))
        return CompiledEntry(
            captured=captured,
            graph=graph,
            program=program,
            kernels=kernels,
            sites=collect_sites(graph),
            compile_seconds=time.perf_counter() - start,
            pass_history=list(ctx.history),
            explanations=list(ctx.explanations),
        )

    def _capture(self, args: tuple, kwargs: dict, flat: list[Any], dynamic: bool) -> Any:
        """Capture the model, or copy the capture a shared store holds for this signature."""
        if self._captures is None:
            return self._capture_model(args, kwargs, dynamic)
        _, spec = pytree.tree_flatten((args, kwargs))
        key = (self.method, dynamic, signature_key(flat, spec))
        stored = self._captures.get(key)
        if stored is None:
            stored = self._capture_model(args, kwargs, dynamic)
            self._captures[key] = stored
        # Passes rewrite the graph in place: each compile gets its own copy.
        return dataclasses.replace(stored, graph=stored.graph.copy(), seconds=0.0)

    def _capture_model(self, args: tuple, kwargs: dict, dynamic: bool) -> CapturedProgram:
        """torch.export's capture of the model, or the import of an ONNX model's graph."""
        if isinstance(self.model, OnnxModule):
            return capture_onnx_program(self.model, args, kwargs)
        return capture_program(self.model, args, kwargs, method=self.method, dynamic=dynamic)

    # --- calling ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled program; same outputs and structure as ``model(*args, **kwargs)``."""
        entry, flat = self._entry(args, kwargs)
        return self._run(entry, flat)

    def _run(self, entry: CompiledEntry, flat: list[Any]) -> Any:
        inputs = [flat[i] for i in entry.captured.input_positions]
        # An inference compiler: the sparse and generated kernels have no backward.
        try:
            with torch.no_grad():
                outputs = entry.program.fn(*inputs)
        except (RuntimeError, TypeError, ValueError) as err:
            # Export does not check every dtype (F.linear takes float64 activations in the
            # graph and fails only here): an input unlike the compiled example is the user's.
            args, kwargs = pytree.tree_unflatten(flat, entry.captured.in_spec)
            differences = self._differences(args, kwargs)
            if differences:
                raise SignatureError(
                    f"{type(self.model).__name__} compiled by attnopt failed on these inputs "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]}){differences}"
                ) from err
            raise
        return pytree.tree_unflatten(list(outputs), entry.captured.out_spec)

    def _differences(self, args: tuple, kwargs: dict, sizes: bool = False) -> str:
        """How these inputs differ from the first compiled call's, as the end of a message
        (empty when no input differs in presence, dtype, rank or device, or with ``sizes`` in
        its sizes)."""
        if not self._example:
            return ""
        now = _describe_inputs(self.model, args, kwargs)
        lines = []
        for name in [*self._example, *(n for n in now if n not in self._example)]:
            before, after = self._example.get(name), now.get(name)
            if before == after:
                continue
            if after is None:
                lines.append(f"{name!r} is missing (compiled with {before})")
            elif before is None:
                lines.append(f"{name!r} is new: {after}")
            elif sizes or before.kind != after.kind:
                lines.append(f"{name!r} is {after}, compiled for {before}")
        if not lines:
            return ""
        return (
            "; inputs unlike the ones it was compiled for: "
            + "; ".join(lines)
            + ". Give inputs of the compiled dtypes, ranks and device (or compile again for these)"
        )

    def run_with_taps(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[int, torch.Tensor]]:
        """Run and also return every attention site's output, by site index.

        Returns:
            ``(outputs, {site_index: tensor})``.
        """
        entry, flat = self._entry(args, kwargs)
        entry.kernels.taps = {}
        try:
            outputs = self._run(entry, flat)
            taps = entry.kernels.taps
        finally:
            entry.kernels.taps = None
        return outputs, taps

    # --- introspection ----------------------------------------------------------------------
    def symbolic_entry(self) -> CompiledEntry | None:
        """The symbolic program's entry (serves every shape its signature binds), if any."""
        return self._symbolic[0][1] if self._symbolic else None

    def _latest(self) -> CompiledEntry:
        if self._last is None:
            raise RuntimeError(
                "nothing compiled yet: call the module (or attnopt.compile with example inputs)"
            )
        return self._last

    @property
    def plan(self) -> Plan | None:
        """Every decision the passes made from data (:class:`attnopt.Plan`): recorded by the first
        compilation, replayed by every later one; ``plan.save(path)`` to reuse it. None before
        the first compilation unless a plan was given."""
        return self._plan

    @property
    def graph(self) -> Graph:
        """The final IR of the most recently used signature."""
        return self._latest().graph

    @property
    def removed_padding(self) -> str | None:
        """The name of the input whose nonzero entries are the real tokens, when the most recent
        compile removed padding (outputs are zeros at padded positions: compare real positions
        only); None otherwise."""
        info = self._latest().graph.meta.get("removed_padding") if self._last else None
        return None if info is None else info.get("input")

    @property
    def sites(self) -> list[AttentionSite]:
        """Attention sites of the most recently used signature."""
        return self._latest().sites

    @property
    def source(self) -> str:
        """Generated program text of the most recently used signature."""
        return self._latest().program.source

    @property
    def kernels(self) -> dict[str, str]:
        """Sources of the generated Triton kernels the attention sites run, by kernel name.

        With ``backend="triton"`` or ``"triton-interpret"`` these are exactly the kernels that
        run when the process can run Triton kernels at all (the same decision serves both;
        otherwise compile warns and the torch kernels run); with the torch backend, those a
        Triton backend would run.
        """
        from attnopt.runtime.triton.backend import kernel_sources_for

        entry = self._latest()
        return kernel_sources_for(
            entry.graph, interpret=entry.kernels.backend == "triton-interpret"
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """Provenance of the passes that produced the current graph."""
        return self._latest().pass_history

    def explain(self) -> list[tuple[str, str]]:
        """Near-misses of attention detection: ``(where, why it was not fused)``."""
        return self._latest().explanations

    # --- generation -------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Generate tokens like ``model.generate``, with compiled prefill and decode programs.

        The first call captures the model twice (prompt pass, one-token step; both with
        symbolic batch and length) and compiles them; later calls of any batch, prompt length
        and token count reuse them. The prompt pass runs this module's pipeline; decode steps
        run the exact pipeline, growing a static key/value cache in place (see
        :mod:`attnopt.generation`). Greedy tokens equal ``model.generate``'s.

        Args:
            input_ids: ``[batch, length]`` prompt token ids (left padding for batches).
            attention_mask: ``[batch, length]``, 0 at padding (default: inferred from
                ``pad_token_id`` as transformers does, else all ones).
            **options: ``max_new_tokens``, ``max_length``, ``do_sample``, ``temperature``,
                ``top_k``, ``top_p``, ``repetition_penalty``, ``min_new_tokens``,
                ``eos_token_id``, ``pad_token_id`` (GenerationConfig semantics, over the model's
                ``generation_config`` or a ``generation_config=`` given, as pipelines pass);
                ``generator`` (a ``torch.Generator`` for sampling; the
                global RNG otherwise, as ``model.generate`` uses); ``max_cache_len`` (refuse
                requests needing more cache positions); ``record_steps`` (keep each decode
                step's end time in ``generation_stats.token_seconds``).

        Returns:
            ``[batch, length + new]`` token ids: the prompt followed by the generated tokens
            (``pad_token_id`` after a row's EOS), as ``model.generate`` returns them.

        Raises:
            GenerationError: not a decoder-only causal LM, an option not implemented (beam
                search, several sequences per prompt, ...), or a length past ``max_cache_len``,
                the model's learned positions or its own sliding window.

        Streaming: compiled with one ``sliding-window{window,sinks}`` pass over every site, the
        decode steps keep only the sinks and the ``window`` most recent positions in the cache
        (StreamingLLM eviction; see :class:`attnopt.generation.Streaming`): memory and the time
        per token stay flat however many tokens are generated.
        """
        if self._generator is None:
            streaming, reason = streaming_of(self.pipeline.passes)
            if reason is not None:
                message = (
                    f"attnopt: sliding-window applies to the prompt pass of "
                    f"{type(self.model).__name__} only, not to its decode steps: {reason}. "
                    "Decode steps are exact and keep every position; for a bounded cache "
                    "(StreamingLLM) use one sliding-window{window,sinks} over every site."
                )
                if self.strict:
                    raise PassError(message + " (strict=True)")
                warnings.warn(message, UserWarning, stacklevel=2)
            self._generator = Generator(self.model, self._compile_step, streaming)
        return self._generator.generate(input_ids, attention_mask, **options)

    def _compile_step(self, module: torch.nn.Module, pipeline: str | None) -> CompiledModule:
        """A generation step compiled with this module's options (``pipeline`` None: its own)."""
        return CompiledModule(
            module,
            self.pipeline if pipeline is None else as_pipeline(pipeline),
            backend=self.backend,
            method=self.method,
            retain_memory=self.retain_memory,
            strict=self.strict,
            # One program for every prompt length: a per-shape program that proves more (a
            # window inert at this length) would compile again for each new prompt length.
            check_static=False,
        )

    @property
    def generation_stats(self) -> GenerationStats | None:
        """Times and counts of the last :meth:`generate` call (None before one)."""
        return None if self._generator is None else self._generator.stats

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as (model, plan JSON, options): never programs, kernels or calibration data."""
        if self._plan is None and self.calibration is not None:
            raise pickle.PicklingError(
                "this CompiledModule has calibration data but no plan yet: compile it once "
                "(call it, or compile_for(...)) before pickling, so workers replay its plan"
            )
        return {
            "model": self.model,
            "pipeline": self.pipeline,
            "plan": None if self._plan is None else self._plan.to_json(),
            "options": {
                "backend": self.backend,
                "max_signatures": self.max_signatures,
                "method": self.method,
                "retain_memory": self.retain_memory,
                "dynamic": self.dynamic,
                "strict": self.strict,
            },
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`: nothing compiled until the first call."""
        plan = None if state["plan"] is None else Plan.from_json(state["plan"])
        self.__init__(state["model"], state["pipeline"], plan=plan, **state["options"])

    def __getattr__(self, name: str) -> Any:
        """Attributes this module does not define are the wrapped model's (``config``,
        ``device``, ``dtype``, ``get_input_embeddings``, ...), as with torch.compile's wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def __repr__(self) -> str:
        return (
            f"CompiledModule({type(self.model).__name__}, passes={str(self.pipeline)!r}, "
            f"backend={self.backend!r}, compilations={self.stats['compilations']})"
        )
