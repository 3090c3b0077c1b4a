"""The expected status of every zoo model under a few pipelines, recorded in
``tests/expected_status.json`` and checked: how many sites fuse, what each runs as, which mask
kind was proved, whether the outputs keep the pipeline's verdict.

A regression fails, and so does an unrecorded improvement (more sites fused, a better mask kind):
both change the recorded status. After a deliberate change, update the file with
``.venv/bin/python -m tests.test_expected_status --update`` and commit it with the change.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import attnopt
from tests import zoo
from tests.helpers import zoo_cases, zoo_model

STATUS = Path(__file__).resolve().parent / "expected_status.json"

#: name -> (pipeline, verdict rule): "exact" (the fp64-oracle exact verdict) or "finite".
PIPELINES = {
    "exact": ("exact", "exact"),
    "window": ("canonicalize,fuse-attention,sliding-window{window=4,sinks=1}", "finite"),
}


def status(name: str, impl: str | None, pipeline: str) -> dict[str, Any]:
    """The status of one zoo model under one pipeline (at batch 2, length 8)."""
    text, rule = PIPELINES[pipeline]
    model = zoo_model(name, impl)
    args, kwargs = zoo.get(name).example(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # declined sites are part of the recorded status
        cm = attnopt.compile(model, args, kwargs, passes=text)
    if rule == "exact":
        report = attnopt.validate(model, cm, args, kwargs, tolerance="exact", sites=False)
        verdict = "ok" if report.ok else "FAILED"
    else:
        with torch.no_grad():
            out = zoo.primary_output(cm(*args, **kwargs))
        verdict = "finite" if bool(torch.isfinite(out).all()) else "NON-FINITE"
    return {
        "sites": len(cm.sites),
        "variants": [site.variant for site in cm.sites],
        "masks": [site.mask_kind for site in cm.sites],
        "mode": cm.stats["mode"],
        "verdict": verdict,
    }


def _key(name: str, impl: str | None, pipeline: str) -> str:
    return f"{name}[{impl or '-'}] {pipeline}"


CASES = [(n, i, p) for n, i in zoo_cases() for p in PIPELINES]


@pytest.mark.parametrize("name, impl, pipeline", CASES)
def test_zoo_status_is_as_recorded(name, impl, pipeline):
    recorded = json.loads(STATUS.read_text())
    key = _key(name, impl, pipeline)
    assert key in recorded, f"{key} has no recorded status: run the --update command (docstring)"
    now = status(name, impl, pipeline)
    assert now == recorded[key], (
        f"{key} changed: recorded {recorded[key]}, now {now}. A regression is a bug; an "
        "improvement is recorded with `.venv/bin/python -m tests.test_expected_status --update`"
    )


def test_the_recorded_file_covers_exactly_the_cases():
    recorded = json.loads(STATUS.read_text())
    assert sorted(recorded) == sorted(_key(*case) for case in CASES)
    assert all(entry["verdict"] in ("ok", "finite") for entry in recorded.values()), (
        "a recorded status keeps a failing verdict: fix the bug instead of recording it"
    )
    assert not any(math.isnan(len(entry["variants"])) for entry in recorded.values())


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    table = {_key(*case): status(*case) for case in CASES}
    STATUS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(table)} statuses to {STATUS}")
