"""Every zoo model compiles with backend="triton-interpret": the generated Triton kernels serve
every attention site (in the interpreter) and the model matches eager."""

from __future__ import annotations

import warnings

import pytest

import attnopt
from attnopt.runtime.triton.loader import triton_interpreter_ready
from tests import zoo
from tests.helpers import assert_matches_eager, zoo_cases, zoo_model

pytestmark = pytest.mark.skipif(
    not triton_interpreter_ready(), reason="triton imported before TRITON_INTERPRET was set"
)


@pytest.mark.parametrize("name, impl", zoo_cases())
def test_zoo_model_runs_on_generated_kernels(name, impl):
    model = zoo_model(name, impl)
    args, kwargs = zoo.get(name).example(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Per shape: the kernels are under test here (symbolic programs: test_symbolic_shapes.py).
        cm = attnopt.compile(model, args, kwargs, backend="triton-interpret", dynamic=False)
        assert_matches_eager(model, cm, args, kwargs)
    fallbacks = [str(w.message) for w in caught if "using torch kernels" in str(w.message)]
    assert not fallbacks
    entry = cm.compile_for(args, kwargs)
    assert entry.kernels.calls["triton"] >= len(cm.sites) and entry.kernels.calls["torch"] == 0
    assert cm.kernels and all(name.startswith("_attn_fwd_") for name in cm.kernels)


def test_sparse_variants_run_on_generated_kernels():
    model = zoo_model("gpt2", "eager")
    args, kwargs = zoo.get("gpt2").example(1, 40)
    for pipeline in (
        "canonicalize,fuse-attention,sliding-window{window=8,sinks=2}",
        "canonicalize,fuse-attention,block-sparse{block=16,density=0.5}",
    ):
        torch_cm = attnopt.compile(model, args, kwargs, passes=pipeline, backend="torch")
        triton_cm = attnopt.compile(
            model, args, kwargs, passes=pipeline, backend="triton-interpret"
        )
        from attnopt.tolerances import assert_close

        _count_from_now(triton_cm, args, kwargs)
        assert_close(triton_cm(*args, **kwargs).logits, torch_cm(*args, **kwargs).logits)
        assert triton_cm.compile_for(args, kwargs).kernels.calls["triton"] == len(triton_cm.sites)


def test_unsupported_variant_falls_back_with_one_warning():
    model = zoo_model("minilm", "eager")
    args, kwargs = zoo.get("minilm").example(2, 8)
    with pytest.warns(RuntimeWarning, match="no Triton kernel for the hybrid variant"):
        cm = attnopt.compile(
            model,
            args,
            kwargs,
            passes="canonicalize,fuse-attention,linearize{local_window=2}",
            backend="triton-interpret",
        )
        cm(*args, **kwargs)
    assert cm.compile_for(args, kwargs).kernels.calls["torch"] >= len(cm.sites)


@pytest.mark.parametrize(
    "name, feature_map",
    [("minilm", "elu"), ("gpt2", "relu"), ("minilm", "favor"), ("gpt2", "cosformer")],
)
def test_linear_variant_runs_on_generated_kernels(name, feature_map):
    """Padded encoder (key mask) and causal decoder; elu/relu in-kernel, FAVOR+/cosFormer with
    torch features and the identity kernel."""
    model = zoo_model(name, "eager")
    args, kwargs = zoo.get(name).example(2, 12)
    pipeline = f"canonicalize,fuse-attention,linearize{{feature_map={feature_map}}}"
    options = {"passes": pipeline, "dynamic": False}
    torch_cm = attnopt.compile(model, args, kwargs, backend="torch", **options)
    triton_cm = attnopt.compile(model, args, kwargs, backend="triton-interpret", **options)
    from attnopt.tolerances import assert_close

    _count_from_now(triton_cm, args, kwargs)
    expected = zoo.primary_output(torch_cm(*args, **kwargs))
    assert_close(zoo.primary_output(triton_cm(*args, **kwargs)), expected)
    calls = triton_cm.compile_for(args, kwargs).kernels.calls
    assert calls["triton"] == len(triton_cm.sites) and calls["torch"] == 0
    assert any(kernel.startswith("_linattn_fwd_") for kernel in triton_cm.kernels)


def test_triton_backend_on_cpu_tensors_is_refused_clearly():
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(1, 8)
    with pytest.raises(attnopt.BackendError, match="needs CUDA"):
        attnopt.compile(model, args, kwargs, backend="triton")
    with pytest.raises(attnopt.BackendError, match="backend must be one of"):
        attnopt.compile(model, args, kwargs, backend="cuda")


def test_neighborhood_runs_on_generated_kernels():
    model = zoo_model("vit", "eager")
    args, kwargs = zoo.get("vit").example(2, 0)
    pipeline = "canonicalize,fuse-attention,neighborhood{kernel=3}"
    torch_cm = attnopt.compile(model, args, kwargs, passes=pipeline, backend="torch")
    triton_cm = attnopt.compile(model, args, kwargs, passes=pipeline, backend="triton-interpret")
    from attnopt.tolerances import assert_close

    _count_from_now(triton_cm, args, kwargs)
    assert_close(
        triton_cm(*args, **kwargs).last_hidden_state, torch_cm(*args, **kwargs).last_hidden_state
    )
    calls = triton_cm.compile_for(args, kwargs).kernels.calls
    assert calls["triton"] == len(triton_cm.sites) and calls["torch"] == 0


def _count_from_now(cm, args, kwargs):
    """Reset the kernel call counts: compiling may run the program (the symbolic size-one
    probe), and the tests count the calls of one forward."""
    calls = cm.compile_for(args, kwargs).kernels.calls
    calls.update({key: 0 for key in calls})
