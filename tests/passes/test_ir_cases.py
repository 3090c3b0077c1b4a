"""IR-text pass tests: each file in cases/ holds a pipeline, an input graph, the expected number
of rewrites and the expected output graph. One harness runs them all.

File format::

    # pipeline: <pipeline text>
    # rewrites: <N>
    <input IR>
    # expect
    <expected IR>

Regenerate the expected parts (after checking the change is right) with
``ATTNOPT_REGEN_CASES=1 pytest tests/passes/test_ir_cases.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import attnopt  # noqa: F401 - registers passes and ops
from attnopt import PassManager
from attnopt.ir import parse, verify
from attnopt.passes.base import PassContext

CASES = sorted((Path(__file__).parent / "cases").glob("*.ir"))


def _read(path: Path) -> dict:
    header: dict[str, str] = {}
    body, expect, target = [], [], None
    for line in path.read_text().splitlines():
        if line.startswith("# pipeline:") or line.startswith("# rewrites:"):
            key, _, value = line[2:].partition(":")
            header[key] = value.strip()
        elif line.strip() == "# expect":
            target = expect
        else:
            (body if target is None else expect).append(line)
    return {"header": header, "input": "\n".join(body).strip(), "expect": "\n".join(expect).strip()}


def _run(case: dict) -> tuple[str, int]:
    graph = parse(case["input"])
    verify(graph)
    results = PassManager.parse(case["header"]["pipeline"]).run(graph, PassContext())
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
        path.write_text(
            f"# pipeline: {case['header']['pipeline']}\n# rewrites: {rewrites}\n"
            f"{case['input']}\n# expect\n{output}\n"
        )
        return
    assert "rewrites" in case["header"] and case["expect"], f"{path.name} has no expectation yet"
    assert rewrites == int(case["header"]["rewrites"])
    assert output == case["expect"]
    if path.stem.endswith("no_fire"):
        assert rewrites == 0 and parse(output) == parse(case["input"])
