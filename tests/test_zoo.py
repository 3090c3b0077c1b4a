"""Smoke tests for the public model zoo (``tests/zoo.py``): every entry builds, runs eagerly at two
sizes, and produces sane outputs; the helpers behave as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import zoo

REPO = Path(__file__).resolve().parents[1]

SIZES = ((1, 8), (2, 12))

#: Expected primary-output shape per entry, as a function of (batch, seq).
EXPECTED_SHAPE = {
    "bert": lambda b, s: (b, s, 32),
    "gpt2": lambda b, s: (b, s, zoo.VOCAB),
    "llama": lambda b, s: (b, s, zoo.VOCAB),
    "t5": lambda b, s: (b, (s + 1) // 2, zoo.VOCAB),
    "vit": lambda b, s: (b, 17, 32),
    "swin": lambda b, s: (b, 16, 64),
    "mha": lambda b, s: (b, s, zoo.D_TORCH),
    "encoder_layer": lambda b, s: (b, s, zoo.D_TORCH),
    "minilm": lambda b, s: (b, s, 384),
}


def test_zoo_contents() -> None:
    assert set(zoo.ZOO) == set(EXPECTED_SHAPE)
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert entry is zoo.get(name)
        assert entry.self_sites > 0 and entry.cross_sites >= 0
        assert entry.sites == entry.self_sites + entry.cross_sites
    assert zoo.get("t5").cross_sites == 2 and zoo.get("t5").self_sites == 4
    assert zoo.get("gpt2").causal and not zoo.get("bert").causal
    with pytest.raises(KeyError, match="unknown zoo entry"):
        zoo.get("no-such-model")


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPE))
def test_entry_runs_eagerly(name: str) -> None:
    entry = zoo.get(name)
    model = entry.build(None)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for batch, seq in SIZES:
        args, kwargs = entry.example(batch, seq)
        with torch.no_grad():
            out = zoo.primary_output(model(*args, **kwargs))
        assert tuple(out.shape) == EXPECTED_SHAPE[name](batch, seq)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in sorted(zoo.ZOO) if zoo.ZOO[n].hf and n != "minilm"])
def test_hf_attn_implementation(name: str) -> None:
    """``build("eager")`` / ``build("sdpa")`` select the implementation, same seeded weights."""
    entry = zoo.get(name)
    args, kwargs = entry.example(2, 8)
    outs = []
    for impl in ("eager", "sdpa"):
        model = entry.build(impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            outs.append(zoo.primary_output(model(*args, **kwargs)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_build_and_example_are_deterministic() -> None:
    entry = zoo.get("bert")
    state = torch.get_rng_state()
    a, b = entry.build(None).state_dict(), entry.build(None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (_, k1), (_, k2) = entry.example(2, 8), entry.example(2, 8)
    assert all(torch.equal(k1[k], k2[k]) for k in k1)
    assert torch.equal(state, torch.get_rng_state()), "zoo must not touch the global RNG"
    mask = k1["attention_mask"]
    assert mask[0].all() and not mask[1].all(), "odd rows are right-padded"


def test_minilm_real_text() -> None:
    path = zoo.minilm_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    tok = zoo.minilm_tokenizer()
    _, kwargs = zoo.get("minilm").example(2, 12)
    assert kwargs["input_ids"].shape == (2, 12)
    assert kwargs["input_ids"][0, 0].item() == tok.cls_token_id
    assert (kwargs["attention_mask"] == 0).any(), "MiniLM example has real padding"


_ENV_AFTER_IMPORT = """
import json, os
before = dict(os.environ)
import attnopt.zoo
after = dict(os.environ)
changed = {key: after.get(key) for key in set(before) | set(after) if before.get(key) != after.get(key)}
print(json.dumps(changed))
"""


def test_import_leaves_environment_alone() -> None:
    """Importing the zoo changes no environment variable (it used to force HF offline mode).

    A fresh process without the HF variables: this test process already imported the zoo, and
    its conftest may set them.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    result = subprocess.run(
        [sys.executable, "-c", _ENV_AFTER_IMPORT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "{}", result.stdout
