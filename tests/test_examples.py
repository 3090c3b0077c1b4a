"""The tutorial's pass (examples/long_context_window.py) is short, runs, and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
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


def test_ray_embeddings_ship_the_plan_to_local_workers():
    """examples/ray_embeddings.py: Ray Data workers embed with the driver's compiled module, each
    compiling by replaying its plan (no calibration), and agree with the driver."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    path = EXAMPLE.parent / "ray_embeddings.py"
    spec = importlib.util.spec_from_file_location("ray_embeddings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(sentences=96, workers=2, batch_size=32)
    assert result["embeddings"].shape == (96, 384)
    assert result["max_abs_diff"] < 1e-4
    assert 1 <= result["worker_compilations"] <= 4
    [decisions] = result["plan"].decisions.values()
    assert len(decisions) == 6 and all(len(d["heads_kept"]) == 9 for d in decisions.values())


def test_remove_padding_example_matches_hf_embeddings():
    path = EXAMPLE.parent / "remove_padding.py"
    spec = importlib.util.spec_from_file_location("remove_padding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(batch=6)
    assert figures["ok"] == 1.0
    assert figures["min_cosine"] > 0.99999
    assert figures["padding_ratio"] > 1.2  # the texts really are of different lengths


def test_token_merge_example_reports_a_lossy_rewrite_within_its_budget():
    path = EXAMPLE.parent / "token_merge.py"
    spec = importlib.util.spec_from_file_location("token_merge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(batch=6)
    assert figures["ok"] == 1.0
    # lossy, but close: merging from layer 2 on keeps the sentence embeddings
    assert 0.95 < figures["mean_cosine"] < 1.0 - 1e-6


def test_budgeted_search_example_keeps_its_budget_on_held_out_texts(capsys):
    path = EXAMPLE.parent / "budgeted_search.py"
    spec = importlib.util.spec_from_file_location("budgeted_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(max_seconds=25.0)
    out = capsys.readouterr().out
    assert "identical outputs: True" in out
    assert report.chosen.ok and report.validation["ok"]
    assert report.validation["metrics"]["cosine"] >= 0.98
    assert report.chosen.pipeline.startswith("canonicalize,fuse-attention")
