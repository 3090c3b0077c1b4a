"""IR-text pass tests: each file in cases/ holds a pipeline, an input graph, the expected number
of rewrites and the expected output graph. One harness runs them all.

File format::

    # pipeline: <pipeline text>
    # rewrites: <N>
    # executor: reference        (optional)
    <input IR>
    # expect
    <expected IR>

With ``# executor: reference`` the case runs with an executor for passes that calibrate (head
pruning): every ``param`` gets a seeded random tensor, the example batch is seeded random inputs of
the graph's input types, and :func:`_reference_executor` runs the graph node by node through the
ops' torch reference implementations.

Regenerate the expected parts (after checking the change is right) with
``ATTNOPT_REGEN_CASES=1 pytest tests/passes/test_ir_cases.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import attnopt  # noqa: F401 - registers passes and ops
from attnopt import PassManager
from attnopt.ir import Graph, TensorType, get_op, parse, verify
from attnopt.passes.base import PassContext

CASES = sorted((Path(__file__).parent / "cases").glob("*.ir"))
HEADER_KEYS = ("pipeline", "rewrites", "executor")
SEED = 0


def _read(path: Path) -> dict:
    header: dict[str, str] = {}
    body, expect, target = [], [], None
    for line in path.read_text().splitlines():
        if any(line.startswith(f"# {key}:") for key in HEADER_KEYS):
            key, _, value = line[2:].partition(":")
            header[key] = value.strip()
        elif line.strip() == "# expect":
            target = expect
        else:
            (body if target is None else expect).append(line)
    return {"header": header, "input": "\n".join(body).strip(), "expect": "\n".join(expect).strip()}


def _random(type_: TensorType, generator: torch.Generator) -> torch.Tensor:
    if type_.dtype.is_floating_point:
        return torch.randn(type_.shape, generator=generator).to(type_.dtype)
    return torch.ones(type_.shape, dtype=type_.dtype)


def _reference_executor(
    graph: Graph, args: tuple, kwargs: dict, record_inputs: bool = False
) -> tuple[list[Any], dict[int, Any]]:
    """Run ``graph`` through each op's reference implementation (the PassContext executor
    contract): ``(outputs, taps)``, taps by site index."""
    assert not kwargs, "IR graphs take positional inputs"
    values: dict[Any, Any] = dict(zip(graph.inputs, args))
    taps: dict[int, Any] = {}
    for node in graph.nodes:
        inputs = [None if value is None else values[value] for value in node.inputs]
        if node.op == "param":
            result = graph.tensors[node.attrs.name]
        else:
            result = get_op(node.op).impl(inputs, node.attrs)
        values.update(zip(node.outputs, result if len(node.outputs) > 1 else (result,)))
        if node.op == "attention":
            if record_inputs:
                taps.setdefault(node.attrs.site, []).append(inputs)
            else:
                taps[node.attrs.site] = result
    return [values[value] for value in graph.outputs], taps


def _context(case: dict, graph: Graph) -> PassContext:
    executor = case["header"].get("executor")
    if executor is None:
        return PassContext()
    assert executor == "reference", f"unknown executor {executor!r}"
    generator = torch.Generator().manual_seed(SEED)
    for node in graph.find("param"):
        graph.tensors[node.attrs.name] = _random(node.output.tensor_type, generator)
    example = tuple(_random(value.tensor_type, generator) for value in graph.inputs)
    return PassContext(executor=_reference_executor, example=(example, {}))


def _run(case: dict) -> tuple[str, int]:
    graph = parse(case["input"])
    ctx = _context(case, graph)
    verify(graph)
    results = PassManager.parse(case["header"]["pipeline"]).run(graph, ctx)
    graph.dead_code_elimination()
    verify(graph)
    return str(graph), sum(r.rewrites for r in results)


def test_there_are_enough_cases():
    assert len(CASES) >= 10
    assert sum("no_fire" in path.stem for path in CASES) >= 5


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_ir_case(path):
    case = _read(path)
    output, rewrites = _run(case)
    if os.environ.get("ATTNOPT_REGEN_CASES"):
        header = {**case["header"], "rewrites": rewrites}
        lines = [f"# {key}: {header[key]}" for key in HEADER_KEYS if key in header]
        path.write_text("\n".join(lines) + f"\n{case['input']}\n# expect\n{output}\n")
        return
    assert "rewrites" in case["header"] and case["expect"], f"{path.name} has no expectation yet"
    assert rewrites == int(case["header"]["rewrites"])
    assert output == case["expect"]
    if path.stem.endswith("no_fire"):
        assert rewrites == 0 and parse(output) == parse(case["input"])
