"""Plans: every decision passes make from calibration data or measurement, in one JSON object.

Entry points: :class:`Plan`, :class:`PlanSite`, :func:`site_table`.

A compile records its plan on its first input signature (``cm.plan``); every later compilation
(another batch size or length), a worker that unpickled the compiled module, or
``attnopt.compile(model, plan=path)`` in another session replays it: the passes apply the recorded
decisions instead of calibrating, so no calibration data is needed and the outputs are those of the
first compile. Plans are JSON, never pickle.

The JSON form (``FORMAT`` ``"attnopt.plan"``, ``VERSION`` 1)::

    {"format": "attnopt.plan", "version": 1,
     "model": "BertModel",
     "pipeline": "canonicalize,fuse-attention,head-prune{keep=0.5}",
     "sites": [{"key": "encoder.layer.0.attention.self", "module": "encoder.layer.0.attention.self",
                "layer": 0, "index": 0, "kind": "self", "causal": false,
                "num_heads": 12, "num_kv_heads": 12, "head_dim": 32}, ...],
     "decisions": [{"position": 2, "pass": "head-prune{keep=0.5}",
                    "sites": {"encoder.layer.0.attention.self": {"heads_kept": [0, 3, ...]}}}]}

Sites are keyed by module path, which holds the layer index (``encoder.layer.3.attention.self``),
so a plan survives re-capture at any shape; a module that runs attention more than once gets
``#1``, ``#2``, ... on its later sites, and a site without a module path is keyed by its index
(``site:3``). ``sites`` is the table of sites as the first lossy pass saw them (shape-free facts
only); a replay compares it with the graph's before any decision is applied, so a plan made for
another model, layer count or head layout fails with :class:`~attnopt.errors.PlanError` and
nothing is half-applied. What each decision holds is the pass's business (its module docstring says).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attnopt.errors import PlanError
from attnopt.ir import Graph
from attnopt.passes.select import Site

__all__ = ["FORMAT", "VERSION", "Plan", "PlanSite", "site_table"]

FORMAT = "attnopt.plan"
VERSION = 1


@dataclass(frozen=True)
class PlanSite:
    """The shape-free facts of one attention site, as a plan records them.

    Attributes:
        key: the site's key in the plan (module path, ``#n`` for repeats, or ``site:<index>``).
        module: module path, when known.
        layer: layer index from the module path, when there is one.
        index: site index in graph order (the key's fallback only).
        kind: "self" or "cross".
        causal: whether the site is causal.
        num_heads: query heads; None where the size is symbolic (a ``bmm`` form folds heads
            into the batch, which a symbolic compile cannot split).
        num_kv_heads: key/value heads; None where symbolic.
        head_dim: query/key head dimension; None where symbolic.
    """

    key: str
    module: str | None
    layer: int | None
    index: int
    kind: str
    causal: bool
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None

    def describe(self) -> str:
        """``'<key>' (layer L, site I)`` for messages."""
        layer = f"layer {self.layer}, " if self.layer is not None else ""
        return f"{self.key!r} ({layer}site {self.index})"


def _site_key(site: Site, seen: dict[str, int]) -> str:
    if not site.module:
        return f"site:{site.index}"
    count = seen.get(site.module, 0)
    seen[site.module] = count + 1
    return site.module if count == 0 else f"{site.module}#{count}"


def _concrete(dim: int | str) -> int | None:
    return dim if isinstance(dim, int) else None


def site_table(graph: Graph) -> list[PlanSite]:
    """The plan's view of every attention site of ``graph``, in site order.

    Args:
        graph: a graph after attention detection.

    Returns:
        One :class:`PlanSite` per ``attention`` node with a site index.
    """
    seen: dict[str, int] = {}
    table = []
    sites = sorted((Site(node) for node in graph.find("attention")), key=lambda s: s.index)
    for site in sites:
        if site.index < 0:
            continue
        table.append(
            PlanSite(
                key=_site_key(site, seen),
                module=site.module,
                layer=site.layer,
                index=site.index,
                kind=site.node.meta.get("site", {}).get("kind", "self"),
                causal=site.causal,
                num_heads=_concrete(site.q.shape[1]),
                num_kv_heads=_concrete(site.k.shape[1]),
                head_dim=_concrete(site.q.shape[3]),
            )
        )
    return table


@dataclass
class Plan:
    """Every decision a compile made from calibration data or measurement.

    Build one by compiling (``cm.plan``) or with :meth:`load`; reapply it with
    ``attnopt.compile(model, kwargs=..., plan=plan_or_path)``.

    Attributes:
        model: class name of the model the plan was made for.
        pipeline: the pass pipeline text it was made with.
        sites: the sites the first lossy pass saw (None until a compile took them).
        decisions: ``{(position, pass text): {site key: decision}}``; a decision is plain JSON data.
    """

    model: str
    pipeline: str
    sites: list[PlanSite] | None = None
    decisions: dict[tuple[int, str], dict[str, dict[str, Any]]] = field(default_factory=dict)

    # --- decisions --------------------------------------------------------------------------
    def decision(self, position: int, pass_text: str, key: str) -> dict[str, Any] | None:
        """The decision of the pass at ``position`` for site ``key``, or None when there is none."""
        return self.decisions.get((position, pass_text), {}).get(key)

    def record(self, position: int, pass_text: str, key: str, decision: dict[str, Any]) -> None:
        """Store one decision (as plain JSON data: tuples become lists).

        Args:
            position: the pass's position in the pipeline.
            pass_text: the pass's text form (``str(pass)``).
            key: the site's key.
            decision: the decision, JSON-serialisable.
        """
        try:
            data = json.loads(json.dumps(decision, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise PlanError(
                f"{pass_text}: decision for site {key!r} is not JSON data: {err}"
            ) from err
        self.decisions.setdefault((position, pass_text), {})[key] = data

    def site(self, key: str) -> PlanSite | None:
        """The recorded site with this key."""
        return next((s for s in self.sites or () if s.key == key), None)

    # --- checks -----------------------------------------------------------------------------
    def check_model(self, model_name: str) -> None:
        """Raise :class:`PlanError` unless the plan was made for a model of this class name."""
        if model_name != self.model:
            raise PlanError(
                f"the plan was made for a {self.model}, not a {model_name}: plans apply only to "
                "the architecture they were made for"
            )

    def check_pipeline(self, passes: Sequence[object]) -> None:
        """Raise :class:`PlanError` unless ``passes`` (Pass objects, in order) is the plan's
        pipeline and every decision belongs to one of its passes."""
        text = ",".join(str(p) for p in passes)
        if text != self.pipeline:
            raise PlanError(
                f"the plan was made with passes {self.pipeline!r}, not {text!r}: compile with the "
                "plan's pipeline (leave passes= out and it is used)"
            )
        for position, pass_text in self.decisions:
            if position >= len(passes) or str(passes[position]) != pass_text:
                raise PlanError(
                    f"the plan holds decisions of {pass_text!r} at position {position}, which "
                    f"is not in its pipeline {self.pipeline!r}"
                )

    def check_sites(self, table: list[PlanSite]) -> None:
        """Raise :class:`PlanError` naming the first difference between the recorded sites and
        ``table`` (the graph's, from :func:`site_table`)."""
        recorded = self.sites or []
        if len(recorded) != len(table):
            raise PlanError(
                f"the plan was made for a {self.model} with {len(recorded)} attention sites "
                f"({_layers(recorded)}); this model has {len(table)} ({_layers(table)})"
            )
        by_key = {s.key: s for s in table}
        for old in recorded:
            new = by_key.get(old.key)
            if new is None:
                raise PlanError(
                    f"the plan's site {old.describe()} is not in this model (its sites: "
                    f"{', '.join(repr(s.key) for s in table)})"
                )
            # Not ``kind``: self or cross is how a call wires q and kv (nn.MultiheadAttention
            # projects an unbatched query apart from its keys), not the model's head layout.
            for name in ("causal", "num_heads", "num_kv_heads", "head_dim"):
                recorded_value, value = getattr(old, name), getattr(new, name)
                if None not in (recorded_value, value) and recorded_value != value:
                    raise PlanError(
                        f"site {old.describe()}: the plan has {name}={getattr(old, name)!r}, "
                        f"this model has {getattr(new, name)!r}"
                    )
        for (_, pass_text), per_site in self.decisions.items():
            for key in per_site:
                if key not in by_key:
                    raise PlanError(f"{pass_text}: the plan decides for an unknown site {key!r}")

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON data."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "pipeline": self.pipeline,
            "sites": None if self.sites is None else [asdict(s) for s in self.sites],
            "decisions": [
                {"position": position, "pass": pass_text, "sites": per_site}
                for (position, pass_text), per_site in sorted(self.decisions.items())
            ],
        }

    def to_json(self) -> str:
        """The plan as JSON text (see the module docstring for the format)."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        """Read a plan from JSON text.

        Args:
            text: the JSON.
            source: what to call it in errors (a path, or "plan").

        Returns:
            The plan.

        Raises:
            PlanError: corrupt or truncated JSON, another format, a newer version, bad fields.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(
                f"{source}: not a plan: invalid JSON at line {err.lineno} column {err.colno} "
                f"({err.msg}); the file is corrupt or truncated"
            ) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> Plan:
        """Read a plan from plain data (the parsed JSON); raises :class:`PlanError`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"{source}: not an attnopt plan (format {found!r}, not {FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PlanError(f"{source}: bad format version {version!r}")
        if version > VERSION:
            raise PlanError(
                f"{source}: plan format version {version} is newer than this attnopt reads "
                f"(up to {VERSION}); upgrade attnopt or re-create the plan"
            )
        model, pipeline = data.get("model"), data.get("pipeline")
        if not isinstance(model, str) or not isinstance(pipeline, str):
            raise PlanError(f"{source}: 'model' and 'pipeline' must be strings")
        plan = cls(model=model, pipeline=pipeline, sites=_read_sites(data.get("sites"), source))
        blocks = data.get("decisions")
        if not isinstance(blocks, list):
            raise PlanError(f"{source}: 'decisions' must be a list")
        for block in blocks:
            if not (
                isinstance(block, dict)
                and isinstance(block.get("position"), int)
                and isinstance(block.get("pass"), str)
                and isinstance(block.get("sites"), dict)
                and all(isinstance(d, dict) for d in block["sites"].values())
            ):
                raise PlanError(f"{source}: bad decisions entry {str(block)[:120]!r}")
            plan.decisions[(block["position"], block["pass"])] = dict(block["sites"])
        return plan

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON to ``path`` (atomically: a temporary file, then a rename).

        Args:
            path: the file to write.

        Returns:
            The path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan saved by :meth:`save` from ``path`` (read as given; never unpickled).

        Args:
            path: the plan file.

        Returns:
            The plan.

        Raises:
            PlanError: the file cannot be read, or is not a valid plan.
        """
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise PlanError(f"cannot read plan {str(path)!r}: {err}") from err
        return cls.from_json(text, source=str(path))

    def __str__(self) -> str:
        count = sum(len(per_site) for per_site in self.decisions.values())
        return (
            f"Plan({self.model}, {self.pipeline!r}, {len(self.sites or [])} sites, "
            f"{count} decisions)"
        )


def _layers(table: list[PlanSite]) -> str:
    layers = {s.layer for s in table if s.layer is not None}
    return f"{len(layers)} layers" if layers else "no layer indices"


def _read_sites(raw: Any, source: str) -> list[PlanSite] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise PlanError(f"{source}: 'sites' must be a list")
    names = {f.name for f in fields(PlanSite)}
    sites = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != names:
            raise PlanError(f"{source}: bad site entry {str(entry)[:120]!r}")
        if not isinstance(entry["key"], str) or not isinstance(entry["index"], int):
            raise PlanError(f"{source}: bad site entry {str(entry)[:120]!r}")
        sites.append(PlanSite(**entry))
    return sites
