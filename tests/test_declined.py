"""The user is told, once, when a pass leaves a selected site alone; strict=True raises."""

import warnings

import pytest

import attnopt
from attnopt import zoo


def _compile(name, passes, **options):
    entry = zoo.get(name)
    model = entry.build("eager")
    args, kwargs = entry.example(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(model, args, kwargs, passes=passes, **options)
        cm(*args, **kwargs)
        cm(*args, **kwargs)
    told = [w for w in caught if "left attention sites" in str(w.message)]
    return cm, told


def test_a_refused_site_is_reported_once_with_its_reason():
    cm, told = _compile("t5", "canonicalize,fuse-attention,linearize")
    assert len(told) == 1
    message = str(told[0].message)
    assert "linearize" in message and "additive bias" in message
    biased = sorted(s.index for s in cm.sites if s.has_bias)
    assert f"sites {biased}" in message
    assert all(s.variant == "dense" for s in cm.sites if s.has_bias)
    declined = [r for r in cm.history if r["pass"] == "linearize"][0]["declined"]
    assert sorted(i for i, _ in declined) == biased


def test_strict_raises_instead():
    with pytest.raises(attnopt.PassError, match="additive bias"):
        _compile("t5", "canonicalize,fuse-attention,linearize", strict=True)


def test_nothing_is_said_when_every_selected_site_is_served():
    cm, told = _compile("bert", "canonicalize,fuse-attention,linearize", strict=True)
    assert not told
    assert {s.variant for s in cm.sites} == {"linear"}
