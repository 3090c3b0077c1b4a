"""attnopt as a torch.compile backend."""

from __future__ import annotations

import torch

from attnopt.dynamo import make_backend
from tests import zoo
from tests.helpers import zoo_model


def test_torch_compile_with_attnopt_backend_by_name_matches_eager():
    torch._dynamo.reset()
    model = zoo_model("bert", "eager")
    args, kwargs = zoo.get("bert").example(2, 8)
    compiled = torch.compile(model, backend="attnopt")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(*args, **kwargs).last_hidden_state,
            model(*args, **kwargs).last_hidden_state,
            atol=1e-5,
            rtol=1e-5,
        )


def test_backend_compiles_every_attention_site():
    torch._dynamo.reset()
    seen = []
    inner = make_backend()

    def spy(gm, example_inputs):
        fn = inner(gm, example_inputs)
        seen.append(getattr(fn, "attnopt_module", None))
        return fn

    model = zoo_model("gpt2", "eager")
    args, kwargs = zoo.get("gpt2").example(1, 8)
    torch.compile(model, backend=spy)(*args, **kwargs)
    modules = [m for m in seen if m is not None]
    assert modules and sum(len(m.sites) for m in modules) == zoo.get("gpt2").sites


def test_dynamos_symbolic_recompile_runs_one_symbolic_attnopt_program():
    """When shapes change Dynamo recompiles with symbolic sizes (extra int inputs): attnopt
    compiles that graph once with symbolic shapes (sizes read from the tensors), every site fused,
    and serves the later shapes without compiling again."""
    torch._dynamo.reset()
    seen = []
    inner = make_backend()

    def spy(gm, example_inputs):
        fn = inner(gm, example_inputs)
        seen.append(fn)
        return fn

    model = zoo_model("bert", "sdpa")
    compiled = torch.compile(model, backend=spy)
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 11), (4, 9), (5, 7), (2, 13)):
            args, kwargs = zoo.get("bert").example(batch, seq)
            torch.testing.assert_close(
                compiled(*args, **kwargs).last_hidden_state,
                model(*args, **kwargs).last_hidden_state,
                atol=1e-5,
                rtol=1e-5,
            )
    assert len(seen) == 2, "one graph per static and symbolic compile"
    dynamic = seen[-1].attnopt_module
    assert dynamic.stats["mode"] == "symbolic"
    assert len(dynamic.sites) == zoo.get("bert").sites
    assert dynamic.stats["specialisations"] >= 3  # (4, 9), (5, 7), (2, 13): no new compile
