"""Command line: ``attnopt inspect | compile | validate | bench | demo``.

Entry point: :func:`main`. MODEL is a zoo name (``attnopt inspect bert``), ``module:factory``, or
an ONNX file (``attnopt compile model.onnx --passes exact --onnx-out optimised.onnx``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="zoo name (bert, gpt2, llama, t5, vit, swin, mha, "
        "encoder_layer, minilm), module.path:factory, or an ONNX file (model.onnx: dynamic "
        "dims get --batch and --seq)",
    )
    parser.add_argument(
        "--impl",
        default="eager",
        choices=["eager", "sdpa"],
        help="attention implementation of HF zoo models",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument(
        "--passes",
        default=None,
        help='"exact" (the default), "none", "auto" (the budgeted search) or pipeline text',
    )
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "triton", "triton-interpret"]
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--plan", default=None, help="a saved plan (JSON) to reapply instead of calibrating"
    )
    parser.add_argument("--plan-out", default=None, help="save the compile's plan (JSON) here")
    parser.add_argument(
        "--budget",
        default=None,
        help="accuracy budget for the budgeted search, e.g. cosine=0.98 or cosine=0.99,top1=0.98 "
        "(fields of attnopt.Budget); needs --calibration",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="your data: a .txt file (one text per line, tokenized with the model's tokenizer, "
        "padded to --seq, length-sorted batches of --batch) or a .json list of batches "
        '({"input name": nested list, ...})',
    )
    parser.add_argument("--validation", default=None, help="held-out data, as --calibration")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="time limit of the budgeted search"
    )
    parser.add_argument(
        "--search-out", default=None, help="save the search's report (JSON) and Pareto plot here"
    )
    parser.add_argument(
        "--onnx-out", default=None, help="export the compiled program to this ONNX file"
    )


def _load(ns: argparse.Namespace) -> Any:
    from attnopt.models import load_model

    if ns.model.endswith(".onnx"):
        return _load_onnx(ns)
    return load_model(ns.model, impl=ns.impl, batch=ns.batch, seq=ns.seq)


def _load_onnx(ns: argparse.Namespace) -> Any:
    """An ONNX file as a model (run in torch once compiled) with example inputs of --batch and
    --seq for its dynamic dims (see :func:`attnopt.frontend.onnx_import.example_inputs`)."""
    from attnopt.frontend.onnx_import import OnnxModule, example_inputs
    from attnopt.models import LoadedModel

    model = OnnxModule(ns.model)
    kwargs = example_inputs(model, batch=ns.batch, seq=ns.seq)
    return LoadedModel(Path(ns.model).stem, model, (), kwargs)


def parse_budget(text: str) -> Any:
    """``"cosine=0.98,top1=0.99"`` as an :class:`attnopt.Budget`.

    Args:
        text: comma-separated ``field=value`` pairs (cosine, sqnr_db, max_abs, rel_l2, top1).

    Returns:
        The budget.

    Raises:
        SystemExit: (via argparse-style message) for an unknown field or a bad value.
    """
    from attnopt import Budget

    fields = {"cosine", "sqnr_db", "max_abs", "rel_l2", "top1"}
    limits: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in fields:
            raise SystemExit(
                f"--budget {text!r}: each item is field=value with field one of "
                f"{', '.join(sorted(fields))}"
            )
        try:
            limits[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--budget {text!r}: {value!r} is not a number") from None
    try:
        return Budget(**limits)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--budget {text!r}: {err}") from None


def load_batches(path: str, model_name: str, batch: int, seq: int) -> list[dict[str, Any]]:
    """Calibration (or validation) batches from a file.

    A ``.txt`` file holds one text per line: they are tokenized with the model's tokenizer
    (the bundled MiniLM's), padded to ``seq`` and cut into length-sorted batches of ``batch``.
    A ``.json`` file holds a list of batches, each ``{"input name": nested list}`` (integers
    become int64 tensors, other numbers float32). Never unpickled.

    Args:
        path: the file.
        model_name: the model spec (for its tokenizer).
        batch: texts per batch.
        seq: padded length.

    Returns:
        Keyword-input batches.

    Raises:
        SystemExit: an unreadable or empty file, a format it cannot read.
    """
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"calibration file {path!r} does not exist")
    if file.suffix == ".txt":
        texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not texts:
            raise SystemExit(f"{path}: no texts (one text per line)")
        if model_name != "minilm":
            raise SystemExit(
                f"{path}: text calibration needs the model's tokenizer; only the bundled minilm "
                "has one here. Give a .json list of tokenized batches instead"
            )
        from attnopt.zoo.minilm import minilm_tokenizer

        tokenizer = minilm_tokenizer()
        texts.sort(key=lambda text: len(tokenizer(text)["input_ids"]))
        return [
            dict(
                tokenizer(
                    texts[i : i + batch],
                    padding="max_length",
                    max_length=seq,
                    truncation=True,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(texts), batch)
        ]
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a .txt file or JSON ({err})") from None
    if not isinstance(data, list) or not data or not all(isinstance(b, dict) for b in data):
        raise SystemExit(f"{path}: JSON must be a non-empty list of {{input name: list}} batches")
    batches = []
    for position, item in enumerate(data):
        converted = {}
        for name, value in item.items():
            try:
                tensor = torch.tensor(value)
            except (TypeError, ValueError) as err:
                raise SystemExit(f"{path}: batch {position}, input {name!r}: {err}") from None
            converted[name] = tensor if not tensor.is_floating_point() else tensor.float()
        batches.append(converted)
    return batches


def _compile(ns: argparse.Namespace, loaded: Any) -> Any:
    import attnopt

    budget = parse_budget(ns.budget) if getattr(ns, "budget", None) else None
    calibration = validation = None
    if getattr(ns, "calibration", None):
        calibration = load_batches(ns.calibration, ns.model, ns.batch, ns.seq)
    if getattr(ns, "validation", None):
        validation = load_batches(ns.validation, ns.model, ns.batch, ns.seq)
    if budget is not None and calibration is None and ns.plan is None:
        raise SystemExit("--budget needs --calibration FILE (your own data) to measure on")
    args, kwargs = loaded.args, loaded.kwargs
    if calibration is not None and budget is not None:
        args, kwargs = (), calibration[0]
    cm = attnopt.compile(
        loaded.model,
        args,
        kwargs,
        passes=ns.passes,
        backend=ns.backend,
        precision=ns.precision,
        plan=ns.plan,
        calibration=calibration,
        validation=validation,
        budget=budget,
        max_seconds=getattr(ns, "max_seconds", 300.0),
    )
    if ns.plan_out:
        print(f"plan -> {cm.plan.save(ns.plan_out)}")
    if getattr(ns, "onnx_out", None):
        print(f"ONNX -> {attnopt.export_onnx(cm, ns.onnx_out)}")
    if cm.search_report is not None and getattr(ns, "search_out", None):
        out = Path(ns.search_out)
        out.mkdir(parents=True, exist_ok=True)
        print(f"search report -> {cm.search_report.save(out / 'search.json')}")
        try:
            print(f"Pareto plot -> {cm.search_report.plot(out / 'search.png')}")
        except ImportError as err:
            print(f"no Pareto plot: {err}")
    return cm


def cmd_inspect(ns: argparse.Namespace) -> int:
    """Print the IR, a per-op summary, the attention sites, and optionally near-misses/costs."""
    from rich.console import Console
    from rich.table import Table

    from attnopt.ir.printer import op_summary

    console = Console()
    loaded = _load(ns)
    cm = _compile(ns, loaded)
    if ns.ir:
        print(str(cm.graph))
    table = Table(title=f"ops of {loaded.name} ({len(cm.graph.nodes)} nodes)")
    for column in ("op", "count", "GFLOP", "MB moved"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for op, count, flops, moved in op_summary(cm.graph)[: ns.top]:
        table.add_row(op, str(count), f"{flops / 1e9:.3f}", f"{moved / 1e6:.2f}")
    console.print(table)
    sites = Table(title="attention sites")
    for column in (
        "#",
        "module",
        "kind",
        "causal",
        "heads",
        "kv heads",
        "q_len",
        "kv_len",
        "mask",
        "bias",
        "variant",
        "tokens",
    ):
        sites.add_column(column)
    for s in cm.sites:
        sites.add_row(
            str(s.index),
            s.module or "-",
            s.kind,
            str(s.causal),
            str(s.num_heads),
            str(s.num_kv_heads),
            str(s.q_len),
            str(s.kv_len),
            s.mask_kind,
            str(s.has_bias),
            s.variant,
            f"{s.tokens_kept:.2f}",
        )
    console.print(sites)
    if ns.explain:
        misses = cm.explain()
        console.print(f"[bold]near-misses ({len(misses)})[/bold]")
        for where, why in misses:
            console.print(f"  {where}: {why}", markup=False)
        notes = [(r["text"], note) for r in cm.history for note in r.get("notes", ())]
        console.print(f"[bold]pass notes ({len(notes)})[/bold]")
        for text, note in notes:
            console.print(f"  {text}: {note}", markup=False)
    if ns.cost:
        from attnopt.runtime.roofline import site_costs

        costs = Table(title=f"roofline estimate on {ns.gpu} (an estimate, not a measurement)")
        for column in ("#", "GFLOP", "MB", "est. µs", "bound"):
            costs.add_column(column, justify="right")
        for row in site_costs(cm.graph, ns.gpu):
            costs.add_row(
                str(row["site"]),
                f"{row['flops'] / 1e9:.3f}",
                f"{row['bytes'] / 1e6:.2f}",
                f"{row['seconds'] * 1e6:.1f}",
                row["bound"],
            )
        console.print(costs)
    return 0


def cmd_compile(ns: argparse.Namespace) -> int:
    """Compile and write IR, program, kernels and sites to a directory."""
    loaded = _load(ns)
    start = time.perf_counter()
    cm = _compile(ns, loaded)
    seconds = time.perf_counter() - start
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph.ir").write_text(str(cm.graph) + "\n")
    (out / "program.py").write_text(cm.source)
    (out / "sites.json").write_text(json.dumps([s.to_dict() for s in cm.sites], indent=2))
    (out / "pipeline.txt").write_text(str(cm.pipeline) + "\n")
    kernels = cm.kernels
    if kernels:
        (out / "kernels").mkdir(exist_ok=True)
        for name, source in kernels.items():
            (out / "kernels" / f"{name}.py").write_text(source)
    print(
        f"compiled {loaded.name} in {seconds:.2f} s: {len(cm.sites)} attention sites, "
        f"{len(kernels)} kernels -> {out}"
    )
    return 0


def cmd_validate(ns: argparse.Namespace) -> int:
    """Compile with --passes, compare with the original, print and save the report."""
    import attnopt
    from attnopt.validate import Budget

    loaded = _load(ns)
    cm = _compile(ns, loaded)
    tolerance: Any = ns.tolerance
    if ns.cosine is not None:
        tolerance = Budget(cosine=ns.cosine)
    report = attnopt.validate(
        loaded.model, cm, loaded.args, loaded.kwargs, tolerance=tolerance, oracle=ns.oracle
    )
    print(report)
    if ns.out:
        written = report.save(ns.out)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0 if report.ok else 1


def cmd_bench(ns: argparse.Namespace) -> int:
    """Time eager against the compiled model (median of --repeats)."""
    from rich.console import Console
    from rich.table import Table

    loaded = _load(ns)
    start = time.perf_counter()
    cm = _compile(ns, loaded)
    setup = time.perf_counter() - start

    def timed(fn: Any) -> float:
        with torch.no_grad():
            fn()
            samples = []
            for _ in range(ns.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return sorted(samples)[len(samples) // 2]

    eager = timed(lambda: loaded.model(*loaded.args, **loaded.kwargs))
    ours = timed(lambda: cm(*loaded.args, **loaded.kwargs))
    table = Table(title=f"{loaded.name}: passes={cm.pipeline}")
    for column in ("", "ms", "speed-up"):
        table.add_column(column, justify="right")
    table.add_row("eager", f"{eager * 1e3:.2f}", "1.00x")
    table.add_row("attnopt", f"{ours * 1e3:.2f}", f"{eager / ours:.2f}x")
    Console().print(table)
    print(f"capture+compile: {setup:.2f} s")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    """Run the MiniLM demo."""
    from attnopt.demo import run_demo

    result = run_demo(batch_size=ns.batch_size, repeats=ns.repeats)
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="attnopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print IR, op summary and attention sites")
    _add_model_args(p)
    p.add_argument("--ir", action="store_true", help="print the whole IR")
    p.add_argument("--explain", action="store_true", help="list attention near-misses and why")
    p.add_argument("--cost", action="store_true", help="roofline estimate per site")
    p.add_argument("--gpu", default="h100", help="GPU for --cost (h100, a100)")
    p.add_argument("--top", type=int, default=15, help="rows of the op summary")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("compile", help="compile and write IR, program and kernels")
    _add_model_args(p)
    p.add_argument("--out", default="attnopt-out")
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("validate", help="numerics report of --passes against the original")
    _add_model_args(p)
    p.add_argument("--tolerance", default="exact")
    p.add_argument("--cosine", type=float, default=None, help="lossy budget: minimum cosine")
    p.add_argument("--oracle", action="store_true", help="judge against a float64 run")
    p.add_argument("--out", default=None, help="directory for report.json and PNG plots")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("bench", help="time eager vs compiled")
    _add_model_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("demo", help="compile the real MiniLM and compare with Hugging Face")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnopt`` command.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit code.
    """
    ns = build_parser().parse_args(argv)
    if getattr(ns, "backend", None) == "triton-interpret" and "triton" not in sys.modules:
        # The command is its own process and the user asked for the interpreter: Triton reads
        # this once, when it is first imported (attnopt.compile itself never sets it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from attnopt.errors import AttnoptError

    try:
        return ns.fn(ns)
    except (AttnoptError, ValueError) as err:
        print(f"attnopt {ns.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
