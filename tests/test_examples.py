"""The tutorial's pass (examples/long_context_window.py) is short, runs, and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import attnopt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "long_context_window.py"


def _load():
    spec = importlib.util.spec_from_file_location("long_context_window", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_pass_is_under_40_lines():
    text = EXAMPLE.read_text()
    start = text.index("@dataclass(frozen=True)\nclass LongContextWindow")
    end = text.index("return attnopt.PassResult", start)
    lines = [line for line in text[start:end].splitlines() if line.strip()] + ["return"]
    assert len(lines) < 40


def test_tutorial_pass_rewrites_long_causal_sites_only():
    module = _load()
    report = module.main()
    assert report.ok
    from attnopt import zoo

    model = zoo.get("llama").build("eager")
    short = zoo.get("llama").example(1, 16)
    long = zoo.get("llama").example(1, 64)
    pipeline = [
        attnopt.passes.Canonicalize(),
        attnopt.passes.FuseAttention(),
        module.LongContextWindow(min_kv_len=32, window=16, sinks=4),
    ]
    cm = attnopt.compile(model, *short, passes=pipeline)
    assert {s.variant for s in cm.sites} == {"dense"}
    cm(*long[0], **long[1])
    assert {s.variant for s in cm.sites} == {"sliding_window"}
    assert all(s.kept_fraction < 0.5 for s in cm.sites)
    with torch.no_grad():
        out = cm(*long[0], **long[1]).logits
        ref = model(*long[0], **long[1]).logits
    assert not torch.allclose(out, ref)  # the window really drops keys


def test_docs_code_matches_example():
    doc = (EXAMPLE.parent.parent / "docs" / "writing-passes.md").read_text()
    assert 'name: ClassVar[str] = "long-context-window"' in doc
    assert "select_sites(graph, causal=True, min_kv_len=self.min_kv_len + 1)" in doc
    assert "select_sites(graph, causal=True, min_kv_len=self.min_kv_len + 1)" in EXAMPLE.read_text()
