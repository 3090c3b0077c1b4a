"""The node -> Triton kernel decision (attnopt.runtime.triton.backend) and the interpreter switch.

``cm.kernels`` and running take one decision, so the kernels listed are exactly the kernels that
launch; ``backend="triton-interpret"`` changes no process-wide state (checked in fresh processes,
so this process's own ``TRITON_INTERPRET`` cannot mask a leak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt.ir.attention import AttentionAttrs, AttentionOperands
from attnopt.runtime.triton.backend import AttentionKernel, LinearKernel, triton_kernel_for
from attnopt.runtime.triton.loader import triton_interpreter_ready
from tests import zoo
from tests.helpers import zoo_model

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]

# (zoo model, example (batch, seq), pipeline): every variant with a Triton kernel, and a hybrid
# site that has none.
PIPELINES = [
    ("gpt2", (1, 40), "canonicalize,fuse-attention"),
    ("gpt2", (1, 40), "canonicalize,fuse-attention,sliding-window{window=8,sinks=2}"),
    ("gpt2", (1, 40), "canonicalize,fuse-attention,block-sparse{block=16,density=0.5}"),
    ("gpt2", (2, 12), "canonicalize,fuse-attention,linearize{feature_map=relu}"),
    ("minilm", (2, 12), "canonicalize,fuse-attention,linearize{feature_map=favor}"),
    ("minilm", (2, 8), "canonicalize,fuse-attention,linearize{local_window=2}"),
    ("vit", (2, 0), "canonicalize,fuse-attention,neighborhood{kernel=3}"),
]


@pytest.mark.skipif(
    not triton_interpreter_ready(), reason="triton imported without TRITON_INTERPRET"
)
@pytest.mark.parametrize("name, example, pipeline", PIPELINES, ids=[p[2] for p in PIPELINES])
def test_listed_kernels_are_the_kernels_that_ran(name, example, pipeline):
    model = zoo_model(name, "eager")
    args, kwargs = zoo.get(name).example(*example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the hybrid's fallback warning
        cm = attnopt.compile(model, args, kwargs, passes=pipeline, backend="triton-interpret")
        namespace = cm.compile_for(args, kwargs).kernels
        namespace.triton_kernels.clear()
        # compiling may run the program (the symbolic size-one probe): count this call only
        namespace.calls.update({key: 0 for key in namespace.calls})
        cm(*args, **kwargs)
    ran = namespace.triton_kernels
    assert set(cm.kernels) == set(ran)
    assert sum(ran.values()) == namespace.calls["triton"]
    variants = {site.variant for site in cm.sites}
    if "hybrid" in variants:
        assert not ran and namespace.calls["torch"] >= len(cm.sites)
    else:
        assert ran and namespace.calls["torch"] == 0


def _operands(q_len: int = 40, dtype: torch.dtype = torch.float32) -> AttentionOperands:
    q = torch.zeros(1, 4, q_len, 16, dtype=dtype, device="meta")
    return AttentionOperands(q, q, q)


def test_decision_uses_the_dispatchers_variant_and_heads():
    ops = _operands()
    window = AttentionAttrs(variant="sliding_window", window_left=8, causal=True)
    kernel = triton_kernel_for(ops, window, interpret=False)
    assert isinstance(kernel, AttentionKernel) and "sliding_window" in kernel.name
    # Below min_len the site runs dense, whatever its heads.
    short = AttentionAttrs(variant="sliding_window", window_left=8, min_len=64, heads=(0,))
    assert triton_kernel_for(ops, short, interpret=False).name.startswith("_attn_fwd_dense")
    # A head subset runs on the torch path; every head listed is the plain variant.
    some = AttentionAttrs(variant="sliding_window", window_left=8, heads=(0, 2))
    assert "per-head" in triton_kernel_for(ops, some, interpret=False)
    every = AttentionAttrs(variant="sliding_window", window_left=8, heads=(0, 1, 2, 3))
    assert isinstance(triton_kernel_for(ops, every, interpret=False), AttentionKernel)


def test_decision_reasons_and_kernel_kinds():
    ops = _operands(q_len=9)
    assert "hybrid" in triton_kernel_for(ops, AttentionAttrs(variant="hybrid"), interpret=False)
    linear = triton_kernel_for(ops, AttentionAttrs(variant="linear"), interpret=False)
    assert isinstance(linear, LinearKernel) and linear.name == "_linattn_fwd_elu_full"
    favor = AttentionAttrs(variant="linear", feature_map="favor", causal=True)
    assert triton_kernel_for(ops, favor, interpret=False).name == "_linattn_fwd_identity_causal"
    biased = ops._replace(bias=torch.zeros(1, 4, 9, 9, device="meta"))
    assert "bias" in triton_kernel_for(biased, AttentionAttrs(variant="linear"), interpret=False)
    grid = AttentionAttrs(variant="neighborhood", grid=(3, 3), kernel=(3, 3))
    assert isinstance(triton_kernel_for(ops, grid, interpret=False), AttentionKernel)
    other_grid = AttentionAttrs(variant="neighborhood", grid=(4, 4), kernel=(3, 3))
    assert "grid" in triton_kernel_for(ops, other_grid, interpret=False)
    bf16 = _operands(dtype=torch.bfloat16)
    assert isinstance(triton_kernel_for(bf16, AttentionAttrs(), interpret=False), AttentionKernel)
    assert "bfloat16" in triton_kernel_for(bf16, AttentionAttrs(), interpret=True)


_COMPILE = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch
    import attnopt


    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


    before = os.environ.get("TRITON_INTERPRET")
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attnopt.compile(Attention(), (q, k, v), backend="triton-interpret")
        out = cm(q, k, v)
    import triton

    @triton.jit
    def later_kernel(x):
        pass

    print(json.dumps({
        "before": before,
        "after": os.environ.get("TRITON_INTERPRET"),
        "later_kernel": type(later_kernel).__name__,
        "ran": cm.compile_for((q, k, v)).kernels.triton_kernels,
        "listed": sorted(cm.kernels),
        "warnings": [str(w.message) for w in caught if "TRITON_INTERPRET" in str(w.message)],
        "error": (out - Attention()(q, k, v)).abs().max().item(),
    }))
    """
)


def _compile_in_new_process(interpret_env: str | None, tmp_path: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["ATTNOPT_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO)
    if interpret_env is not None:
        env["TRITON_INTERPRET"] = interpret_env
    script = tmp_path / "compile_interpreted.py"  # @triton.jit needs a real file
    script.write_text(_COMPILE)
    command = [sys.executable, str(script)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_triton_interpret_sets_no_environment_variable(tmp_path: Path) -> None:
    report = _compile_in_new_process(None, tmp_path)
    assert report["before"] is None and report["after"] is None
    # Later Triton users in the process still get the compiler.
    assert report["later_kernel"] == "JITFunction"
    # Without the user's TRITON_INTERPRET=1 the interpreter cannot run: said once, torch runs.
    assert report["warnings"] and not report["ran"] and report["error"] < 1e-5


def test_triton_interpret_runs_when_the_user_set_the_interpreter(tmp_path: Path) -> None:
    report = _compile_in_new_process("1", tmp_path)
    assert report["before"] == report["after"] == "1"
    assert not report["warnings"] and report["error"] < 1e-5
    assert report["ran"] and sorted(report["ran"]) == report["listed"]
