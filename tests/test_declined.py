"""The user is told, once, when a pass leaves a selected site alone; strict=True raises."""

import warnings

import pytest
import torch

import attnopt
from attnopt import zoo


def _compile(name, passes, **options):
    entry = zoo.get(name)
    model = entry.build("eager")
    args, kwargs = entry.example(2, 8)
    options.setdefault("dynamic", False)  # what is told does not depend on the capture's shapes
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


def test_precision_bf16_appends_the_pass_and_tells_when_it_cannot_run():
    cm, told = _compile("bert", "exact", precision="bf16")
    assert [p.name for p in cm.pipeline.passes][-1] == "precision"
    declined = [r for r in cm.history if r["pass"] == "precision"][0]["declined"]
    if declined:  # a CPU without native bf16: the model stays fp32, and the user is told
        assert told and "native bf16" in str(told[0].message)
    else:
        assert any(t.dtype == torch.bfloat16 for t in cm.graph.tensors.values())
    with pytest.raises(attnopt.PipelineError, match="precision"):
        _compile("bert", "exact", precision="fp16")
