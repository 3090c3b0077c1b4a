"""fuse-attention on every zoo model: every site is detected (self and cross counted separately)
and the compiled model matches eager at two batch sizes and sequence lengths."""

from __future__ import annotations

import functools

import pytest

import attnopt
from tests import zoo
from tests.helpers import assert_matches_eager, zoo_cases, zoo_model


@functools.cache
def _compiled(name: str, impl: str | None) -> attnopt.CompiledModule:
    """``attnopt.compile(zoo model, *example(2, 8), passes="exact")``, once per process: the tests
    below read the same compiled module (after :func:`_at_example`)."""
    return attnopt.compile(zoo_model(name, impl), *zoo.get(name).example(2, 8), passes="exact")


def _at_example(name: str, impl: str | None) -> attnopt.CompiledModule:
    """The shared compiled module with its example signature as the most recently used one, so
    ``cm.sites`` and ``cm.graph`` describe the (2, 8) compile whatever another test ran on it."""
    cm = _compiled(name, impl)
    cm.compile_for(*zoo.get(name).example(2, 8))
    return cm


@pytest.mark.parametrize("name, impl", zoo_cases())
def test_every_site_detected_and_exact(name, impl):
    entry = zoo.get(name)
    model = zoo_model(name, impl)
    cm = _at_example(name, impl)
    kinds = [site.kind for site in cm.sites]
    assert kinds.count("self") == entry.self_sites, cm.explain()
    assert kinds.count("cross") == entry.cross_sites, cm.explain()
    assert not cm.graph.find("softmax"), "a softmax survived fusion"
    assert [s.index for s in cm.sites] == list(range(entry.sites))
    for batch, seq in ((2, 8), (3, 13)):
        a, k = entry.example(batch, seq)
        assert_matches_eager(model, cm, a, k)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoders_without_padding_become_causal(name):
    entry = zoo.get(name)
    model = zoo_model(name, "eager")
    args, kwargs = entry.example(1, 8)  # batch 1 has no padding
    kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    cm = attnopt.compile(model, args, kwargs)
    assert all(site.causal and not site.has_mask for site in cm.sites)
    assert_matches_eager(model, cm, args, kwargs)


def test_llama_gqa_heads_are_absorbed():
    cm = _at_example("llama", "eager")
    assert {(s.num_heads, s.num_kv_heads) for s in cm.sites} == {(4, 2)}


def test_t5_sites_have_bias_and_cross_kinds():
    cm = _at_example("t5", "eager")
    cross = [s for s in cm.sites if s.kind == "cross"]
    assert all(s.q_len != s.kv_len for s in cross)
    assert any(s.has_bias for s in cm.sites if s.kind == "self")
    assert all(s.scale == 1.0 for s in cm.sites)


def test_sites_record_the_block_around_them():
    cm = _at_example("bert", "eager")
    site = cm.sites[0]
    assert site.module == "encoder.layer.0.attention.self" and site.layer == 0
    assert "query" in site.block["q_proj"] and "key" in site.block["k_proj"]
