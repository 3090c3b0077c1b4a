"""``torch.compile(model, backend="attnopt")``: attnopt as a TorchDynamo backend.

Entry points: :func:`attnopt_backend` (registered under the name ``"attnopt"`` through the
``torch_dynamo_backends`` entry point) and :func:`make_backend` for non-default options::

    compiled = torch.compile(model, backend=attnopt.dynamo.make_backend(
        passes="canonicalize,fuse-attention,sliding-window{window=512,sinks=4}"))

Each graph Dynamo hands over is captured with torch.export and compiled with attnopt; a graph
whose inputs are not all tensors (symbolic sizes after a dynamic recompile) runs as Dynamo gave it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def make_backend(passes: Any = "exact", backend: str = "auto") -> Callable:
    """A Dynamo backend that compiles each captured graph with these attnopt options.

    Args:
        passes: as for :func:`attnopt.compile`.
        backend: as for :func:`attnopt.compile`.

    Returns:
        ``backend(gm, example_inputs) -> callable``.
    """

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable:
        from attnopt.api import compile as attnopt_compile
        from attnopt.errors import AttnoptError

        if not all(isinstance(x, torch.Tensor) for x in example_inputs):
            return gm.forward
        try:
            # Dynamo hands over graphs it has already specialised (it recompiles, with symbolic
            # sizes, when shapes change), and a symbolic torch.export run inside its compile
            # callback breaks the guards of the frame being compiled: capture this graph as is.
            compiled = attnopt_compile(
                gm, tuple(example_inputs), passes=passes, backend=backend, dynamic=False
            )
        except AttnoptError as err:
            warnings.warn(
                f"attnopt could not compile a Dynamo graph ({err}); running it as is",
                RuntimeWarning,
                stacklevel=2,
            )
            return gm.forward

        def run(*args: Any) -> Any:
            return compiled(*args)

        run.attnopt_module = compiled  # type: ignore[attr-defined]
        return run

    return compile_graph


#: The default backend: ``torch.compile(model, backend="attnopt")``.
attnopt_backend = make_backend()
