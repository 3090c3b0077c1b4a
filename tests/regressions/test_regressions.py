"""Regression cases of the bugs the fuzzers (tests/fuzz) found; one harness runs them all.

- ``*.ir``: IR text the parser must reject with :class:`attnopt.ir.parser.IRParseError` (header
  ``# expect: parse-error``; lines starting with ``#`` are comments, not IR).
- :data:`tests.regressions.modules.CASES`: minimal modules that must compile to their eager
  outputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt.ir.parser import IRParseError, parse
from tests.regressions.modules import CASES

IR_CASES = sorted(Path(__file__).parent.glob("*.ir"))


def _read(path: Path) -> tuple[dict[str, str], str]:
    header, body = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() == "expect":
                header["expect"] = value.strip()
        else:
            body.append(line)
    return header, "\n".join(body)


@pytest.mark.parametrize("path", IR_CASES, ids=[p.stem for p in IR_CASES])
def test_ir_case(path: Path) -> None:
    """Each IR case parses, or is rejected with IRParseError, as its header says."""
    header, text = _read(path)
    assert header.get("expect") == "parse-error", f"{path.name}: unknown expectation"
    with pytest.raises(IRParseError):
        parse(text)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=case.known_bug, strict=True))
        if case.known_bug
        else name
        for name, case in sorted(CASES.items())
    ],
)
def test_module_case(name: str) -> None:
    """Each module case compiles to eager's outputs (NaN/inf where eager has them, only there)."""
    case = CASES[name]
    model = case.build().eval()
    args, kwargs = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = attnopt.compile(model, args, kwargs, passes=case.passes, dynamic=case.dynamic)
    assert cm.sites, "the case no longer fuses: it tests nothing"
    for tensor in [*args, *kwargs.values()]:  # the caller's inputs are left as they were
        assert not [key for key in vars(tensor) if key.startswith("_dynamo")], str(vars(tensor))
    with torch.no_grad():
        expected, actual = model(*args, **kwargs), cm(*args, **kwargs)
    assert torch.equal(torch.isfinite(expected), torch.isfinite(actual)), str(cm.graph)
    if not case.lossy:
        report = attnopt.validate(model, cm, args, kwargs, tolerance="exact", sites=False)
        assert report.ok, f"{report}\n{cm.graph}"
