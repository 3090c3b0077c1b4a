"""Pass API: :class:`Pass`, :class:`PassResult`, :class:`PassContext`, :class:`PassManager`.

A pass is a frozen dataclass with a kebab-case ``name``, typed options (which double as the
pipeline-text options: ``sliding-window{window=512,sinks=4}``), an ``exact`` flag and
``run(graph, ctx) -> PassResult``. Subclasses register themselves by name. A PassManager runs
passes in order, verifies the IR after each one, records provenance and can dump the IR.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attnopt.errors import CalibrationError, PassError, PipelineError, PlanError
from attnopt.ir import Graph, verify
from attnopt.passes.plan import Plan, site_table
from attnopt.passes.select import Site

_PASSES: dict[str, type[Pass]] = {}


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        changed: whether the graph changed.
        rewrites: how many rewrites fired.
        notes: human-readable remarks (refusals, choices).
        declined: ``(site, reason)`` for each site the pass was asked to rewrite (its options
            select it) and left as it is, or rewrote without an option it was given. The compile
            driver tells the user about them once (``strict=True`` raises instead).
    """

    changed: bool
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)
    declined: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class PassContext:
    """Shared state for one compilation.

    Attributes:
        calibration: iterable of ``(args, kwargs)`` for passes that score heads/layers/tokens.
        budget: accuracy budget for the budgeted search.
        backend: the runtime backend the result will run on.
        model: the original module (read-only; for calibration runs).
        example: the example ``(args, kwargs)`` being compiled.
        explanations: near-misses recorded by detection, as ``(where, reason)``.
        history: provenance of every pass run so far.
        executor: ``executor(graph, args, kwargs, record_inputs=False) -> (outputs, taps)`` runs a
            graph of this compilation on model inputs (set by the runtime; passes that calibrate
            use it). ``taps`` maps site index to its output, or with ``record_inputs`` to the list
            of its input lists.
        plan: the :class:`~attnopt.passes.plan.Plan` this compilation records its decisions in
            (None: not recorded).
        replay: a plan whose decisions the passes apply instead of calibrating (None: calibrate).
        position: the position of the running pass in its pipeline (set by the PassManager).

    A pass that decides from data asks :meth:`decision` first: while replaying it gets the
    recorded decision (and must apply it without calibrating); otherwise it gets None, calibrates,
    and stores what it decided with :meth:`record`.
    """

    calibration: Any = None
    budget: Any = None
    backend: str = "torch"
    model: Any = None
    example: Any = None
    explanations: list[tuple[str, str]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    executor: Any = None
    plan: Plan | None = None
    replay: Plan | None = None
    position: int = 0
    _site_keys: dict[int, str] | None = field(default=None, repr=False)

    @property
    def replaying(self) -> bool:
        """True when decisions come from :attr:`replay` (no calibration)."""
        return self.replay is not None

    def enter_pass(self, position: int, pass_: Pass, graph: Graph) -> None:
        """Called by the PassManager before each pass. Before the first lossy pass, the graph's
        sites are taken into the recorded plan and, when replaying, checked against the replayed
        plan's, so a plan that does not fit fails before any decision is applied.

        Args:
            position: the pass's position in the pipeline.
            pass_: the pass.
            graph: the graph it is about to run on.

        Raises:
            PlanError: the replayed plan's sites are not this graph's.
        """
        self.position = position
        if not pass_.exact:
            self.take_sites(graph)

    def take_sites(self, graph: Graph) -> None:
        """Record (and, when replaying, check) the graph's site table once per compilation."""
        if self._site_keys is not None:
            return
        table = site_table(graph)
        if self.replay is not None:
            self.replay.check_sites(table)
        if self.plan is not None:
            self.plan.sites = table
        self._site_keys = {site.index: site.key for site in table}

    def site_key(self, site: Site) -> str:
        """The plan key of ``site`` (its module path; see :mod:`attnopt.passes.plan`)."""
        if self._site_keys is not None and site.index in self._site_keys:
            return self._site_keys[site.index]
        return site.module or f"site:{site.index}"

    def decision(self, pass_: Pass, site: Site) -> dict[str, Any] | None:
        """The replayed decision of ``pass_`` for ``site``, or None when not replaying.

        Args:
            pass_: the running pass.
            site: the site it decides for.

        Returns:
            The decision (also recorded into :attr:`plan`), or None: calibrate and :meth:`record`.

        Raises:
            PlanError: replaying, and the plan holds no decision of this pass for this site.
        """
        if self.replay is None:
            return None
        key = self.site_key(site)
        decision = self.replay.decision(self.position, str(pass_), key)
        if decision is None:
            raise PlanError(
                f"the plan has no {pass_} decision for site {key!r} (site {site.index}): it was "
                "made for another model or edited; re-create it by compiling with calibration"
            )
        if self.plan is not None:
            self.plan.record(self.position, str(pass_), key, decision)
        return decision

    def record(self, pass_: Pass, site: Site, decision: dict[str, Any]) -> None:
        """Store what ``pass_`` decided for ``site`` from data (plain JSON data).

        Args:
            pass_: the running pass.
            site: the site.
            decision: the decision; replaying it must reproduce the rewrite.
        """
        if self.plan is not None:
            self.plan.record(self.position, str(pass_), self.site_key(site), decision)

    def calibration_batches(self) -> list[tuple[tuple, dict]]:
        """Calibration ``(args, kwargs)`` batches, or the example being compiled when none."""
        if self.calibration is not None:
            batches = [calibration_batch(item, i) for i, item in enumerate(self.calibration)]
            if batches:
                return batches
        if self.example is not None:
            return [self.example]
        return []


def calibration_batch(item: Any, position: int, what: str = "calibration") -> tuple[tuple, dict]:
    """One calibration item as ``(args, kwargs)``: a pair, a dict of keyword inputs (a
    tokenizer's output) or a single tensor.

    Args:
        item: the item.
        position: its index, for the error.
        what: the data's name, for the error (``"calibration"``, ``"validation"``).

    Returns:
        ``(args, kwargs)``.

    Raises:
        CalibrationError: anything else, naming its index.
    """
    import torch

    if isinstance(item, dict) or hasattr(item, "keys") and hasattr(item, "__getitem__"):
        return (), dict(item)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)) and len(item) == 2:
        args, kwargs = item
        if isinstance(args, torch.Tensor):
            args = (args,)
        if isinstance(args, (tuple, list)) and (kwargs is None or isinstance(kwargs, dict)):
            return tuple(args), dict(kwargs or {})
    raise CalibrationError(
        f"{what} batch {position} is a {type(item).__name__}, which does not fit: give "
        "(args, kwargs) pairs, dicts of keyword inputs (a tokenizer's output) or single tensors"
    )


@dataclass(frozen=True)
class Pass:
    """Base class of passes. Subclasses are frozen dataclasses that set ``name``.

    Class attributes:
        name: kebab-case name used in pipeline text.
        exact: True when the pass never changes results beyond float rounding.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
                raise ValueError(f"pass name {name!r} must be kebab-case")
            _PASSES[name] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; raise :class:`PipelineError` naming the option. Override freely."""
        _check_types(self)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place.

        Args:
            graph: the graph.
            ctx: the compilation context.

        Returns:
            What changed.
        """
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def options(self) -> dict[str, Any]:
        """The option values, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            opts.append(f"{f.name}={_format_option(value)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def registered_passes() -> dict[str, type[Pass]]:
    """Registered pass classes by name."""
    return dict(_PASSES)


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_option(v) for v in value) + "]"
    return str(value)


def _hints(cls: type) -> dict[str, Any]:
    import torch

    return typing.get_type_hints(cls, localns={"torch": torch})


def _check_value(name: str, value: Any, hint: Any, owner: str) -> None:
    origin = typing.get_origin(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        problems = []
        for option in typing.get_args(hint):
            try:
                _check_value(name, value, option, owner)
                return
            except PipelineError as err:
                problems.append(str(err))
        raise PipelineError(f"{owner}: option {name}={value!r} is not {_hint_name(hint)}")
    if hint is type(None):
        if value is not None:
            raise PipelineError(f"{owner}: option {name} must be none")
        return
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise PipelineError(f"{owner}: option {name}={value!r} must be a list")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        for v in value:
            _check_value(name, v, item, owner)
        return
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise PipelineError(f"{owner}: option {name}={value!r} must be one of {choices}")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise PipelineError(f"{owner}: option {name} must be finite")
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        ok = True
    if not ok:
        raise PipelineError(
            f"{owner}: option {name}={value!r} must be {_hint_name(hint)}, "
            f"not {type(value).__name__}"
        )


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _check_types(p: Pass) -> None:
    hints = _hints(type(p))
    for f in dataclasses.fields(p):
        _check_value(f.name, getattr(p, f.name), hints.get(f.name, Any), p.name)


# ----------------------------------------------------------------------------------------------
# Pipeline text
# ----------------------------------------------------------------------------------------------
def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced brackets in {text!r}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise PipelineError(f"unbalanced brackets in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_option_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        if not text.endswith("]"):
            raise PipelineError(f"bad list {text!r}")
        return tuple(_parse_option_value(t) for t in _split_top(text[1:-1], ","))
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    return text.strip("\"'")


def parse_pass(text: str) -> Pass:
    """Build one pass from its text form ``name{opt=value,...}``.

    Args:
        text: e.g. ``"sliding-window{window=512,sinks=4}"``.

    Returns:
        The pass.

    Raises:
        PipelineError: unknown pass, unknown option, or an option of the wrong type or range.
    """
    match = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?\s*", text, re.S)
    if not match:
        raise PipelineError(f"cannot read pass {text!r}; expected name{{option=value,...}}")
    name, body = match.group(1), match.group(2)
    cls = _PASSES.get(name)
    if cls is None:
        known = ", ".join(sorted(_PASSES))
        raise PipelineError(f"unknown pass {name!r}; known passes: {known}")
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {}
    for item in _split_top(body or "", ","):
        if "=" not in item:
            raise PipelineError(f"{name}: option {item!r} needs a value (option=value)")
        key, raw = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        if key not in fields_by_name:
            raise PipelineError(
                f"{name}: unknown option {key!r}; options: {', '.join(fields_by_name) or 'none'}"
            )
        options[key] = _parse_option_value(raw)
    hints = _hints(cls)
    for key, value in list(options.items()):
        hint = hints.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and _accepts_float(hint):
            if not _accepts_int(hint):
                options[key] = float(value)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        and f.name not in options
    ]
    if missing:
        raise PipelineError(
            f"{name}: option {', '.join(missing)} is required ({name}{{{missing[0]}=...}})"
        )
    try:
        return cls(**options)
    except PipelineError:
        raise
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{name}: {err}") from None


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _accepts_int(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


class PassManager:
    """Runs passes in order with verification, provenance and optional IR dumps.

    Args:
        passes: the passes.
        verify_each: run the IR verifier after every pass.
        dump_dir: when set, write ``NN-before-<pass>.ir`` / ``NN-after-<pass>.ir`` files there.
    """

    def __init__(
        self,
        passes: Iterable[Pass] = (),
        *,
        verify_each: bool = True,
        dump_dir: str | Path | None = None,
    ):
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"{p!r} is not an attnopt.Pass")
        self.verify_each = verify_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> PassManager:
        """Build a pipeline from text: ``"fuse-attention,sliding-window{window=512,sinks=4}"``.

        Args:
            text: comma-separated passes with ``{option=value}`` blocks.
            **kwargs: forwarded to the constructor.

        Returns:
            The pipeline.

        Raises:
            PipelineError: naming the pass or option that is wrong.
        """
        if not isinstance(text, str):
            raise PipelineError(f"a pipeline is text, not {type(text).__name__}")
        return cls([parse_pass(item) for item in _split_top(text, ",")], **kwargs)

    @property
    def exact(self) -> bool:
        """True when every pass is exact."""
        return all(p.exact for p in self.passes)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"PassManager({str(self)!r})"

    def run(self, graph: Graph, ctx: PassContext | None = None) -> list[PassResult]:
        """Run every pass on ``graph`` in place.

        Args:
            graph: the graph.
            ctx: the context (a fresh one when None).

        Returns:
            One result per pass.

        Raises:
            PassError: naming the failing pass and the passes before it.
            PlanError: ``ctx.replay`` does not fit this pipeline or graph (raised before the first
                lossy pass rewrites anything).
        """
        ctx = ctx or PassContext()
        if ctx.replay is not None:
            ctx.replay.check_pipeline(self.passes)
        results = []
        for position, p in enumerate(self.passes):
            before = [str(q) for q in self.passes[:position]]
            if self.dump_dir is not None:
                self._dump(graph, f"{position:02d}-before-{p.name}.ir")
            start = time.perf_counter()
            try:
                ctx.enter_pass(position, p, graph)
                result = p.run(graph, ctx)
            except (PassError, PlanError, PipelineError, CalibrationError):
                raise  # a pass option or calibration data that does not fit is the user's
            except Exception as err:  # noqa: BLE001 - wrapped with the pipeline for the user
                raise PassError(
                    f"pass {p} failed: {type(err).__name__}: {err} "
                    f"(after: {', '.join(before) or 'nothing'})"
                ) from err
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p} returned {type(result).__name__}, not PassResult")
            if self.verify_each:
                try:
                    verify(graph)
                except Exception as err:  # noqa: BLE001
                    raise PassError(
                        f"pass {p} left an invalid graph: {err} "
                        f"(after: {', '.join(before) or 'nothing'})"
                    ) from err
            seconds = time.perf_counter() - start
            record = {
                "pass": p.name,
                "options": p.options(),
                "text": str(p),
                "exact": p.exact,
                "seconds": seconds,
                "changed": result.changed,
                "rewrites": result.rewrites,
                "notes": list(result.notes),
                "declined": [[int(i), str(r)] for i, r in result.declined],
            }
            ctx.history.append(record)
            graph.meta.setdefault("provenance", []).append(record)
            if self.dump_dir is not None:
                self._dump(graph, f"{position:02d}-after-{p.name}.ir")
            results.append(result)
        ctx.take_sites(graph)
        return results

    def _dump(self, graph: Graph, filename: str) -> None:
        assert self.dump_dir is not None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / filename).write_text(str(graph) + "\n")


def as_pipeline(passes: str | Sequence[Pass] | PassManager | None) -> PassManager:
    """Normalise the ``passes=`` argument of ``attnopt.compile``.

    Args:
        passes: "exact", "none", pipeline text, a list of passes, or a PassManager.

    Returns:
        A PassManager.
    """
    if passes is None or passes == "none":
        return PassManager([])
    if isinstance(passes, PassManager):
        return passes
    if passes == "exact":
        return PassManager.parse("canonicalize,fuse-attention")
    if isinstance(passes, str):
        return PassManager.parse(passes)
    if isinstance(passes, Pass):
        return PassManager([passes])
    if isinstance(passes, (list, tuple)):
        return PassManager(passes)
    raise PipelineError(
        f"passes must be 'exact', 'none', pipeline text, a list of Pass or a PassManager; "
        f"got {type(passes).__name__}"
    )
